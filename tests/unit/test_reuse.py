"""Reuse of identical local work (silotune.reuse): only bit-identical inputs hit, and a hit changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from silotune.config import parse_config
from silotune.reuse import WorkMemo, memo_key, tensor_digest


def test_memo_computes_once_and_returns_copies() -> None:
    memo = WorkMemo(capacity=2)
    calls = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"w": torch.ones(3)}

    def copy(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: t.clone() for k, t in v.items()}

    a = memo.get_or_compute("k", compute, copy)
    a["w"].mul_(5)  # a caller mutating its result must not change the stored one
    b = memo.get_or_compute("k", compute, copy)
    assert len(calls) == 1 and torch.equal(b["w"], torch.ones(3))
    memo.get_or_compute("k2", compute, copy)
    memo.get_or_compute("k3", compute, copy)  # capacity 2: "k" is dropped
    memo.get_or_compute("k", compute, copy)
    assert len(calls) == 4 and memo.stats() == {"hits": 1, "misses": 4, "entries": 2}
    with pytest.raises(ValueError, match="capacity"):
        WorkMemo(capacity=0)


def test_memo_key_depends_on_every_part() -> None:
    base = memo_key("train", "sha-a", "clinic", 0, {"lr": 0.1})
    assert base == memo_key("train", "sha-a", "clinic", 0, {"lr": 0.1})
    for other in (
        memo_key("evaluate", "sha-a", "clinic", 0, {"lr": 0.1}),
        memo_key("train", "sha-b", "clinic", 0, {"lr": 0.1}),
        memo_key("train", "sha-a", "bank", 0, {"lr": 0.1}),
        memo_key("train", "sha-a", "clinic", 1, {"lr": 0.1}),
        memo_key("train", "sha-a", "clinic", 0, {"lr": 0.2}),
    ):
        assert other != base


def _cfg(tmp: Path, demo_data, fid: str, **mallory) -> object:
    return parse_config(
        {
            "federation_id": fid,
            "seed": 3,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 96},
            "lora": {"r": 4, "alpha": 8},
            "train": {"local_steps": 2, "batch_size": 4, "learning_rate": 5e-2},
            "silos": [
                {
                    "name": "clinic",
                    "train_path": str(demo_data["clinic"]["train"]),
                    "eval_path": str(demo_data["clinic"]["eval"]),
                },
                {"name": "mallory", "train_path": str(demo_data["bank"]["train"]), **mallory},
            ],
            "store": {"root": str(tmp / "store")},
            "tracking": {"kind": "none"},
        }
    )


def test_reused_training_and_evaluation_equal_fresh_ones(tmp_path: Path, demo_data) -> None:
    from silotune.federation import evaluate_silo, start_federation, train_silo
    from silotune.store import LocalStore, get_tensors
    from tasks.runtime import adapter_for

    store = LocalStore(tmp_path / "store")
    memo = WorkMemo()
    clean = _cfg(tmp_path, demo_data, "memo-clean")
    attacked = _cfg(
        tmp_path, demo_data, "memo-attacked", attack={"name": "sign_flip", "options": {"scale": 4.0}}
    )
    adapter = adapter_for(clean)
    s_clean = start_federation(clean, store, adapter)
    s_att = start_federation(attacked, store, adapter)
    # Same seeded first global in both federations (the stored objects differ: their metadata names the
    # federation), so the memo keys on the tensors.
    assert s_clean.global_ref.sha256 != s_att.global_ref.sha256
    assert tensor_digest(get_tensors(store, s_clean.global_ref.key)) == tensor_digest(
        get_tensors(store, s_att.global_ref.key)
    )

    fresh = {
        s: train_silo(clean, s, 0, s_clean.global_ref, store, adapter, progress=False)
        for s in ("clinic", "mallory")
    }
    via_memo = {
        s: train_silo(clean, s, 0, s_clean.global_ref, store, adapter, progress=False, memo=memo)
        for s in ("clinic", "mallory")
    }
    assert memo.stats()["misses"] == 2
    for s in fresh:  # a memoised first computation is the same computation
        assert fresh[s].update.sha256 == via_memo[s].update.sha256

    # In the attacked federation the honest silo's work is reused; the attacker's honest training is
    # reused too, and its attack is applied to it afterwards.
    att = {
        s: train_silo(attacked, s, 0, s_att.global_ref, store, adapter, progress=False, memo=memo)
        for s in ("clinic", "mallory")
    }
    assert memo.stats()["hits"] == 2
    honest = get_tensors(store, fresh["clinic"].update.key)
    reused = get_tensors(store, att["clinic"].update.key)
    assert all(torch.equal(honest[k], reused[k]) for k in honest)
    m_clean = get_tensors(store, fresh["mallory"].update.key)
    m_att = get_tensors(store, att["mallory"].update.key)
    assert all(torch.allclose(m_att[k], -4.0 * m_clean[k]) for k in m_clean)

    # A different round (other seed) or other data is a fresh computation.
    train_silo(clean, "clinic", 1, s_clean.global_ref, store, adapter, progress=False, memo=memo)
    assert memo.stats()["misses"] == 3

    e_fresh = evaluate_silo(clean, "clinic", 0, s_clean.global_ref, store, adapter)
    e1 = evaluate_silo(clean, "clinic", 0, s_clean.global_ref, store, adapter, memo=memo)
    e2 = evaluate_silo(attacked, "clinic", 4, s_att.global_ref, store, adapter, memo=memo)
    assert memo.stats()["hits"] == 3
    assert e_fresh.result == e1.result == e2.result and e2.round == 4


def test_dp_sgd_training_is_never_reused(tmp_path: Path, demo_data) -> None:
    from silotune.federation import start_federation, train_silo
    from silotune.store import LocalStore
    from tasks.runtime import adapter_for

    cfg = _cfg(tmp_path, demo_data, "memo-dp")
    raw = cfg.model_dump(mode="json")
    raw["privacy"] = {"sample_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3}}
    for s in raw["silos"]:
        s["private_dir"] = str(tmp_path / "private" / s["name"])
    cfg = parse_config(raw)
    store = LocalStore(tmp_path / "store")
    adapter = adapter_for(cfg)
    st = start_federation(cfg, store, adapter)
    memo = WorkMemo()
    for _ in range(2):
        train_silo(cfg, "clinic", 0, st.global_ref, store, adapter, progress=False, memo=memo)
    assert memo.stats() == {"hits": 0, "misses": 0, "entries": 0}
