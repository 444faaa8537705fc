"""Tables the command line prints are never cut to "…" when the output is not a terminal."""

from __future__ import annotations

from rich.table import Table

from cli.common import console, print_table


def test_a_wide_table_prints_whole_into_a_pipe(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    table = Table(title="Privacy ledger of fed")
    cells = [f"column-{i}-value-{'x' * 12}" for i in range(8)]  # ~8 × 28 columns: far wider than 80
    for i in range(8):
        table.add_column(f"heading {i}")
    table.add_row(*cells)
    assert not console.is_terminal
    print_table(table)
    out = capsys.readouterr().out
    assert "…" not in out
    for cell in cells:
        assert cell in out
