"""Session reporting for the unit tests (reports only: every collected test asserts something)."""

from __future__ import annotations

from typing import Any

CONTRACT = "test_methods_contract.py::test_method_contract_one_federated_round["


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Per-method runtime of the method contract's federated round (the test's call phase)."""
    reports = [
        r for r in terminalreporter.stats.get("passed", []) if r.when == "call" and CONTRACT in r.nodeid
    ]
    if not reports:
        return
    terminalreporter.write_sep("-", "method contract (tiny model, 2 silos × 6 steps, one round)")
    for r in sorted(reports, key=lambda r: r.nodeid):
        method = r.nodeid.split(CONTRACT, 1)[1].rstrip("]")
        terminalreporter.write_line(f"  {method:<14} {r.duration:6.2f} s")
