"""lm-evaluation-harness on the tiny model: tasks generated from the holdouts run, metrics are logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from silotune.config import parse_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


def test_generated_holdout_task_runs_in_the_harness_and_its_metric_is_logged(
    tmp_path: Path, demo_data, tiny_adapter
) -> None:
    from mlflow.tracking import MlflowClient

    from flows.harness import harness_eval
    from silotune.tracking import MlflowTracker

    cfg = parse_config(
        {
            "federation_id": "harness-tiny",
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
            "lora": {"r": 4},
            "silos": [
                {"name": s, "train_path": str(demo_data[s]["train"]), "eval_path": str(demo_data[s]["eval"])}
                for s in ("clinic", "lab")
            ],
            "store": {"root": str(tmp_path / "store")},
            "tracking": {
                "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_root": str(tmp_path / "mlartifacts"),
                "experiment": "test-harness",
            },
        }
    )
    run_id = MlflowTracker(cfg.tracking).start(cfg, None)
    adapter_dir = tiny_adapter.save_pretrained(tmp_path / "adapter", tiny_adapter.initial_state(0))
    res = harness_eval(cfg, ["silotune_clinic"], str(adapter_dir), str(tmp_path / "eval"), run_id, 2, 4)
    assert set(res["results"]) == {"silotune_clinic"}
    assert set(res["results"]["silotune_clinic"]) == {"exact_match", "rouge_l", "chrf"}
    # The generated task: the local holdout, the chat template's generation, the locally computed metrics.
    spec = yaml.safe_load(
        (tmp_path / "eval" / "tasks" / "silotune_lab.yaml").read_text().replace("!function", "")
    )
    assert spec["dataset_kwargs"]["data_files"]["test"].endswith("silotune_lab.jsonl")
    assert len((tmp_path / "eval" / "tasks" / "silotune_lab.jsonl").read_text().splitlines()) == len(
        demo_data["lab"]["eval"].read_text().splitlines()
    )
    logged = MlflowClient(cfg.tracking.uri).get_run(run_id).data.metrics
    assert logged["harness.silotune_clinic.exact_match"] == res["results"]["silotune_clinic"]["exact_match"]
    assert "harness.silotune_clinic.rouge_l" in logged
    assert json.loads((tmp_path / "eval" / "harness.json").read_text()) == res["results"]
