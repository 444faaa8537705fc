"""The real SmolLM2-135M-Instruct through the coordinator flow (slow: a few minutes on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.real_model, pytest.mark.usefixtures("prefect_api")]


def test_real_model_federation_improves_every_silo(tmp_path: Path) -> None:
    from flows.federated_training import federated_training
    from silotune.config import parse_config
    from silotune.demo import make_demo_silos

    data = make_demo_silos(tmp_path / "data", seed=0, scale=0.25)
    cfg = parse_config(
        {
            "federation_id": "real-e2e",
            "rounds": 1,
            "seed": 0,
            "model": {"name_or_path": "smollm2-135m-instruct", "max_seq_len": 128},
            "train": {"local_steps": 4, "batch_size": 4, "learning_rate": 3e-3},
            "silos": [
                {"name": s, "train_path": str(data[s]["train"]), "eval_path": str(data[s]["eval"])}
                for s in ("clinic", "bank")
            ],
            "aggregation": {"min_silos": 2},
            "store": {"root": str(tmp_path / "store")},
            "tracking": {
                "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_root": str(tmp_path / "art"),
            },
        }
    )
    out = federated_training(cfg)
    initial, final = out["initial"], out["final"]
    assert final.loss < initial.loss
    for silo in ("clinic", "bank"):
        assert out["history"][0].train[silo]["final_loss"] < out["history"][0].train[silo]["first_loss"]
    assert (Path(cfg.store.root) / "federations/real-e2e/final/adapter_config.json").is_file()
