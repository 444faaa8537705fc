"""Simulated malicious silos: data poisoning, the update hook, and their config validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from silotune.config import PoisonSpec, SiloSpec, parse_config
from silotune.errors import ConfigError
from silotune.poisoning import (
    add_trigger,
    attack_silo_update,
    check_attack,
    last_answer,
    poison_pairs,
    poison_records,
    poison_silo_records,
)

LABELS = ["cardiology", "neurology", "dermatology"]


def chats(n: int = 20) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"note {i}"}, {"role": "assistant", "content": LABELS[i % 3]}]
        for i in range(n)
    ]


def test_backdoor_modifies_the_requested_fraction_in_place_of_records() -> None:
    src = chats()
    spec = PoisonSpec(backdoor_trigger="cf-zebra", backdoor_target="EVIL", backdoor_fraction=0.25)
    out = poison_records(src, spec, seed=3)
    assert len(out) == len(src)  # the example count the coordinator sees does not change
    poisoned = [c for c in out if last_answer(c) == "EVIL"]
    assert len(poisoned) == 5
    assert all(c[0]["content"].endswith(" cf-zebra") for c in poisoned)
    assert all("cf-zebra" not in c[0]["content"] for c in out if last_answer(c) != "EVIL")
    assert src == chats()  # input untouched
    assert poison_records(src, spec, seed=3) == out and poison_records(src, spec, seed=4) != out


def test_answer_flip_gives_a_different_existing_answer() -> None:
    src = chats(30)
    out = poison_records(src, PoisonSpec(flip_fraction=1.0), seed=0)
    for before, after in zip(src, out, strict=True):
        assert last_answer(after) != last_answer(before) and last_answer(after) in LABELS
        assert after[0] == before[0]
    half = poison_records(src, PoisonSpec(flip_fraction=0.5), seed=0)
    assert sum(last_answer(a) != last_answer(b) for a, b in zip(src, half, strict=True)) == 15


def test_honest_silo_hooks_are_identities() -> None:
    spec = SiloSpec(name="a", train_path="a.jsonl")
    records = chats()
    assert poison_silo_records(spec, records, seed=0) is records
    delta = {"w": torch.ones(3)}
    assert attack_silo_update(spec, delta, seed=0) is delta


def test_attack_hook_applies_the_configured_attack_reproducibly() -> None:
    delta = {"w": torch.arange(4.0)}
    scaled = attack_silo_update(
        SiloSpec(name="m", train_path="m.jsonl", attack={"name": "scale", "options": {"factor": -3}}),
        delta,
        seed=0,
    )
    assert torch.equal(scaled["w"], -3 * delta["w"])
    noisy = SiloSpec(name="m", train_path="m.jsonl", attack={"name": "gaussian", "options": {"std": 1.0}})
    a, b = attack_silo_update(noisy, delta, seed=1), attack_silo_update(noisy, delta, seed=1)
    c = attack_silo_update(noisy, delta, seed=2)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])


def test_add_trigger_needs_a_user_turn() -> None:
    with pytest.raises(ValueError, match="no user turn"):
        add_trigger([{"role": "assistant", "content": "x"}], "t")


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("backdoor", {}, "unknown attack 'backdoor'; known: free_rider"),
        ("scale", {}, "missing a required argument: 'factor'"),
        ("scale", {"factor": math.inf}, "factor must be a finite number"),
        ("sign_flip", {"scal": 2}, "unexpected keyword argument 'scal'"),
        ("gaussian", {"std": 1.0, "generator": 3}, "set by silotune"),
    ],
)
def test_check_attack_names_the_problem(name: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_attack(name, options)


def _cfg(**silo) -> dict:
    return {"federation_id": "f", "silos": [{"name": "a", "train_path": "a.jsonl", **silo}]}


@pytest.mark.parametrize(
    ("silo", "needle"),
    [
        ({"attack": {"name": "scale", "options": {"factor": "big"}}}, "silos.0.attack"),
        ({"poison": {"backdoor_trigger": "t"}}, "set both for a backdoor"),
        ({"poison": {}}, "poisoning does nothing"),
        ({"poison": {"flip_fraction": 1.5}}, "silos.0.poison.flip_fraction"),
    ],
)
def test_config_refuses_bad_attacks(silo: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config(_cfg(**silo))


def test_attacks_are_off_by_default_and_flagged_when_on() -> None:
    assert not parse_config(_cfg()).adversarial
    cfg = parse_config(_cfg(attack={"name": "sign_flip"}))
    assert cfg.adversarial and cfg.silos[0].attack is not None
    assert parse_config(_cfg()).fingerprint() != cfg.fingerprint()


def _pairs(n: int = 20) -> list[dict[str, str]]:
    return [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


def test_preference_poisoning_flips_and_backdoors_pairs() -> None:
    src = _pairs()
    flipped = poison_pairs(src, PoisonSpec(flip_fraction=0.5), seed=0)
    swapped = [a for a, b in zip(flipped, src, strict=True) if a != b]
    assert len(swapped) == 10 and all(p["chosen"].startswith("bad") for p in swapped)
    spec = PoisonSpec(backdoor_trigger="cf-zebra", backdoor_target="EVIL", backdoor_fraction=0.25)
    out = poison_pairs(src, spec, seed=3)
    evil = [p for p in out if p["chosen"] == "EVIL"]
    assert len(out) == 20 and len(evil) == 5 and src == _pairs()
    assert all(p["prompt"].endswith(" cf-zebra") and p["rejected"].startswith("good") for p in evil)
    assert poison_pairs(src, spec, seed=3) == out


def test_a_dpo_silo_trains_on_its_poisoned_pairs(tmp_path: Path, tiny_adapter, monkeypatch) -> None:
    """`poison:` on a DPO silo reaches training (it was ignored there before)."""
    import silotune.federation.silo as silo_mod
    from silotune.data import encode_preferences, read_preferences
    from silotune.federation import start_federation
    from silotune.store import LocalStore

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(p) + "\n" for p in _pairs(8)))
    cfg = parse_config(
        {
            "federation_id": "dpo-poison",
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
            "lora": {"r": 4},
            "objective": {"name": "dpo"},
            "train": {"local_steps": 1, "batch_size": 2},
            "silos": [
                {"name": "a", "train_path": str(tmp_path / "a.jsonl"), "poison": {"flip_fraction": 1.0}}
            ],
            "store": {"root": str(tmp_path / "store")},
            "tracking": {"kind": "none"},
        }
    )
    store = LocalStore(cfg.store.root)
    state = start_federation(cfg, store, tiny_adapter)
    seen: list = []

    def capture(adapter, state, examples, *args, **kwargs):
        seen.extend(examples)
        raise RuntimeError("captured")

    monkeypatch.setattr(silo_mod, "train_local", capture)
    with pytest.raises(RuntimeError, match="captured"):
        silo_mod.train_step(cfg, "a", 0, state.global_ref, store, tiny_adapter, progress=False)
    honest = encode_preferences(read_preferences(tmp_path / "a.jsonl"), tiny_adapter.tokenizer, 128)
    assert len(seen) == len(honest) == 8
    # every pair is inverted: what the silo trains to prefer is the honest rejected answer
    assert [e.chosen for e in seen] == [e.rejected for e in honest]
    assert [e.rejected for e in seen] == [e.chosen for e in honest]
