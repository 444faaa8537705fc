"""The robustness grid's configs, table and plot (no training)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from silotune.robustness import (
    ALL_ATTACKS,
    MALICIOUS,
    PRESETS,
    GridRow,
    best_robust,
    grid_configs,
    to_csv,
    to_markdown,
    write_results,
)


def test_grid_configs_have_four_silos_and_one_attacker(tmp_path: Path) -> None:
    cells = grid_configs(
        tmp_path,
        model="tiny-llama",
        preset=PRESETS["tiny-llama"],
        attacks=ALL_ATTACKS,
        rules=["fedavg", "fltrust", "multi_krum"],
    )
    assert len(cells) == len(ALL_ATTACKS) * 3
    for cell in cells:
        cfg = cell.config
        assert [s.name for s in cfg.silos] == ["clinic", "bank", "lab", MALICIOUS]
        honest = [s for s in cfg.silos if s.name != MALICIOUS]
        assert all(s.attack is None and s.poison is None and s.eval_path for s in honest)
        mallory = cfg.silo(MALICIOUS)
        assert mallory.eval_path is None
        assert (mallory.attack is not None or mallory.poison is not None) == (cell.attack != "none")
        assert (cfg.aggregation.root_data_path is not None) == (cell.rule == "fltrust")
    ids = [c.config.federation_id for c in cells]
    assert len(set(ids)) == len(ids)
    # The malicious silo holds the other half of the clinic data: disjoint from the honest clinic silo.
    clinic = Path(cells[0].config.silo("clinic").train_path).read_text().splitlines()
    mal = Path(cells[0].config.silo(MALICIOUS).train_path).read_text().splitlines()
    assert clinic and mal and not set(clinic) & set(mal)


def rows() -> list[GridRow]:
    def r(attack: str, rule: str, loss: float, em: float, **kw) -> GridRow:
        return GridRow(attack, rule, loss, em, 5.0, 4, 0, 2, 2, **kw)

    return [
        r("none", "fedavg", 1.0, 0.50),
        r("none", "median", 1.1, 0.49),
        r("scale", "fedavg", 3.0, 0.10),
        r("scale", "median", 1.2, 0.49),
        r(
            "backdoor",
            "fedavg",
            1.0,
            0.5,
            backdoor_success=0.8,
            backdoor_false_trigger=0.0,
            backdoor_target_loss=0.1,
        ),
    ]


def test_csv_and_markdown_report_the_change_against_clean_fedavg() -> None:
    table = list(csv.DictReader(io.StringIO(to_csv(rows()))))
    scale_fedavg = next(t for t in table if t["attack"] == "scale" and t["rule"] == "fedavg")
    assert float(scale_fedavg["delta_loss_vs_clean"]) == pytest.approx(2.0)
    assert float(scale_fedavg["delta_em_points_vs_clean"]) == pytest.approx(-40.0)
    assert best_robust(rows(), "scale").rule == "median"
    md = to_markdown(rows(), title="t", notes=["a note"])
    assert "| scale | 3.000 (+2.000) | -40.0 | median | 1.200 (+0.200) | -1.0 |" in md
    assert "| backdoor | fedavg | 80.0 | 0.0 | 0.100 |" in md
    assert md.rstrip().endswith("- a note")


def test_write_results_writes_every_file(tmp_path: Path) -> None:
    paths = write_results(rows(), tmp_path, title="t")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert paths["csv"].read_text().startswith("attack,rule,union_loss")
    assert set(paths) == {"csv", "markdown", "png", "json"}


def test_rows_round_trip_through_grid_json(tmp_path: Path) -> None:
    import json

    from silotune.robustness import rows_from_records, table_records

    paths = write_results(rows(), tmp_path, title="t")
    again = rows_from_records(json.loads(paths["json"].read_text()))
    assert table_records(again) == table_records(rows())


def test_best_robust_rule_is_chosen_by_exact_match_and_worst_case_per_rule_is_reported() -> None:
    from silotune.robustness import attack_overrides, worst_case_by_rule

    def r(attack: str, rule: str, loss: float, em: float) -> GridRow:
        return GridRow(attack, rule, loss, em, 5.0, 4, 0, 1, 1)

    grid = [
        r("none", "fedavg", 1.0, 0.40),
        r("sign_flip", "fedavg", 5.0, 0.0),
        r("sign_flip", "median", 0.9, 0.20),  # lower loss, lower exact match
        r("sign_flip", "fltrust", 1.1, 0.41),
        r("scale", "median", 1.2, 0.35),
        r("scale", "fltrust", 1.3, 0.39),
    ]
    assert best_robust(grid, "sign_flip").rule == "fltrust"
    assert best_robust(grid, "sign_flip", metric="union_loss").rule == "median"
    worst = {
        rule: (lo.attack, hi.attack) for rule, lo, hi in worst_case_by_rule(grid, ["sign_flip", "scale"])
    }
    assert worst == {
        "fedavg": ("sign_flip", "sign_flip"),
        "median": ("sign_flip", "scale"),
        "fltrust": ("scale", "scale"),
    }
    md = to_markdown(grid, title="t")
    assert "| fltrust | 39.0 (-1.0) | scale | 1.300 (+0.300) | scale |" in md
    boost = attack_overrides("backdoor_boost", gaussian_std=0.1)
    assert boost["attack"]["name"] == "scale" and boost["poison"]["backdoor_trigger"]
