"""SCAFFOLD through the coordinator flow on the tiny model, in plaintext and under secure aggregation.

Each federation runs 2 rounds; round 2's aggregation crashes once. The resumed federation must give,
bit for bit, the global adapter and server variate that the uninterrupted aggregation gave (taken at
the crash on a copy of the store), and the silos' variates must be those of the crashed attempt.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from silotune.aggregation import scaffold
from silotune.config import FederationConfig, parse_config
from silotune.keys import SiloVault, setup_local_keys
from silotune.store import FederationLayout, LocalStore, get_json, get_tensors

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]

SILOS = ("clinic", "lab")
STEPS, LR = 2, 1e-2  # K·η = 0.02 keeps Δy and K·η·Δc inside secure aggregation's value bound


def _config(tmp: Path, demo_data, fid: str, protection: str) -> FederationConfig:
    return parse_config(
        {
            "federation_id": fid,
            "rounds": 2,
            "seed": 3,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
            "lora": {"r": 2},
            "train": {"local_steps": STEPS, "batch_size": 2, "learning_rate": LR},
            "silos": [
                {
                    "name": s,
                    "train_path": str(demo_data[s]["train"]),
                    "private_dir": str(tmp / "silos" / s),
                }
                for s in SILOS
            ],
            "aggregation": {"algorithm": "scaffold", "options": {"weighted": False}},
            "security": {"protection": protection, "keys_dir": str(tmp / "coordinator")},
            "evaluation": {"max_examples": 2},
            "store": {"root": str(tmp / "store")},
            "tracking": {"kind": "none"},
        }
    )


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("protection", ["none", "secagg"])
def test_scaffold_federation_completes_and_resumes_after_a_crash(
    tmp_path: Path, demo_data, monkeypatch, protection: str
) -> None:
    import silotune.federation as fed
    from flows.federated_training import federated_training

    cfg = _config(tmp_path, demo_data, f"scaffold-{protection}", protection)
    if protection == "secagg":
        setup_local_keys(cfg)
    root = Path(cfg.store.root)
    lay = FederationLayout(cfg.federation_id)
    folders = {s: SiloVault.for_silo(cfg.silo(s)).control_folder(cfg.federation_id) for s in SILOS}
    real_aggregate = fed.aggregate_round
    at_crash: dict[str, bytes] = {}

    def crash_in_round_2(config, store, round_, global_ref, records):
        if round_ == 1:  # what the uninterrupted federation would have committed, on a copy of the store
            shutil.copytree(root, tmp_path / "straight")
            real_aggregate(config, LocalStore(tmp_path / "straight"), round_, global_ref, records)
            at_crash.update({s: (folders[s] / "00001.safetensors").read_bytes() for s in SILOS})
            raise RuntimeError("coordinator crashed")
        return real_aggregate(config, store, round_, global_ref, records)

    monkeypatch.setattr("tasks.aggregate.aggregate_round", crash_in_round_2)
    with pytest.raises(RuntimeError, match="coordinator crashed"):
        federated_training(cfg)
    monkeypatch.setattr("tasks.aggregate.aggregate_round", real_aggregate)
    store = LocalStore(root)
    assert get_json(store, lay.state())["completed_rounds"] == 1
    assert not store.exists(lay.control(1))

    out = federated_training(cfg)  # resumes at round 2 from round 1's server variate
    assert out["rounds"] == 2 and [h.included for h in out["history"]] == [list(SILOS)] * 2
    straight = LocalStore(tmp_path / "straight")
    for key in (lay.global_adapter(2), lay.control(1)):
        assert _same(get_tensors(straight, key), get_tensors(store, key)), f"{key}: resume differs"
    for s in SILOS:  # the redone round wrote the same silo variates as the crashed attempt
        assert (folders[s] / "00001.safetensors").read_bytes() == at_crash[s]

    # The server variate of each round is in the store, named with its checksum by the round's manifest.
    controls = []
    for r in range(2):
        ref = get_json(store, lay.manifest(r))["objects"]["server_control"]
        assert ref["key"] == lay.control(r)
        controls.append(get_tensors(store, ref["key"], expected_sha256=ref["sha256"]))
    assert any(float(t.abs().max()) > 0 for t in controls[1].values())
    # ... the silos' variates only in their private folders (c_i after rounds 1 and 2) ...
    assert all(
        sorted(p.name for p in folders[s].iterdir()) == ["00000.safetensors", "00001.safetensors"]
        for s in SILOS
    )
    blobs = [store.get(k) for k in store.list("")]
    for s in SILOS:  # no 4 consecutive float32 values of a silo's variate anywhere in the store
        for t in st_load((folders[s] / "00001.safetensors").read_bytes()).values():
            flat = t.flatten().to(torch.float32)
            for i in range(0, max(1, flat.numel() - 4), max(1, flat.numel() // 8)):
                needle = flat[i : i + 4].numpy().tobytes()
                assert not any(needle in b for b in blobs), f"silo {s}'s control variate is in the store"
    # ... and with every silo in every round, c stays the mean of the silos' variates (the invariant).
    for r in range(2):
        own = [dict(st_load((folders[s] / f"{r:05d}.safetensors").read_bytes())) for s in SILOS]
        for k, c in controls[r].items():
            mean = sum(o[k] for o in own) / len(own)
            assert torch.allclose(c, mean, atol=1e-5), (r, k, float((c - mean).abs().max()))

    if protection == "none":  # Δc is a function of the released Δy and c alone: K·η·Δc = -(Δy + K·η·c)
        update = get_tensors(store, lay.update(1, "clinic"))
        delta, framed_c = scaffold.split(update, steps=STEPS, lr=LR)
        for k, dy in delta.items():
            expected = -(dy + STEPS * LR * controls[0][k])
            assert torch.allclose(STEPS * LR * framed_c[k], expected, atol=1e-6)
