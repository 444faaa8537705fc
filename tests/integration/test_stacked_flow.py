"""The coordinator flow with aggregation.lora_merge 'stack': ranks 4/8/16, two rounds, a published adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from silotune.config import parse_config
from silotune.methods import stacked
from silotune.store import FederationLayout, LocalStore, get_json, get_tensors

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


def test_stacked_federation_runs_and_publishes_its_merge_as_a_lora(tmp_path: Path, demo_data) -> None:
    from mlflow.tracking import MlflowClient
    from peft import PeftModel

    from flows.federated_training import federated_training
    from silotune.modeling import load_base_model, resolve_model_path

    ranks = {"clinic": 4, "bank": 8, "lab": 16}
    cfg = parse_config(
        {
            "federation_id": "fed-stack",
            "rounds": 2,
            "seed": 1,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
            "lora": {"r": 8, "alpha": 16},
            "train": {"local_steps": 1, "batch_size": 4, "learning_rate": 5e-2},
            "silos": [
                {
                    "name": s,
                    "train_path": str(demo_data[s]["train"]),
                    "eval_path": str(demo_data[s]["eval"]),
                    "method": {"name": "lora", "options": {"rank": r}},
                }
                for s, r in ranks.items()
            ],
            "aggregation": {"lora_merge": "stack"},
            "evaluation": {"max_examples": 8},
            "store": {"root": str(tmp_path / "store")},
            "tracking": {
                "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_root": str(tmp_path / "mlartifacts"),
                "experiment": "test",
            },
        }
    )
    out = federated_training(cfg)
    assert out["rounds"] == 2
    store, lay = LocalStore(cfg.store.root), FederationLayout("fed-stack")
    assert get_json(store, lay.manifest(1))["included"] == list(ranks)
    final = get_tensors(store, lay.global_adapter(2))
    assert stacked.is_merged(final) and any(bool(v.any()) for v in final.values())

    # The published adapter (store and MLflow) is a PEFT LoRA whose merge is base + the merged global.
    client = MlflowClient(cfg.tracking.uri)
    local = Path(client.download_artifacts(out["tracking_run_id"], "adapter", str(tmp_path / "dl")))
    base = load_base_model(resolve_model_path("tiny-llama"))
    before = {
        m: stacked.base_layer(base, m.removeprefix("base_model.model.")).weight.detach().clone()
        for m in stacked.modules(final)
    }
    merged = PeftModel.from_pretrained(base, local).merge_and_unload()
    for m, w in before.items():
        got = merged.get_submodule(m.removeprefix("base_model.model.")).weight.detach()
        assert torch.allclose(got - w, final[stacked.merged_key(m)], atol=1e-5), m
    assert store.exists(lay.final("adapter_model.safetensors"))
