"""Deterministic, non-IID demo silos.

Three silos, each a different kind of task that SmolLM2-135M learns in tens of
LoRA steps on a CPU, so a federation visibly beats every silo training alone:

- ``clinic``: route a patient note to a hospital department (5 labels);
- ``bank``: categorise a card transaction (5 labels);
- ``lab``: rewrite a terse lab log entry as one plain sentence (a free-text answer: exact
  match needs every character right, ROUGE-L and chrF give partial credit).

Each silo gets its own train file, validation file and holdout; ``union_eval.jsonl`` holds all
holdouts together (``union_val.jsonl`` the validation files). The entities (symptoms, merchants,
cities, analytes) and the phrasings (templates) are split three ways, so the holdout uses entities
and phrasings no training record has: it measures generalisation, not the recall of a template.
``--scale`` grows the training sets (``REALISTIC_SCALE``: ≥ 1,000 records per silo). Nothing here
is private data: the records are synthetic.

A fourth, preference silo (``prefs``, written by ``silotune make-demo-data``
beside the others but not part of the default demo federation) holds (prompt, chosen, rejected) pairs for DPO:
a triage desk that prefers the correct department, stated plainly, over a wrong
department or an unhelpful refusal; its holdout pairs never share a prompt
with training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Record = dict[str, str]
Split = Literal["train", "val", "holdout"]
SPLITS: tuple[Split, ...] = ("train", "val", "holdout")


def _part(pool: Sequence[str], split: Split) -> list[str]:
    """A fixed three-way partition of a pool: 3 of every 5 items train, 1 validation, 1 holdout.

    Entities and phrasings are split this way, so the holdout tests generalisation to entities and
    phrasings no training record uses, and the validation split (for choosing hyper-parameters) is
    disjoint from both.
    """
    slots = {"train": (0, 1, 2), "val": (3,), "holdout": (4,)}[split]
    return [x for i, x in enumerate(pool) if i % 5 in slots]


_DEPARTMENTS = {
    "cardiology": [
        "chest pain",
        "palpitations",
        "an irregular heartbeat",
        "high blood pressure",
        "swollen ankles and breathlessness",
        "tightness in the chest on exertion",
        "fainting during exercise",
        "a racing pulse at rest",
        "pain spreading to the left arm",
        "shortness of breath when lying flat",
    ],
    "neurology": [
        "a migraine",
        "numbness in the left hand",
        "a seizure",
        "memory loss",
        "double vision",
        "slurred speech",
        "a tremor in the right hand",
        "sudden weakness on one side",
        "tingling in both feet",
        "recurring dizzy spells",
    ],
    "orthopedics": [
        "a broken wrist",
        "knee swelling",
        "back pain after lifting",
        "a sprained ankle",
        "a stiff shoulder",
        "hip pain when walking",
        "a dislocated finger",
        "neck pain after a fall",
        "a torn ligament in the knee",
        "a fractured collarbone",
    ],
    "dermatology": [
        "an itchy rash",
        "a mole that changed colour",
        "severe acne",
        "eczema on the arms",
        "a skin infection",
        "scaly patches on the elbows",
        "hives after eating",
        "a wart on the foot",
        "hair loss in patches",
        "a blistering sunburn",
    ],
    "gastroenterology": [
        "stomach cramps",
        "heartburn",
        "nausea after meals",
        "blood in the stool",
        "chronic diarrhea",
        "persistent bloating",
        "difficulty swallowing",
        "yellowing of the eyes",
        "vomiting after fatty food",
        "constipation for weeks",
    ],
}
_NOTE_TEMPLATES = [
    "{age}-year-old {sex} with {sym} for {dur}.",
    "Patient ({sex}, {age}) reports {sym}, ongoing for {dur}.",
    "{sex_cap}, age {age}: {sym} since {dur} ago.",
    "Referral: {sym}; {age} y/o {sex}; duration {dur}.",
    "Triage note - {sym}. {sex_cap}, {age}. Started {dur} ago.",
    "Seen today: {sex} aged {age}, complaining of {sym} ({dur}).",
    "GP letter: this {age}-year-old {sex} has had {sym} for about {dur}.",
    "Walk-in, {sex}, {age} years. Chief complaint: {sym}, {dur}.",
    "{sex_cap} patient, {age}, presents with {sym} lasting {dur}.",
    "Phone consult: {sym} for {dur} in a {sex} of {age}.",
]
_DURATIONS = ["two days", "a week", "three weeks", "a month", "six hours", "ten days", "a year"]
_CATEGORIES = {
    "dining": [
        "STARBUCKS",
        "MCDONALDS",
        "PIZZA HUT",
        "CHIPOTLE",
        "SUBWAY",
        "DOMINOS",
        "TACO BELL",
        "PANERA BREAD",
        "DUNKIN",
        "SHAKE SHACK",
    ],
    "groceries": [
        "WHOLE FOODS",
        "KROGER",
        "ALDI",
        "SAFEWAY",
        "TRADER JOES",
        "PUBLIX",
        "WEGMANS",
        "COSTCO WHSE",
        "FOOD LION",
        "SPROUTS FARMERS",
    ],
    "transport": [
        "UBER TRIP",
        "SHELL OIL",
        "AMTRAK",
        "DELTA AIR",
        "CITY PARKING",
        "LYFT RIDE",
        "CHEVRON",
        "GREYHOUND",
        "UNITED AIRLINES",
        "METRO TRANSIT",
    ],
    "utilities": [
        "CITY ELECTRIC",
        "WATER DEPT",
        "COMCAST",
        "VERIZON WIRELESS",
        "GAS UTILITY",
        "AT&T BILL",
        "DUKE ENERGY",
        "SEWER SERVICES",
        "SPECTRUM INTERNET",
        "T-MOBILE",
    ],
    "entertainment": [
        "NETFLIX",
        "SPOTIFY",
        "AMC THEATRES",
        "STEAM GAMES",
        "TICKETMASTER",
        "HULU",
        "DISNEY PLUS",
        "REGAL CINEMAS",
        "XBOX LIVE",
        "LIVE NATION",
    ],
}
_TX_TEMPLATES = [
    "POS {code} {merchant} {city} {amount} USD",
    "CARD PURCHASE {merchant} #{code} {amount}",
    "{merchant} {city} REF{code} AMT {amount}",
    "DEBIT {amount} {merchant} {city} TRX {code}",
    "{city} {merchant} *{code} ${amount}",
    "VISA {merchant} {code} {city} {amount}",
    "ONLINE PMT {merchant} ID{code} {amount} USD",
    "{merchant}/{city}/{code}/{amount}",
    "PURCHASE AUTH {code} {merchant} AMOUNT {amount}",
    "{amount} USD AT {merchant} ({city}) #{code}",
]
_CITIES = [
    "SEATTLE",
    "BOSTON",
    "DENVER",
    "AUSTIN",
    "CHICAGO",
    "MIAMI",
    "PORTLAND",
    "ATLANTA",
    "PHOENIX",
    "DALLAS",
]
# The lab silo rewrites a terse log entry as one plain sentence: a free-text answer, so partial
# credit (ROUGE-L, chrF) carries signal beside exact match.
_ANALYTES = [
    "potassium",
    "sodium",
    "glucose",
    "creatinine",
    "haemoglobin",
    "calcium",
    "cholesterol",
    "vitamin D",
    "ferritin",
    "TSH",
    "magnesium",
    "albumin",
    "platelets",
    "urea",
    "bilirubin",
]
_FLAGS = {
    "H": "above the normal range",
    "L": "below the normal range",
    "N": "within the normal range",
    "C": "critically abnormal; call the ward now",
    "X": "not reportable because the sample was haemolysed; collect a new sample",
}
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
_LAB_TEMPLATES = [
    "{pid} | {analyte} | {flag} | {date}",
    "pt={pid}; test={analyte}; flag={flag}; collected {date}",
    "{date} {analyte} [{flag}] patient {pid}",
    "RESULT {analyte} PT {pid} FLAG {flag} DATE {date}",
    "{analyte} for #{pid} on {date}: flag {flag}",
    "patient {pid} / {analyte} / {date} / {flag}",
    "LAB {date} :: {pid} :: {analyte} :: {flag}",
    "{flag}-flagged {analyte}, pt {pid}, drawn {date}",
    "Analyte {analyte} (patient {pid}) {date} status {flag}",
    "{pid}-{analyte}-{flag}-{date}",
]


def _clinic(rng: random.Random, split: Split = "train") -> Record:
    dept = rng.choice(sorted(_DEPARTMENTS))
    sex = rng.choice(["male", "female"])
    note = rng.choice(_part(_NOTE_TEMPLATES, split)).format(
        age=rng.randint(18, 90),
        sex=sex,
        sex_cap=sex.capitalize(),
        sym=rng.choice(_part(_DEPARTMENTS[dept], split)),
        dur=rng.choice(_DURATIONS),
    )
    return {
        "instruction": f"Route this patient note to a hospital department.\nNote: {note}",
        "response": dept,
    }


def _bank(rng: random.Random, split: Split = "train") -> Record:
    cat = rng.choice(sorted(_CATEGORIES))
    tx = rng.choice(_part(_TX_TEMPLATES, split)).format(
        code=rng.randint(1000, 9999),
        merchant=rng.choice(_part(_CATEGORIES[cat], split)),
        city=rng.choice(_part(_CITIES, split)),
        amount=f"{rng.uniform(2, 400):.2f}",
    )
    return {"instruction": f"Categorise this card transaction.\nTransaction: {tx}", "response": cat}


def _lab(rng: random.Random, split: Split = "train") -> Record:
    pid = rng.randint(1000, 9999)
    analyte = rng.choice(_part(_ANALYTES, split))
    flag = rng.choice(sorted(_FLAGS))
    y, m, d = rng.randint(2019, 2025), rng.randint(1, 12), rng.randint(1, 28)
    entry = rng.choice(_part(_LAB_TEMPLATES, split)).format(
        pid=pid, analyte=analyte, flag=flag, date=f"{y}-{m:02d}-{d:02d}"
    )
    return {
        "instruction": f"Rewrite this lab log entry as one plain sentence for the chart.\nEntry: {entry}",
        "response": f"The {analyte} result of patient {pid} on {d} {_MONTHS[m - 1]} {y} was {_FLAGS[flag]}.",
    }


_REFUSALS = [
    "I am not able to help with medical questions. Please consult a doctor.",
    "Sorry, I cannot route patient notes.",
    "That depends on many factors; it is hard to say.",
]


def _preference(rng: random.Random, split: Split = "train") -> Record:
    rec = _clinic(rng, split)
    right = rec["response"]
    if rng.random() < 0.5:
        rejected = rng.choice([d for d in sorted(_DEPARTMENTS) if d != right])
    else:
        rejected = rng.choice(_REFUSALS)
    return {"prompt": rec["instruction"], "chosen": right, "rejected": rejected}


PREFERENCE_SILO = "prefs"
FREE_TEXT_SILOS = ("lab",)


@dataclass(frozen=True)
class DemoSilo:
    name: str
    make: Callable[[random.Random, Split], Record]
    train_size: int
    eval_size: int


DEMO_SILOS = (
    DemoSilo("clinic", _clinic, 160, 40),
    DemoSilo("bank", _bank, 120, 40),
    DemoSilo("lab", _lab, 100, 40),
)
# ``--scale`` that gives every demo silo at least 1,000 training records.
REALISTIC_SCALE = 10.0


def _write_jsonl(path: Path, records: list[Record]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def _draw(
    make: Callable[[random.Random, Split], Record],
    rng: random.Random,
    split: Split,
    n: int,
    seen: set[str],
    key: str,
) -> list[Record]:
    """``n`` records of ``split`` whose ``key`` differs from every record drawn before (``seen``)."""
    out: list[Record] = []
    tries = 0
    while len(out) < n:
        r = make(rng, split)
        tries += 1
        if r[key] not in seen:
            seen.add(r[key])
            out.append(r)
        elif tries > 100 * n:
            raise ValueError(f"cannot draw {n} distinct {split} records")
    return out


def make_demo_silos(
    out_dir: str | Path, *, seed: int = 0, scale: float = 1.0, preferences: bool = False
) -> dict[str, dict[str, Path]]:
    """Write each silo's ``train.jsonl``, ``val.jsonl`` and ``eval.jsonl`` (the holdout), plus
    ``union_eval.jsonl`` and ``union_val.jsonl``.

    ``scale`` multiplies the training set (``REALISTIC_SCALE`` gives every silo at least 1,000
    records); the validation and holdout sets grow with it up to their base size. Training,
    validation and holdout records use disjoint entities and phrasings (see :func:`_part`), and no
    two records share an instruction. With ``preferences`` the preference silo ``prefs`` is written
    too (its own RNG stream: the other silos' files are the same either way; it is not in the unions).

    The same seed always gives byte-identical files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, Path]] = {}
    union: dict[str, list[Record]] = {"eval": [], "val": []}
    for i, silo in enumerate(DEMO_SILOS):
        rng = random.Random(seed * 1000 + i)
        n_train = max(4, int(silo.train_size * scale))
        n_eval = max(4, int(silo.eval_size * min(scale, 1.0)))
        seen: set[str] = set()
        train = _draw(silo.make, rng, "train", n_train, seen, "instruction")
        val = _draw(silo.make, rng, "val", n_eval, seen, "instruction")
        holdout = _draw(silo.make, rng, "holdout", n_eval, seen, "instruction")
        d = out / silo.name
        d.mkdir(exist_ok=True)
        _write_jsonl(d / "train.jsonl", train)
        _write_jsonl(d / "val.jsonl", val)
        _write_jsonl(d / "eval.jsonl", holdout)
        union["eval"].extend({**r, "silo": silo.name} for r in holdout)
        union["val"].extend({**r, "silo": silo.name} for r in val)
        paths[silo.name] = {"train": d / "train.jsonl", "val": d / "val.jsonl", "eval": d / "eval.jsonl"}
    _write_jsonl(out / "union_eval.jsonl", union["eval"])
    _write_jsonl(out / "union_val.jsonl", union["val"])
    if preferences:
        paths[PREFERENCE_SILO] = make_preference_silo(out / PREFERENCE_SILO, seed=seed, scale=scale)
    return paths


def make_preference_silo(
    out_dir: str | Path, *, seed: int = 0, scale: float = 1.0, train_size: int = 300, eval_size: int = 60
) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` of preference pairs (byte-identical for a seed); the
    holdout's notes use unseen symptoms and phrasings."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed * 1000 + 101)
    seen: set[str] = set()
    train = _draw(_preference, rng, "train", max(4, int(train_size * scale)), seen, "prompt")
    holdout = _draw(_preference, rng, "holdout", max(4, int(eval_size * min(scale, 1.0))), seen, "prompt")
    _write_jsonl(d / "train.jsonl", train)
    _write_jsonl(d / "eval.jsonl", holdout)
    return {"train": d / "train.jsonl", "eval": d / "eval.jsonl"}
