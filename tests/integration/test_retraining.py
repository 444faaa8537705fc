"""Scheduled retraining through the promotion gate: a better run becomes the champion, a worse one not."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.retraining import scheduled_retraining

pytestmark = [pytest.mark.integration]


def _config(tmp: Path, demo_data, name: str, *, steps: int, lr: float) -> str:
    cfg = {
        "federation_id": "retrain",
        "rounds": 1,
        "seed": 1,
        "model": {"name_or_path": "tiny-llama", "max_seq_len": 96},
        "lora": {"r": 4},
        "train": {"local_steps": steps, "batch_size": 4, "learning_rate": lr},
        "silos": [
            {
                "name": "lab",
                "train_path": str(demo_data["lab"]["train"]),
                "eval_path": str(demo_data["lab"]["eval"]),
            }
        ],
        "evaluation": {"max_examples": 8},
        "store": {"root": str(tmp / "store")},
        "tracking": {
            "uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "artifact_root": str(tmp / "mlartifacts"),
            "experiment": "retraining",
            "promotion": {"metric": "loss", "margin": 0.001},
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_retraining_promotes_only_a_better_version(tmp_path: Path, demo_data, prefect_api) -> None:
    from mlflow.tracking import MlflowClient

    first = scheduled_retraining(_config(tmp_path, demo_data, "first", steps=4, lr=3e-2))
    # barely trained: worse on the holdout than the champion
    worse = scheduled_retraining(_config(tmp_path, demo_data, "worse", steps=1, lr=1e-3))
    # trained longer on the same data: better
    better = scheduled_retraining(_config(tmp_path, demo_data, "better", steps=8, lr=3e-2))
    losses = [r["final"].loss for r in (first, worse, better)]
    assert losses[1] > losses[0] > losses[2], losses
    assert len({r["federation_id"] for r in (first, worse, better)}) == 3  # each run a fresh federation
    promo = [r["promotion"] for r in (first, worse, better)]
    assert [p["alias"] for p in promo] == ["champion", "challenger", "champion"], promo
    assert "no champion" in promo[0]["reason"]
    assert "not promoted" in promo[1]["reason"] and f"champion v{promo[0]['version']}" in promo[1]["reason"]
    assert "promoted" in promo[2]["reason"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_model_version_by_alias("silotune-retrain", "champion").version == int(
        promo[2]["version"]
    )
    assert client.get_model_version_by_alias("silotune-retrain", "challenger").version == int(
        promo[1]["version"]
    )
    worse_tags = client.get_model_version("silotune-retrain", promo[1]["version"]).tags
    assert worse_tags["silotune.promotion"] == "challenger" and worse_tags["silotune.promotion.reason"]
    assert float(worse_tags["silotune.holdout.loss"]) == pytest.approx(losses[1])
