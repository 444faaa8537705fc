"""Every method and DPO go through the same filters as LoRA SFT: client DP, CKKS, masking, signing, robust rules.

Rounds run through the library's round functions in the order the coordinator flow calls
them, on the tiny model, and the protected result is compared with the plaintext one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from silotune import protection as prot
from silotune.adapters import AdapterModel
from silotune.config import FederationConfig, parse_config
from silotune.demo import make_preference_silo
from silotune.federation import (
    aggregate_round,
    close_secagg_upload,
    commit_round,
    evaluate_silo,
    start_federation,
    train_silo,
)
from silotune.keys import setup_local_keys
from silotune.store import LocalStore

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def pref_silos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("prefs")
    paths = make_preference_silo(d, seed=0, scale=0.1)
    lines = paths["train"].read_text().splitlines(keepends=True)
    (d / "a.jsonl").write_text("".join(lines[::2]))
    (d / "b.jsonl").write_text("".join(lines[1::2]))
    return {"a": d / "a.jsonl", "b": d / "b.jsonl", "eval": paths["eval"]}


def _config(tmp: Path, data: dict[str, Path], fid: str, method: str, objective: str, **sections: Any) -> FederationConfig:
    raw: dict[str, Any] = {
        "federation_id": fid,
        "rounds": 1,
        "seed": 5,
        "model": {"name_or_path": "tiny-llama", "max_seq_len": 96},
        "lora": {"r": 4},
        "method": {"name": method, "options": {"num_virtual_tokens": 4} if method == "prompt_tuning" else {}},
        "objective": {"name": objective, "beta": 0.5},
        "train": {"local_steps": 2, "batch_size": 4, "learning_rate": 5e-2},
        "silos": [
            {"name": s, "train_path": str(data[s]), "eval_path": str(data["eval"]), "private_dir": str(tmp / "silos" / s)}
            for s in ("a", "b")
        ],
        "evaluation": {"max_examples": 4},
        "store": {"root": str(tmp / "store")},
        "tracking": {"kind": "none"},
        **sections,
    }
    raw["security"] = {"keys_dir": str(tmp / "coordinator"), **raw.get("security", {})}
    return parse_config(raw)


def _one_round(cfg: FederationConfig, adapter: AdapterModel) -> dict[str, torch.Tensor]:
    store = LocalStore(cfg.store.root)
    state = start_federation(cfg, store, adapter)
    names = [s.name for s in cfg.silos]
    if cfg.security.protection == "secagg":
        for n in names:
            prot.secagg_advertise(cfg, n, 0, store)
        for n in names:
            prot.secagg_share(cfg, n, 0, store)
    records = [train_silo(cfg, n, 0, state.global_ref, store, adapter, progress=False) for n in names]
    if cfg.security.protection == "secagg":
        for n in close_secagg_upload(cfg, store, 0, records):
            prot.secagg_unmask(cfg, n, 0, store)
    agg = aggregate_round(cfg, store, 0, state.global_ref, records)
    evals = [e for n in names if (e := evaluate_silo(cfg, n, 0, agg.next_global, store, adapter))]
    assert evals and ("pref_margin" in evals[0].result or cfg.objective.name == "sft")
    state = commit_round(cfg, store, state, 0, records, [], agg, evals)
    return prot.load_global(cfg, names[0], state.global_ref.key, state.global_ref.sha256, store)


@pytest.mark.parametrize(
    ("method", "objective", "protection"),
    [("lora", "dpo", "secagg"), ("lora", "dpo", "ckks"), ("ia3", "sft", "ckks"), ("prompt_tuning", "dpo", "secagg")],
)
def test_protected_round_equals_plaintext_round(tmp_path: Path, pref_silos, method, objective, protection) -> None:
    plain = _config(tmp_path / "p", pref_silos, "plain", method, objective,
                    aggregation={"options": {"weighted": False}})
    protected = _config(tmp_path / "q", pref_silos, "prot", method, objective,
                        security={"protection": protection, "signing": True})
    assert protected.ffa_lora is (method == "lora")
    if method == "lora":  # protected LoRA runs FFA-LoRA; compare with FFA-LoRA in plaintext
        plain = _config(tmp_path / "p", pref_silos, "plain", method, objective,
                        aggregation={"options": {"weighted": False}}, security={"ffa_lora": True})
    setup_local_keys(protected)
    adapter = AdapterModel.create(plain.model, plain.lora, seed=0, method=plain.method)
    a = _one_round(plain, adapter)
    b = _one_round(protected, adapter)
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst
    g0 = adapter.initial_state(plain.seed)
    assert any(not torch.equal(g0[k], b[k]) for k in b)  # the round moved the global


def test_dpo_with_client_dp_and_robust_aggregation(tmp_path: Path, pref_silos) -> None:
    cfg = _config(tmp_path, pref_silos, "dpo-dp", "lora", "dpo",
                  privacy={"client_dp": {"clip_norm": 0.05, "noise_multiplier": 0.3, "delta": 0.1}},
                  aggregation={"name": "trimmed_mean", "options": {"trim_ratio": 0.0}})
    adapter = AdapterModel.create(cfg.model, cfg.lora, seed=0, method=cfg.method)
    out = _one_round(cfg, adapter)
    assert out


def test_dp_sgd_is_refused_for_dpo(tmp_path: Path, pref_silos) -> None:
    from silotune.errors import ConfigError

    with pytest.raises(ConfigError, match="a preference pair \\(two rows\\) is the privacy unit"):
        _config(tmp_path, pref_silos, "x", "lora", "dpo",
                privacy={"sample_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3}})
