"""The privacy–utility report through the real flows on the tiny model: every cell, reused work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from silotune.config import parse_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


def test_privacy_utility_grid_produces_every_cell_and_reuses_identical_work(
    tmp_path: Path, demo_data
) -> None:
    from flows.privacy_utility import privacy_utility

    cfg = parse_config(
        {
            "federation_id": "pu-tiny",
            "rounds": 1,
            "seed": 0,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 96},
            "lora": {"r": 4},
            "train": {"local_steps": 2, "batch_size": 4, "learning_rate": 5e-2, "torch_threads": 1},
            "silos": [
                {
                    "name": s,
                    "train_path": str(demo_data[s]["train"]),
                    "eval_path": str(demo_data[s]["eval"]),
                    "private_dir": str(tmp_path / "private" / s),
                }
                for s in ("clinic", "lab")
            ],
            "aggregation": {"min_silos": 2},
            "evaluation": {"batch_size": 8},
            "store": {"root": str(tmp_path / "store")},
            "tracking": {
                "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_root": str(tmp_path / "mlartifacts"),
                "experiment": "test-pu",
            },
        }
    )
    out = tmp_path / "report"
    res = privacy_utility(
        cfg,
        str(out),
        [str(demo_data[s]["val"]) for s in ("clinic", "lab")],
        epsilons=[8.0],
        methods=["lora"],
        privacies=["none", "client_dp"],
        baselines=False,
        mia_examples=6,
        max_new_tokens=4,
        validation_examples=4,
    )
    names = [r["name"] for r in res["rows"]]
    assert names == ["base model", "none-lora", "client-dp-eps8-lora"]
    rows = {r["name"]: r for r in res["rows"]}
    assert 0 < rows["client-dp-eps8-lora"]["epsilon_spent"] <= 8.0 + 1e-6  # its budget, and no more
    assert rows["none-lora"]["epsilon_spent"] == ""
    # Reuse: the base model's holdout evaluation ran once for the grid (2 silos, 1 more cell: 2 reuses),
    # and the client-DP cell's local training (before its noise) is the no-DP cell's (2 silos: 2 reuses).
    # (The full grid's cells, DP-SGD included, are checked in tests/unit/test_privacy_utility.py.)
    assert res["memo"]["hits"] >= 2 + 2, res["memo"]
    for p in res["paths"].values():
        assert Path(p).stat().st_size > 0
    table = json.loads((out / "privacy_utility.json").read_text())
    assert table["rows"][2]["per_round"]["epsilon"][0] == pytest.approx(
        rows["client-dp-eps8-lora"]["epsilon_spent"], abs=1e-3
    )
    assert res["recipe"]["sample_clip"] > 0 and res["recipe"]["client_clip"] > 0
    assert "| client-dp-eps8-lora | 8 |" in (out / "privacy_utility.md").read_text()
