"""Deterministic, non-IID demo silos.

Three silos, each a different kind of task that SmolLM2-135M learns in tens of
LoRA steps on a CPU, so a federation visibly beats every silo training alone:

- ``clinic``: route a patient note to a hospital department (5 labels);
- ``bank``: categorise a card transaction (5 labels);
- ``lab``: normalise a sample label into a canonical id (a copy-and-reformat
  generation task, so exact match needs every character right).

Each silo gets its own train file and holdout; ``union_eval.jsonl`` holds all
holdouts together. Nothing here is private data: the records are synthetic.

A fourth, preference silo (``prefs``, written by ``silotune make-demo-data``
beside the others but not part of the default demo federation) holds (prompt, chosen, rejected) pairs for DPO:
a triage desk that prefers the correct department, stated plainly, over a wrong
department or an unhelpful refusal; its holdout pairs never share a prompt
with training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Record = dict[str, str]

_DEPARTMENTS = {
    "cardiology": [
        "chest pain",
        "palpitations",
        "an irregular heartbeat",
        "high blood pressure",
        "swollen ankles and breathlessness",
    ],
    "neurology": ["a migraine", "numbness in the left hand", "a seizure", "memory loss", "double vision"],
    "orthopedics": [
        "a broken wrist",
        "knee swelling",
        "back pain after lifting",
        "a sprained ankle",
        "a stiff shoulder",
    ],
    "dermatology": [
        "an itchy rash",
        "a mole that changed colour",
        "severe acne",
        "eczema on the arms",
        "a skin infection",
    ],
    "gastroenterology": [
        "stomach cramps",
        "heartburn",
        "nausea after meals",
        "blood in the stool",
        "chronic diarrhea",
    ],
}
_NOTE_TEMPLATES = [
    "{age}-year-old {sex} with {sym} for {dur}.",
    "Patient ({sex}, {age}) reports {sym}, ongoing for {dur}.",
    "{sex_cap}, age {age}: {sym} since {dur} ago.",
    "Referral: {sym}; {age} y/o {sex}; duration {dur}.",
]
_CATEGORIES = {
    "dining": ["STARBUCKS", "MCDONALDS", "PIZZA HUT", "CHIPOTLE", "SUBWAY"],
    "groceries": ["WHOLE FOODS", "KROGER", "ALDI", "SAFEWAY", "TRADER JOES"],
    "transport": ["UBER TRIP", "SHELL OIL", "AMTRAK", "DELTA AIR", "CITY PARKING"],
    "utilities": ["CITY ELECTRIC", "WATER DEPT", "COMCAST", "VERIZON WIRELESS", "GAS UTILITY"],
    "entertainment": ["NETFLIX", "SPOTIFY", "AMC THEATRES", "STEAM GAMES", "TICKETMASTER"],
}
_TX_TEMPLATES = [
    "POS {code} {merchant} {city} {amount} USD",
    "CARD PURCHASE {merchant} #{code} {amount}",
    "{merchant} {city} REF{code} AMT {amount}",
]
_CITIES = ["SEATTLE", "BOSTON", "DENVER", "AUSTIN", "CHICAGO", "MIAMI"]
_TUBES = ["a", "b", "c", "d", "e"]


def _clinic(rng: random.Random) -> Record:
    dept = rng.choice(sorted(_DEPARTMENTS))
    sex = rng.choice(["male", "female"])
    note = rng.choice(_NOTE_TEMPLATES).format(
        age=rng.randint(18, 90),
        sex=sex,
        sex_cap=sex.capitalize(),
        sym=rng.choice(_DEPARTMENTS[dept]),
        dur=rng.choice(["two days", "a week", "three weeks", "a month", "six hours"]),
    )
    return {
        "instruction": f"Route this patient note to a hospital department.\nNote: {note}",
        "response": dept,
    }


def _bank(rng: random.Random) -> Record:
    cat = rng.choice(sorted(_CATEGORIES))
    tx = rng.choice(_TX_TEMPLATES).format(
        code=rng.randint(1000, 9999),
        merchant=rng.choice(_CATEGORIES[cat]),
        city=rng.choice(_CITIES),
        amount=f"{rng.uniform(2, 400):.2f}",
    )
    return {"instruction": f"Categorise this card transaction.\nTransaction: {tx}", "response": cat}


def _lab(rng: random.Random) -> Record:
    patient = rng.randint(1000, 9999)
    tube = rng.choice(_TUBES)
    y, m, d = rng.randint(2019, 2025), rng.randint(1, 12), rng.randint(1, 28)
    label = rng.choice(
        [
            f"tube {tube} / patient {patient} / {y}-{m:02d}-{d:02d}",
            f"patient {patient}, tube {tube}, drawn {y}-{m:02d}-{d:02d}",
            f"{y}-{m:02d}-{d:02d} | tube {tube} | patient {patient}",
        ]
    )
    return {
        "instruction": f"Normalise this sample label to PATIENT-TUBE-DATE.\nLabel: {label}",
        "response": f"{patient}-{tube.upper()}-{y}{m:02d}{d:02d}",
    }


_REFUSALS = [
    "I am not able to help with medical questions. Please consult a doctor.",
    "Sorry, I cannot route patient notes.",
    "That depends on many factors; it is hard to say.",
]


def _preference(rng: random.Random) -> Record:
    rec = _clinic(rng)
    right = rec["response"]
    if rng.random() < 0.5:
        rejected = rng.choice([d for d in sorted(_DEPARTMENTS) if d != right])
    else:
        rejected = rng.choice(_REFUSALS)
    return {"prompt": rec["instruction"], "chosen": right, "rejected": rejected}


PREFERENCE_SILO = "prefs"


@dataclass(frozen=True)
class DemoSilo:
    name: str
    make: Callable[[random.Random], Record]
    train_size: int
    eval_size: int


DEMO_SILOS = (
    DemoSilo("clinic", _clinic, 160, 40),
    DemoSilo("bank", _bank, 120, 40),
    DemoSilo("lab", _lab, 100, 40),
)


def _write_jsonl(path: Path, records: list[Record]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def make_demo_silos(
    out_dir: str | Path, *, seed: int = 0, scale: float = 1.0, preferences: bool = False
) -> dict[str, dict[str, Path]]:
    """Write each silo's ``train.jsonl`` and ``eval.jsonl`` plus ``union_eval.jsonl``.

    With ``preferences`` the preference silo ``prefs`` is written too (its own RNG
    stream: the other silos' files are the same either way; it is not in the union holdout).

    The same seed always gives byte-identical files. Holdout records are drawn
    until they differ from every training record of the silo.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, Path]] = {}
    union: list[Record] = []
    for i, silo in enumerate(DEMO_SILOS):
        rng = random.Random(seed * 1000 + i)
        n_train = max(4, int(silo.train_size * scale))
        n_eval = max(4, int(silo.eval_size * scale))
        train = [silo.make(rng) for _ in range(n_train)]
        seen = {r["instruction"] for r in train}
        holdout: list[Record] = []
        while len(holdout) < n_eval:
            r = silo.make(rng)
            if r["instruction"] not in seen:
                seen.add(r["instruction"])
                holdout.append(r)
        d = out / silo.name
        d.mkdir(exist_ok=True)
        _write_jsonl(d / "train.jsonl", train)
        _write_jsonl(d / "eval.jsonl", holdout)
        union.extend({**r, "silo": silo.name} for r in holdout)
        paths[silo.name] = {"train": d / "train.jsonl", "eval": d / "eval.jsonl"}
    _write_jsonl(out / "union_eval.jsonl", union)
    if preferences:
        paths[PREFERENCE_SILO] = make_preference_silo(out / PREFERENCE_SILO, seed=seed, scale=scale)
    return paths


def make_preference_silo(
    out_dir: str | Path, *, seed: int = 0, scale: float = 1.0, train_size: int = 300, eval_size: int = 60
) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` of preference pairs (byte-identical for a seed)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed * 1000 + 101)
    train = [_preference(rng) for _ in range(max(4, int(train_size * scale)))]
    seen = {r["prompt"] for r in train}
    holdout: list[Record] = []
    while len(holdout) < max(4, int(eval_size * scale)):
        r = _preference(rng)
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            holdout.append(r)
    _write_jsonl(d / "train.jsonl", train)
    _write_jsonl(d / "eval.jsonl", holdout)
    return {"train": d / "train.jsonl", "eval": d / "eval.jsonl"}
