"""PostgreSQL behind the Prefect server and MLflow (``stack up --database postgres``): loopback, data in the
state folder. Databases ``prefect``, ``mlflow`` (MLflow's backend store) and ``mlflow_auth`` (its users,
with ``--tls``). It listens on 127.0.0.1 only: just the coordinator host's servers use it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import asyncpg

from ops.state import Stack, StackError
from ops.supervise import find_bin, spawn, wait_until

DATABASES = ("prefect", "mlflow", "mlflow_auth")


def _pg_bin(name: str) -> str:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).is_file():
            return str(d / name)
    return find_bin(name)


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; as root, run it as the system's `postgres` user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start(stack: Stack) -> None:
    """Start PostgreSQL on the stack's port (``initdb`` first, once); as root, as the ``postgres`` user."""
    data = stack.root / "postgres"
    sock = stack.root / "postgres-run"
    for d in (data, sock):
        d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(d, "postgres", "postgres")
    if (
        os.geteuid() == 0
        and subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(data)]).returncode
    ):
        raise StackError(f"the postgres user cannot write {data}: make its parent folders traversable (o+x)")
    if not (data / "PG_VERSION").is_file():
        out = subprocess.run(
            _as_postgres_user([_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise StackError(f"initdb failed:\n{out.stdout}{out.stderr}")
    cmd = [_pg_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(stack.ports["postgres"])]
    spawn(stack, "postgres", _as_postgres_user([*cmd, "-k", str(sock)]), {})


def wait_ready(stack: Stack, timeout: float) -> None:
    """Wait until PostgreSQL accepts connections, creating the ``prefect``, ``mlflow`` and ``mlflow_auth``
    databases."""

    async def ensure_db() -> bool:
        conn = await asyncpg.connect(host="127.0.0.1", port=stack.ports["postgres"], user="postgres")
        try:
            for db in DATABASES:
                if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db):
                    await conn.execute(f"CREATE DATABASE {db}")
        finally:
            await conn.close()
        return True

    wait_until("PostgreSQL", lambda: asyncio.run(ensure_db()), timeout, stack, "postgres")
