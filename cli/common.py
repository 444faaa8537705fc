"""What every command group shares: the console, failing with a message, loading a config, and the
offline environment set before any command runs."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
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
    # The demo's comparison and personalisation run library code outside any flow run: their log lines
    # belong on the console, not in a warning that Prefect could not send them to a run.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
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


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def stop_on_signals(what: str) -> Iterator[None]:
    """SIGTERM stops a long command as Ctrl-C (SIGINT) does: the stack unwinds, one line says so, exit 130.

    Inside a flow, Prefect swaps in its own SIGTERM handler (raising ``TerminationSignal``) and then
    re-sends the signal to the handler installed here, so both arrive as an exception, never as a kill
    in the middle of a write. What was written stays whole: the store writes each object to a temporary
    file and renames it, and the round commit is the last write of a round.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            name = str(exc) or "SIGINT"
        elif getattr(exc, "signal", None) == signal.SIGTERM:  # prefect.exceptions.TerminationSignal
            name = "SIGTERM"
        else:
            raise
        console.print(
            f"[bold red]stopped:[/] {what} interrupted by {name}; what it completed is stored whole, "
            "and running it again resumes"
        )
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
