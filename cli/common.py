"""What every command group shares: the console, failing with a message, loading a config, and the
offline environment set before any command runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

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
