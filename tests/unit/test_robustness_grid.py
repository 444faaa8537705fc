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
