"""SIGTERM and SIGINT stop a long command cleanly: one line, exit 130, nothing half-written."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

# A long command in miniature: store writes of 4 MiB objects in a loop, inside Prefect's SIGTERM bridge
# (what a flow run installs), under the command line's signal handling.
SCRIPT = """
import importlib.util, os
from pathlib import Path
import typer
from prefect.utilities.engine import capture_sigterm
from cli.common import stop_on_signals
# The store's module file on its own: the silotune.store package imports torch (seconds to start).
spec = importlib.util.spec_from_file_location("local_store", "silotune/store/local.py")
local_store = importlib.util.module_from_spec(spec)
spec.loader.exec_module(local_store)
LocalStore = local_store.LocalStore

def main(root: str) -> None:
    store = LocalStore(Path(root))
    with stop_on_signals("the test loop"), capture_sigterm():
        print("ready", flush=True)
        i = 0
        while True:
            store.put(f"obj/{i % 3}", os.urandom(4 << 20))
            i += 1

typer.run(main)
"""


def test_sigterm_stops_the_command_in_one_line_with_whole_files(tmp_path: Path) -> None:
    """Before, Prefect's bridge re-sent SIGTERM to the default handler: killed mid-write (rc -15)."""
    sig = signal.SIGTERM  # SIGINT takes the same path (KeyboardInterrupt); one process start is enough
    args = [sys.executable, "-c", SCRIPT, str(tmp_path / "store")]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # some writes complete, one is (most likely) under way
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert f"stopped: the test loop interrupted by {sig.name}" in out
    assert "Traceback" not in out + err
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert files and all(p.stat().st_size == 4 << 20 for p in files), files  # no temporary file left
