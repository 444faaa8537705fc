"""The real stack on loopback: SeaweedFS (S3), Prefect server, MLflow server, one worker per work pool.

``silotune stack up`` starts every part in its own process group (so ``down`` can stop each one with
everything it spawned; :mod:`ops.supervise`), writes pids, ports and logs under the state folder
(``.silotune/stack/`` by default; :mod:`ops.state`) and returns once each part is healthy: the S3
endpoint accepts a bucket creation, ``/api/health`` answers, MLflow answers, every pool has an online
worker. Data (buckets, the Prefect and MLflow databases, S3 identities) stays in the state folder, so
``up`` after ``down`` finds the same federations, runs and models.

The parts, one module each: :mod:`ops.credentials` (S3 identities, the Prefect API auth string),
:mod:`ops.seaweedfs`, :mod:`ops.postgres` (optional), :mod:`ops.prefect_server` (server, pools,
deployments), :mod:`ops.mlflow_server`, :mod:`ops.policies` (the silos' policies, configs made for
the stack) and the workers, started here.

The workers run this checkout's code: they are ``python -m cli ...`` with the repository root
as working directory and first on ``PYTHONPATH`` (not the ``silotune`` console script, which imports
the installed package). The coordinator's is ``cli worker coordinator``; each silo's is
``cli silo join <silo> --policy <state>/policies/<silo>.yaml``, which loads the silo's policy
into its process. Both serve their pool with :class:`ops.worker.InProcessWorker`;
``start_worker(..., stock=True)`` serves a pool with Prefect's stock process worker instead (the
fallback of :mod:`ops.prefect_private`; a silo's policy then travels as ``$SILOTUNE_SILO_POLICY``).
Every worker learns how many silo workers share the host (``$SILOTUNE_COLOCATED_WORKERS``): a silo
then trains with the cores its process may use (affinity, cgroup quota) divided among them, or with
all of them while co-located runs take turns (:mod:`silotune.compute`). An ``OMP_NUM_THREADS`` in the
caller's environment still wins.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ops import credentials, mlflow_server, policies, postgres, prefect_server, seaweedfs
from ops.state import (
    COORDINATOR_POOL,
    DATA_BUCKET,
    DEFAULT_PORTS,
    DEFAULT_SILOS,
    DEFAULT_STATE,
    MLFLOW_BUCKET,
    REPO_ROOT,
    RESULTS_BUCKET,
    SILO_NAME,
    Stack,
    StackError,
)
from ops.supervise import (
    alive,
    find_bin,
    free_ports,
    group_alive,
    http_ok,
    port_open,
    spawn,
    tail,
    terminate,
    wait_until,
)
from ops.tls import is_loopback, make_ca, make_server_cert
from silotune.compute import COLOCATED_ENV

# --- workers -----------------------------------------------------------------------------------


def worker_env(stack: Stack, identity: str) -> dict[str, str]:
    """A worker's environment: its Prefect client and S3 identity, this checkout's code, its threads."""
    env = {**stack.prefect_env(identity), **stack.identity_env(identity), "SILOTUNE_HOME": str(REPO_ROOT)}
    if identity == "coordinator":  # it logs runs and registers models (MLflow basic auth, with --tls)
        env.update(stack.mlflow_env("coordinator"))
    # This checkout's flows, tasks and silotune first, whatever package the interpreter has installed.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    # The silos share this host's cores; each worker sizes its torch threads from this (silotune.compute).
    env[COLOCATED_ENV] = str(max(1, len(stack.silos)))
    return env


def _start_worker(stack: Stack, pool: str, *, stock: bool = False) -> str:
    """Start ``pool``'s worker; returns the name it registers under with the Prefect server.

    ``stock``: Prefect's own process worker (``prefect worker start --type process``, a Python process
    per flow run) instead of silotune's in-process worker; the fallback of ops/prefect_private.py. A
    silo's policy then reaches each run's process through ``$SILOTUNE_SILO_POLICY``.
    """
    identity = "coordinator" if pool == COORDINATOR_POOL else pool
    env = worker_env(stack, identity)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    name = None
    if stock:
        name = f"{pool}-stock-{secrets.token_hex(4)}"  # a new name per start: a killed one may look online
        cmd = [find_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
        if pool != COORDINATOR_POOL:
            from tasks.runtime import POLICY_ENV  # imports torch (seconds); only for this fallback

            env[POLICY_ENV] = str(stack.policy_path(pool.removeprefix("silo-")))
    elif pool == COORDINATOR_POOL:
        cmd = [sys.executable, "-m", "cli", "worker", pool, "--role", "coordinator"]
    else:
        silo = pool.removeprefix("silo-")
        # The silo's own policy, loaded into the worker's process: every run is checked against it.
        policy = str(stack.policy_path(silo))
        cmd = [sys.executable, "-m", "cli", "silo", "join", silo, "--policy", policy]
    pid = spawn(stack, f"worker-{pool}", cmd, env, cwd=REPO_ROOT)
    return name or f"{pool}-{pid}"  # the in-process worker's name (ops.worker.serve)


def _wait_workers(stack: Stack, names: dict[str, str], timeout: float) -> None:
    """Wait until each pool's worker is online, by the name it registers under (``{pool: name}``): a
    killed worker may still look online."""
    pending = dict(names)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pool, worker in list(pending.items()):
            name = f"worker-{pool}"
            pid = stack.pids.get(name)
            if pid is not None and not alive(pid):
                raise StackError(f"worker for pool {pool} exited:\n{tail(stack.logs / f'{name}.log')}")
            with contextlib.suppress(Exception):
                if worker in prefect_server.online_workers(stack, pool):
                    del pending[pool]
        if not pending:
            return
        time.sleep(0.5)
    raise StackError(f"no online worker on pool(s) {sorted(pending)} after {timeout:.0f} s; see {stack.logs}")


def kill_worker(stack: Stack, pool: str) -> None:
    """SIGKILL a pool's worker and everything it runs (tests: a silo host that dies mid-round)."""
    name = f"worker-{pool}"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(stack.pids[name], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while group_alive(stack.pids[name]) and time.monotonic() < deadline:
        time.sleep(0.1)


def start_worker(stack: Stack, *pools: str, timeout: float = 120.0, stock: bool = False) -> None:
    """(Re)start pools' workers (side by side) and wait until they are online.

    ``stock``: serve them with Prefect's stock process worker instead (see :func:`_start_worker`).
    """
    names = {}
    for pool in pools:
        name = f"worker-{pool}"
        if name in stack.pids and group_alive(stack.pids[name]):
            raise StackError(f"{name} is already running")
        names[pool] = _start_worker(stack, pool, stock=stock)
    _wait_workers(stack, names, timeout)


def restart_worker(stack: Stack, *pools: str, timeout: float = 120.0) -> None:
    """Stop pools' workers and start them again (a silo's worker reads its policy when it starts)."""
    running = [f"worker-{p}" for p in pools if f"worker-{p}" in stack.pids]
    terminate(stack, running, 15.0, lambda *_: None)  # SIGTERM: each deregisters; SIGKILL after 15 s
    start_worker(stack, *pools, timeout=timeout)


def restart_prefect_server(stack: Stack, timeout: float = 300.0) -> None:
    """Stop the Prefect server and start it again (its database keeps every run); workers reconnect."""
    terminate(stack, ["prefect-server"], 15.0, lambda *_: None)
    prefect_server.start(stack)
    health = f"{stack.prefect_api}/health"
    wait_until("Prefect server", lambda: http_ok(health, stack.ca_file), timeout, stack, "prefect-server")


# --- commands ----------------------------------------------------------------------------------


def _open_on_host(stack: Stack, port: int) -> bool:
    """Whether ``port`` is open on the stack's host address (when that is not loopback)."""
    return not is_loopback(stack.host) and port_open(port, stack.host)


def up(
    root: Path | str = DEFAULT_STATE,
    *,
    silos: Iterable[str] | None = None,
    config: Any = None,
    auto_ports: bool = False,
    database: str | None = None,
    redeploy: bool = False,
    timeout: float = 240.0,
    echo: Any = print,
    host: str | None = None,
    tls: bool | None = None,
    remote_silos: bool | None = None,
    cert_names: Iterable[str] = (),
) -> Stack:
    """Start the whole stack and return once every part is healthy; on any failure, stop what started.

    ``config``: federation config(s) (FederationConfig objects or YAML paths) the stack is for: each is
    made for the stack (``federations/<id>.yaml``) and every silo's policy is written strict from them
    (see the module docstring). The stack's silos are then the configs' silos, unless ``silos`` names
    them (a superset). Without a config, existing policy files are kept and missing ones get the
    default policy. Everything is written before any process starts.
    """
    t0 = time.monotonic()
    configs = policies.as_configs(config)
    stack = Stack.load(root)
    if stack.ports and any(alive(p) for p in stack.pids.values()):
        running = sorted(n for n, p in stack.pids.items() if alive(p))
        raise StackError(
            f"stack in {stack.root} is already running ({', '.join(running)}); `silotune stack down` first"
        )
    if not stack.ports:
        stack.ports = free_ports(DEFAULT_PORTS) if auto_ports else dict(DEFAULT_PORTS)
    named = list(dict.fromkeys(s.name for c in configs for s in c.silos))
    if silos is not None:
        stack.silos = list(silos)
        missing = [s for s in named if s not in stack.silos]
        if missing:
            raise StackError(f"the config(s) name silo(s) {', '.join(missing)}, not in --silos")
    elif named:
        stack.silos = named
    elif not stack.silos:
        stack.silos = list(DEFAULT_SILOS)
    if database is not None:
        if database not in ("sqlite", "postgres"):
            raise StackError(f"database must be 'sqlite' or 'postgres', not {database!r}")
        stack.database = database
    if host is not None:
        stack.host = host
    if tls is not None:
        stack.tls = tls
    if remote_silos is not None:
        stack.remote_silos = remote_silos
    if not stack.tls and not is_loopback(stack.host):
        raise StackError(
            f"host {stack.host}: plain HTTP is allowed on loopback only; serve other hosts with --tls"
        )
    if stack.database == "postgres" and "postgres" not in stack.ports:
        stack.ports["postgres"] = free_ports(["postgres"])["postgres"] if auto_ports else 5432
    stack.pids = {}
    busy = sorted(f"{n}={p}" for n, p in stack.ports.items() if port_open(p) or _open_on_host(stack, p))
    if busy:
        raise StackError(
            f"port(s) already in use on 127.0.0.1: {', '.join(busy)} (another stack? `silotune stack down`)"
        )
    for s in stack.silos:
        if not SILO_NAME.match(s):
            raise StackError(f"silo name {s!r}: lowercase letters, digits, '-' or '_' (at most 63)")
    stack.save()
    credentials.write_identities(stack)
    credentials.write_prefect_auth(stack)
    if stack.tls:
        make_ca(stack.tls_dir)
        make_server_cert(stack.tls_dir, [stack.host, "127.0.0.1", "localhost", *cert_names])
        echo(f"TLS              CA {stack.ca_file} (clients pin it); certificate for {stack.host}")
    if configs:
        for c in policies.configure(stack, configs, echo=echo):
            echo(f"federation       {c.federation_id}: {stack.config_path(c.federation_id)}")
        echo(f"policies         {stack.root / 'policies'} (strict, from the config(s); each config accepted)")
    else:
        policies.write_policies(stack, echo=echo)
        echo(f"policies         {stack.root / 'policies'} (kept, or this stack's default policy)")
    try:
        seaweedfs.start(stack)
        if stack.database == "postgres":
            postgres.start(stack)
            postgres.wait_ready(stack, timeout)
            echo(f"PostgreSQL       127.0.0.1:{stack.ports['postgres']} (Prefect's and MLflow's database)")
        prefect_server.start(stack)
        seaweedfs.wait_ready(stack, timeout)
        echo(
            f"SeaweedFS S3     {stack.s3_endpoint}  "
            f"(buckets {DATA_BUCKET}, {RESULTS_BUCKET}, {MLFLOW_BUCKET})"
        )
        mlflow_server.start(stack)
        wait_until(
            "Prefect server",
            lambda: http_ok(f"{stack.prefect_api}/health", stack.ca_file),
            timeout,
            stack,
            "prefect-server",
        )
        echo(f"Prefect server   {stack.prefect_ui}  (API auth string: {stack.prefect_auth_file})")
        prefect_server.configure(stack)
        workers = {pool: _start_worker(stack, pool) for pool in stack.local_pools()}
        if redeploy or not prefect_server.deployed(stack):
            prefect_server.deploy(stack)
            echo("deployments      registered from deployments/prefect.yaml")
        else:  # kept as they are: a schedule turned on from the CLI or the UI stays on
            echo("deployments      already registered (`up --redeploy` re-reads deployments/prefect.yaml)")
        mlflow_health = f"{stack.mlflow_uri}/health"
        wait_until("MLflow server", lambda: http_ok(mlflow_health, stack.ca_file), timeout, stack, "mlflow")
        mlflow_server.configure_users(stack)
        auth = "  (basic auth: mlflow/users.json)" if stack.tls else ""
        echo(f"MLflow server    {stack.mlflow_uri}{auth}")
        _wait_workers(stack, workers, timeout)
        echo(f"workers          {', '.join(stack.local_pools())} online")
        if stack.remote_silos:
            pools = ", ".join(stack.pools()[1:])
            echo(f"silo pools       {pools}: waiting for `silotune silo join` at each silo")
    except BaseException:
        down(stack.root, echo=lambda *_: None)
        raise
    echo(f"stack up in {time.monotonic() - t0:.0f} s; state in {stack.root}")
    return stack


def down(root: Path | str = DEFAULT_STATE, *, grace: float = 15.0, echo: Any = print) -> Stack:
    """Stop every part: workers first (while the API can still hear their goodbye), then the servers.

    SIGTERM goes to each process group, SIGKILL after ``grace`` s; then the ports must be closed.
    """
    stack = Stack.load(root)
    workers = [n for n in stack.pids if n.startswith("worker-")]
    terminate(stack, workers, grace, echo)
    terminate(stack, [n for n in stack.pids if n not in workers], grace, echo)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        any(group_alive(p) for p in stack.pids.values())
        or any(port_open(p) or _open_on_host(stack, p) for p in stack.ports.values())
    ):
        time.sleep(0.2)
    left = [n for n, p in stack.pids.items() if group_alive(p)]
    ports = sorted(f"{n}={p}" for n, p in stack.ports.items() if port_open(p) or _open_on_host(stack, p))
    if left or ports:
        raise StackError(f"stack not fully stopped: processes {left}, ports still open {ports}")
    stack.pids = {}
    if stack.ports:
        stack.save()
    echo(f"stack down; state kept in {stack.root}")
    return stack


def status(root: Path | str = DEFAULT_STATE) -> dict[str, Any]:
    stack = Stack.load(root)
    procs = {n: alive(p) for n, p in stack.pids.items()}
    return {
        "state": str(stack.root),
        "processes": procs,
        "prefect_ui": stack.prefect_ui if stack.ports else None,
        "mlflow_ui": stack.mlflow_uri if stack.ports else None,
        "s3_endpoint": stack.s3_endpoint if stack.ports else None,
        # With TLS: the CA every client pins.
        "ca_file": str(stack.ca_file) if stack.ca_file else None,
        # The Prefect API and UI ask for the string in this file (mode 0600).
        "prefect_auth_file": str(stack.prefect_auth_file) if stack.prefect_auth_file.is_file() else None,
        "silos": stack.silos,
        # Each silo worker joins with its own policy (`silotune silo policy show FILE`).
        "policies": {s: str(stack.policy_path(s)) for s in stack.silos if stack.policy_path(s).is_file()},
        "running": bool(procs) and all(procs.values()),
    }
