"""Process supervision: ports, process groups, start-up waits and stops.

Every part of the stack runs in its own session (its own process group), so that stopping a part
stops everything it spawned: SIGTERM to the group, SIGKILL after a grace period. Each part logs to
``logs/<name>.log`` in the state folder and its pid is recorded in ``stack.json``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ops.state import REPO_ROOT, Stack, StackError
from silotune.modeling import OFFLINE_ENV


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def free_ports(names: Iterable[str]) -> dict[str, int]:
    """Distinct free ephemeral ports on 127.0.0.1 (for tests and side-by-side stacks)."""
    socks, out = [], {}
    try:
        for name in names:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            out[name] = s.getsockname()[1]
    finally:
        for s in socks:
            s.close()
    return out


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process counts as gone.
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) succeeds while zombies remain; look for a live member.
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().split(")")[-1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


_IDENTITY_VARS = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "MLFLOW_S3_ENDPOINT_URL",
        "PREFECT_API_URL",
        "PREFECT_API_KEY",
        "PREFECT_API_AUTH_STRING",
        "PREFECT_SERVER_API_AUTH_STRING",
        "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
        "PREFECT_HOME",
        "PREFECT_PROFILES_PATH",
        "PREFECT_API_SSL_CERT_FILE",
        "AWS_CA_BUNDLE",
        "MLFLOW_TRACKING_SERVER_CERT_PATH",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    }
)


def spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
    """Start ``cmd`` in a new session (its own process group) with stdout/stderr to logs/<name>.log."""
    stack.logs.mkdir(parents=True, exist_ok=True)
    log = open(stack.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child, closed below
    log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
    log.flush()
    # Who a process is (its S3 keys, its Prefect API and secret, where its results go) comes from the
    # stack alone, never from the caller's shell: a silo must not inherit the coordinator's settings.
    inherited = {k: v for k, v in os.environ.items() if k not in _IDENTITY_VARS}
    full_env = {**inherited, **OFFLINE_ENV, **env}
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(cwd or REPO_ROOT),
            # A new session: signals from the caller's terminal do not reach it, and SIGTERM to the group
            # reaches everything it spawns (no reliance on job control in the calling shell).
            start_new_session=True,
        )
    finally:
        log.close()
    stack.pids[name] = proc.pid
    stack.save()
    return proc.pid


def tail(path: Path, n: int = 30) -> str:
    """The last ``n`` lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_until(what: str, check: Any, timeout: float, stack: Stack, name: str, interval: float = 0.3) -> None:
    """Poll ``check()`` until it is true; StackError if part ``name`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        pid = stack.pids.get(name)
        if pid is not None and not alive(pid):
            raise StackError(
                f"{what} exited during start-up; log {stack.logs / name}.log:\n"
                f"{tail(stack.logs / f'{name}.log')}"
            )
        try:
            if check():
                return
        except Exception as exc:  # not ready yet
            last = exc
        time.sleep(interval)
    raise StackError(
        f"{what} not healthy after {timeout:.0f} s ({last}); log {stack.logs / name}.log:\n"
        f"{tail(stack.logs / f'{name}.log')}"
    )


def http_ok(url: str, ca: Path | str | None = None) -> bool:
    """Whether ``url`` answers 2xx (a health probe); ``ca``: the only CA an https:// URL may chain to."""
    ctx = None
    if url.startswith("https://"):
        import ssl  # only for the stack's TLS

        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
        return bool(200 <= r.status < 300)


def find_bin(name: str) -> str:
    """An executable next to this interpreter (the virtual environment's), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name!r} not found next to {sys.executable} or on PATH (run infra/install.sh)")
    return found


def terminate(stack: Stack, names: list[str], grace: float, echo: Any) -> None:
    """SIGTERM the parts' process groups, SIGKILL those still alive after ``grace`` s."""
    for name in names:
        if group_alive(stack.pids[name]):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stack.pids[name], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(group_alive(stack.pids[n]) for n in names):
        time.sleep(0.2)
    for name in names:
        if group_alive(stack.pids[name]):
            echo(f"{name} did not stop within {grace:.0f} s of SIGTERM: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stack.pids[name], signal.SIGKILL)
