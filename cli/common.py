"""What every command group shares: the console, failing with a message, loading a config, and the
offline environment set before any command runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.measure import Measurement

from silotune.errors import SilotuneError
from silotune.modeling import OFFLINE_ENV

console = Console()


def offline() -> None:
    """Nothing leaves the machine: no hub downloads, no telemetry (set before Prefect is imported)."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    # The embedded API starts in-process; on a busy 2-core machine its first start
    # (database migrations) can take longer than Prefect's default wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def fail(msg: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


def load_config_file(config: Path) -> Any:
    """A validated federation config, or exit 2 naming what is wrong."""
    from silotune.config import load_config  # imports torch (about 2 s): only for commands that read one

    try:
        return load_config(config)
    except SilotuneError as exc:
        fail(str(exc))


def print_table(table: Any) -> None:
    """Print a rich table whole: in a terminal at the terminal's width (rich wraps cells), else (a pipe,
    a file, a CI log) at the table's own full width, so no cell is cut to "…" at 80 columns."""
    if console.is_terminal:
        console.print(table)
        return
    needed = Measurement.get(console, console.options.update_width(100_000), table).maximum
    # Console.print caps width= at the console's width, so the whole table needs a console of its own
    Console(file=console.file, width=max(console.width, needed), no_color=console.no_color).print(table)
