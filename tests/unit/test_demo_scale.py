"""The scaled demo data: enough records, non-IID, and a holdout of unseen entities and phrasings."""

from __future__ import annotations

import json
from pathlib import Path

from silotune.demo import _CATEGORIES, _DEPARTMENTS, REALISTIC_SCALE, _part, make_demo_silos


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scaled_demo_data_has_1000_records_per_silo_and_a_holdout_of_unseen_entities(tmp_path: Path) -> None:
    paths = make_demo_silos(tmp_path, seed=0, scale=REALISTIC_SCALE)
    for silo, p in paths.items():
        train, val, held = (_rows(p[k]) for k in ("train", "val", "eval"))
        assert len(train) >= 1000, silo
        ins = [{r["instruction"] for r in rows} for rows in (train, val, held)]
        assert not ins[0] & ins[1] and not ins[0] & ins[2] and not ins[1] & ins[2]
    # Unseen entities: no holdout symptom or merchant appears in any training record.
    clinic_train = " ".join(r["instruction"] for r in _rows(paths["clinic"]["train"]))
    for syms in _DEPARTMENTS.values():
        for sym in _part(syms, "holdout"):
            assert f" {sym} " not in clinic_train and f" {sym}," not in clinic_train, sym
    bank_train = " ".join(r["instruction"] for r in _rows(paths["bank"]["train"]))
    for merchants in _CATEGORIES.values():
        assert not any(m in bank_train for m in _part(merchants, "holdout"))
    # Non-IID: each silo its own task; the lab silo's answers are free text (sentences).
    labels = {s: {r["response"] for r in _rows(paths[s]["train"])} for s in paths}
    assert labels["clinic"] == set(_DEPARTMENTS) and labels["bank"] == set(_CATEGORIES)
    assert all(len(a.split()) >= 8 for a in labels["lab"])
    union = (tmp_path / "union_eval.jsonl").read_text().splitlines()
    assert len(union) == sum(len(_rows(p["eval"])) for p in paths.values())
