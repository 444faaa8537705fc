"""Heterogeneous LoRA ranks: slices, zero-padding, coverage-weighted FedAvg, one federated round."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from silotune.config import parse_config
from silotune.errors import ConfigError
from silotune.methods.hetero import pad, rescale_by_coverage, truncate


def _state(r: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "x.lora_A.weight": torch.randn(r, 6, generator=gen),
        "x.lora_B.weight": torch.randn(5, r, generator=gen),
    }


def test_truncate_and_pad_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    full = _state(4, gen)
    low = truncate(full, 2)
    assert low["x.lora_A.weight"].shape == (2, 6) and low["x.lora_B.weight"].shape == (5, 2)
    back = pad(low, full)
    assert torch.equal(back["x.lora_A.weight"][:2], full["x.lora_A.weight"][:2])
    assert float(back["x.lora_A.weight"][2:].abs().sum()) == 0 and float(back["x.lora_B.weight"][:, 2:].abs().sum()) == 0
    assert truncate(full, 4)["x.lora_A.weight"] is full["x.lora_A.weight"]  # full rank: untouched


def test_rescale_by_coverage_equals_the_per_component_weighted_mean() -> None:
    gen = torch.Generator().manual_seed(1)
    ranks, n = [4, 2, 1], [10, 30, 60]
    deltas = [pad(truncate(_state(4, gen), r), _state(4, gen)) for r in ranks]
    w = [x / sum(n) for x in n]
    fedavg = {k: sum(wi * d[k] for wi, d in zip(w, deltas, strict=True)) for k in deltas[0]}
    got = rescale_by_coverage(fedavg, ranks, w)
    for j in range(4):
        cover = [i for i, r in enumerate(ranks) if r > j]
        tot = sum(n[i] for i in cover)
        want_a = sum(n[i] * deltas[i]["x.lora_A.weight"][j] for i in cover) / tot
        want_b = sum(n[i] * deltas[i]["x.lora_B.weight"][:, j] for i in cover) / tot
        assert torch.allclose(got["x.lora_A.weight"][j], want_a, atol=1e-6)
        assert torch.allclose(got["x.lora_B.weight"][:, j], want_b, atol=1e-6)
    # Equal ranks: plain FedAvg is already right and nothing changes.
    same = rescale_by_coverage(fedavg, [4, 4, 4], w)
    assert all(torch.allclose(same[k], fedavg[k]) for k in fedavg)


def _cfg(tmp: Path, demo_data, **over):
    raw = {
        "federation_id": "het",
        "seed": 2,
        "model": {"name_or_path": "tiny-llama", "max_seq_len": 96},
        "lora": {"r": 4, "alpha": 8},
        "train": {"local_steps": 3, "batch_size": 4, "learning_rate": 5e-2},
        "silos": [
            {"name": "clinic", "train_path": str(demo_data["clinic"]["train"]), "eval_path": str(demo_data["clinic"]["eval"])},
            {"name": "bank", "train_path": str(demo_data["bank"]["train"]), "eval_path": str(demo_data["bank"]["eval"]),
             "method": {"name": "qlora", "options": {"rank": 2}}},
        ],
        "store": {"root": str(tmp / "store")},
        "tracking": {"kind": "none"},
    }
    raw.update(over)
    return parse_config(raw)


def test_two_ranks_and_two_bit_widths_in_one_round(tmp_path: Path, demo_data) -> None:
    from silotune.federation import aggregate_round, evaluate_silo, start_federation, train_silo
    from silotune.store import LocalStore, get_tensors
    from tasks.runtime import adapter_for

    cfg = _cfg(tmp_path, demo_data)
    assert cfg.silo_ranks() == {"clinic": 4, "bank": 2}
    assert cfg.lora_for("bank").r == 2 and cfg.lora_for("bank").alpha == 4.0  # alpha / r kept at 2
    store = LocalStore(cfg.store.root)
    state = start_federation(cfg, store, adapter_for(cfg))
    g0 = get_tensors(store, state.global_ref.key)
    recs = [train_silo(cfg, s, 0, state.global_ref, store, adapter_for(cfg, s), progress=False) for s in ("clinic", "bank")]
    bank = get_tensors(store, recs[1].update.key)
    clinic = get_tensors(store, recs[0].update.key)
    assert all(float(v[2:].abs().sum()) == 0 for k, v in bank.items() if "lora_A" in k)  # padded
    agg = aggregate_round(cfg, store, 0, state.global_ref, recs)
    g1 = get_tensors(store, agg.next_global.key)
    n = [recs[0].num_examples, recs[1].num_examples]
    for k in g1:
        if "lora_A" not in k:
            continue
        # Components only the rank-4 silo trains move by its delta, undiluted by the rank-2 silo's zeros.
        assert torch.allclose(g1[k][2:] - g0[k][2:], clinic[k][2:], atol=1e-6)
        mean = (n[0] * clinic[k][:2] + n[1] * bank[k][:2]) / sum(n)
        assert torch.allclose(g1[k][:2] - g0[k][:2], mean, atol=1e-6)
    ev = evaluate_silo(cfg, "bank", 0, agg.next_global, store, adapter_for(cfg, "bank"))
    assert ev is not None and ev.result["loss"] > 0


def test_heterogeneous_ranks_are_refused_where_padding_cannot_average(tmp_path: Path, demo_data) -> None:
    with pytest.raises(ConfigError, match="use 'fedavg', not 'median'"):
        _cfg(tmp_path, demo_data, aggregation={"name": "median"})
    with pytest.raises(ConfigError, match="protection and FFA-LoRA are not supported"):
        _cfg(tmp_path, demo_data, security={"protection": "secagg"})
    raw = _cfg(tmp_path, demo_data).model_dump(mode="json")
    raw["silos"][1]["method"]["options"]["rank"] = 8
    with pytest.raises(ConfigError, match=r"bank's rank 8 exceeds the federation's lora\.r=4"):
        parse_config(raw)
