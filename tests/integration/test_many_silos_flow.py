"""A 100-silo embedded federation of the tiny model (1 local step): it completes, and each round's
aggregation share of the round's wall time is printed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from silotune.config import parse_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]

SILOS = int(os.environ.get("SILOTUNE_MANY_SILOS", "100"))


def test_hundred_silos_embedded(tmp_path: Path, demo_data, capsys) -> None:
    from flows.federated_training import federated_training

    data = ("clinic", "bank", "lab")
    workers = os.environ.get("SILOTUNE_SILO_WORKERS")
    cfg = parse_config(
        {
            "federation_id": "many-silos",
            "rounds": 1,
            "seed": 1,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
            "lora": {"r": 4},
            "train": {"local_steps": 1, "batch_size": 1, "learning_rate": 5e-2, "torch_threads": 1},
            "silos": [
                {"name": f"s{i:03d}", "train_path": str(demo_data[data[i % 3]]["train"])}
                for i in range(SILOS)
            ],
            "aggregation": {"min_silos": SILOS},
            "store": {"root": str(tmp_path / "store")},
            "tracking": {"kind": "none"},
            "orchestration": {"silo_workers": int(workers)} if workers else {},
        }
    )
    out = federated_training(cfg)
    assert out["rounds"] == 1
    for h in out["history"]:
        assert len(h.included) == SILOS and h.excluded == {}
        assert h.round_seconds is not None and h.aggregate_seconds is not None
        assert 0 < h.aggregate_seconds < h.round_seconds
        with capsys.disabled():
            print(
                f"\n{SILOS} silos, round {h.round}: aggregation {h.aggregate_seconds:.2f} s of "
                f"{h.round_seconds:.2f} s ({100 * h.aggregate_seconds / h.round_seconds:.1f}%)"
            )
