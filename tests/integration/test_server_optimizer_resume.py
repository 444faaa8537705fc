"""Server optimizers through federations: a crash and resume continues from the stored optimizer state."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from silotune.config import FederationConfig, parse_config
from silotune.store import FederationLayout, LocalStore, get_json, get_tensors

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]

OPTIMIZERS = {
    "fedavgm": {"lr": 1.0, "momentum": 0.9},
    "fedadam": {"lr": 0.05},
    "fedyogi": {"lr": 0.05},
}


def _config(tmp: Path, demo_data, fid: str, optimizer: str) -> FederationConfig:
    return parse_config(
        {
            "federation_id": fid,
            "rounds": 2,
            "seed": 3,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
            "lora": {"r": 2},
            "train": {"local_steps": 1, "batch_size": 2, "learning_rate": 5e-2},
            "silos": [
                {"name": s, "train_path": str(demo_data[s]["train"]), "eval_path": str(demo_data[s]["eval"])}
                for s in ("clinic", "lab")
            ],
            "aggregation": {"server_optimizer": optimizer, "server_options": OPTIMIZERS[optimizer]},
            "evaluation": {"max_examples": 2},
            "store": {"root": str(tmp / "store")},
            "tracking": {"kind": "none"},
        }
    )


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_crash_and_resume_equals_uninterrupted(tmp_path: Path, demo_data, monkeypatch, optimizer) -> None:
    """Round 2's aggregation crashes; the resumed federation's final adapter and optimizer state are
    bit for bit those of the uninterrupted aggregation (taken, at the crash, on a copy of the store)."""
    import silotune.federation as fed
    from flows.federated_training import federated_training

    cfg = _config(tmp_path, demo_data, f"crash-{optimizer}", optimizer)
    root = Path(cfg.store.root)
    real_aggregate = fed.aggregate_round
    lay = FederationLayout(cfg.federation_id)

    def crash_in_round_2(config, store, round_, global_ref, records):
        if round_ == 1:  # what the uninterrupted federation would have committed, on a copy of the store
            shutil.copytree(root, tmp_path / "straight")
            real_aggregate(config, LocalStore(tmp_path / "straight"), round_, global_ref, records)
            raise RuntimeError("coordinator crashed")
        return real_aggregate(config, store, round_, global_ref, records)

    monkeypatch.setattr("tasks.aggregate.aggregate_round", crash_in_round_2)
    with pytest.raises(RuntimeError, match="coordinator crashed"):
        federated_training(cfg)
    monkeypatch.setattr("tasks.aggregate.aggregate_round", real_aggregate)

    store = LocalStore(root)
    assert get_json(store, lay.state())["completed_rounds"] == 1
    assert not store.exists(lay.global_adapter(2)) and not store.exists(lay.server_state(1))
    # Round 1's optimizer state is in the store, named (with its checksum) by round 1's manifest.
    ref = get_json(store, lay.manifest(0))["objects"]["server_state"]
    assert ref["key"] == lay.server_state(0)
    state_1 = get_tensors(store, ref["key"], expected_sha256=ref["sha256"])
    assert state_1 and any(float(t.abs().sum()) > 0 for t in state_1.values())

    out = federated_training(cfg)  # resumes at round 2 from the stored optimizer state
    assert out["rounds"] == 2 and [h.round for h in out["history"]] == [1, 2]
    straight = LocalStore(tmp_path / "straight")
    for key in (lay.global_adapter(2), lay.server_state(1)):
        a, b = get_tensors(straight, key), get_tensors(store, key)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f"{key}: resume differs"
    # Round 2 names its own state for a round 3 to continue from.
    assert get_json(store, lay.manifest(1))["objects"]["server_state"]["key"] == lay.server_state(1)
