"""Preference data, the DPO loss, and federated DPO on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from silotune.config import parse_config
from silotune.data import encode_preferences, is_preference_file, read_preferences, read_records
from silotune.demo import make_preference_silo
from silotune.errors import DataError
from silotune.methods.objectives import DPO, build_objective, dpo_loss


def test_preference_records_validate_with_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "q", "chosen": "a"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'rejected' must be a non-empty string"):
        read_preferences(p)
    p.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: 'chosen' and 'rejected' are identical"):
        read_preferences(p)
    p.write_text(json.dumps({"instruction": "q", "response": "a"}) + "\n")
    with pytest.raises(
        DataError, match=r"p\.jsonl:1: a preference record needs 'prompt', 'chosen' and 'rejected'"
    ):
        read_preferences(p)
    assert not is_preference_file(p)


def test_pairs_read_as_chats_are_the_chosen_answer(tmp_path: Path) -> None:
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"prompt": "q", "chosen": "yes", "rejected": "no", "system": "be brief"}]))
    assert read_records(p) == [
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "yes"},
        ]
    ]
    assert is_preference_file(p)


def test_preference_silo_is_deterministic_and_holdout_disjoint(tmp_path: Path, tokenizer) -> None:
    a = make_preference_silo(tmp_path / "a", seed=0, scale=0.2)
    b = make_preference_silo(tmp_path / "b", seed=0, scale=0.2)
    assert a["train"].read_bytes() == b["train"].read_bytes()
    train, held = read_preferences(a["train"]), read_preferences(a["eval"])
    assert len(train) == 60 and len(held) == 12
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    enc = encode_preferences(held, tokenizer, 128)
    assert len(enc) == 12 and enc[0].chosen.input_ids[:5] == enc[0].rejected.input_ids[:5]


def test_dpo_loss_golden_values() -> None:
    z = torch.zeros(3)
    loss, margin = dpo_loss(z, z, z, z, beta=0.1)
    assert torch.allclose(loss, torch.full((3,), math.log(2.0)))
    # Policy prefers chosen by 2 nats more than the reference does: loss = -log σ(β·2).
    loss, margin = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5
    )
    assert float(margin) == pytest.approx(1.0) and float(loss) == pytest.approx(
        -math.log(1 / (1 + math.exp(-1.0)))
    )
    assert build_objective(None) is None
    assert isinstance(build_objective(parse_config_objective("dpo")), DPO)


def parse_config_objective(name: str):
    from silotune.config import ObjectiveSpec

    return ObjectiveSpec(name=name, beta=0.2)


def test_dpo_refuses_instruction_data(tiny_adapter, demo_data) -> None:
    from silotune.config import TrainSpec
    from silotune.data import encode_dataset
    from silotune.training import train_local

    ex = encode_dataset(read_records(demo_data["clinic"]["train"]), tiny_adapter.tokenizer, 64)
    with pytest.raises(DataError, match="objective 'dpo' needs preference pairs"):
        train_local(
            tiny_adapter,
            tiny_adapter.state(),
            ex,
            TrainSpec(local_steps=1),
            seed=0,
            progress=False,
            objective=DPO(),
        )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_federated_dpo_raises_the_heldout_preference_margin(method: str, tmp_path: Path) -> None:
    """Two preference silos, DPO through the library's round functions; held-out margin goes up."""
    from silotune.adapters import AdapterModel
    from silotune.federation import aggregate_round, evaluate_silo, start_federation, train_silo
    from silotune.store import LocalStore

    paths = make_preference_silo(tmp_path / "prefs", seed=0, scale=0.2)
    lines = paths["train"].read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[::2]))
    (tmp_path / "b.jsonl").write_text("".join(lines[1::2]))
    cfg = parse_config(
        {
            "federation_id": f"dpo-{method}",
            "seed": 0,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 96},
            "lora": {"r": 4},
            "method": {"name": method},
            "objective": {"name": "dpo", "beta": 0.5},
            "train": {"local_steps": 6, "batch_size": 4, "learning_rate": 0.1 if method == "lora" else 3e-3},
            "silos": [
                {"name": "a", "train_path": str(tmp_path / "a.jsonl"), "eval_path": str(paths["eval"])},
                {"name": "b", "train_path": str(tmp_path / "b.jsonl")},
            ],
            "store": {"root": str(tmp_path / "store")},
            "tracking": {"kind": "none"},
        }
    )
    store = LocalStore(cfg.store.root)
    adapter = AdapterModel.create(cfg.model, cfg.lora, seed=0, method=cfg.method)
    state = start_federation(cfg, store, adapter)
    before = evaluate_silo(cfg, "a", -1, state.global_ref, store, adapter)
    assert before is not None and before.result["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    ref = state.global_ref
    for r in range(2 if method == "lora" else 1):  # full FT moves faster; one round keeps the test short
        recs = [train_silo(cfg, s, r, ref, store, adapter, progress=False) for s in ("a", "b")]
        assert all(rec.train["first_loss"] == pytest.approx(math.log(2), abs=0.05) for rec in recs) or r > 0
        ref = aggregate_round(cfg, store, r, ref, recs).next_global
    after = evaluate_silo(cfg, "a", 9, ref, store, adapter)
    assert after is not None
    b, a = before.result, after.result
    assert a["pref_margin"] > b["pref_margin"] and a["reward_margin"] > 0 and a["dpo_loss"] < b["dpo_loss"]
    assert a["reward_accuracy"] > 0.5
    print(
        f"\n{method} DPO held-out: margin {b['pref_margin']:.3f} -> {a['pref_margin']:.3f}, "
        f"accuracy {b['pref_accuracy']:.2f} -> {a['pref_accuracy']:.2f}, dpo loss {b['dpo_loss']:.3f} -> {a['dpo_loss']:.3f}"
    )
