"""The real stack on loopback: SeaweedFS (S3), Prefect server, MLflow server, one worker per work pool.

``silotune stack up`` starts every part in its own process group (so ``down`` can
stop each one with everything it spawned), writes pids, ports and logs under the
state folder (``.silotune/stack/`` by default) and returns once each part is
healthy: the S3 endpoint accepts a bucket creation, ``/api/health`` answers,
MLflow answers, every pool has an online worker. Data (buckets, the Prefect and
MLflow databases, S3 identities) stays in the state folder, so ``up`` after
``down`` finds the same federations, runs and models.

Everything listens on 127.0.0.1 only. S3 identities are generated once per stack
(random keys in ``s3/credentials.json``, mode 0600) and handed to each process
through its environment: the coordinator, MLflow and every silo sign with their
own identity, limited to what they must touch.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silotune.errors import SilotuneError
from silotune.modeling import OFFLINE_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE = Path(".silotune/stack")
DEFAULT_SILOS = ("clinic", "bank", "lab")
DATA_BUCKET = "silotune"
RESULTS_BUCKET = "silotune-results"
MLFLOW_BUCKET = "silotune-mlflow"
RESULTS_BLOCK = "silotune-results"
REGION = "us-east-1"
COORDINATOR_POOL = "coordinator"

# The user-facing ports are the usual ones; SeaweedFS's internal servers get theirs explicitly so that
# nothing ends up on a port we did not check.
DEFAULT_PORTS = {
    "prefect": 4200,
    "mlflow": 5000,
    "s3": 8333,
    "s3_grpc": 18333,
    "weed_master": 9333,
    "weed_master_grpc": 19333,
    "weed_volume": 9340,
    "weed_volume_grpc": 19340,
    "weed_filer": 8888,
    "weed_filer_grpc": 18888,
    "weed_admin": 23646,
    "weed_admin_grpc": 33646,
}


class StackError(SilotuneError):
    """The stack could not be started, stopped or reached."""


# --- state -------------------------------------------------------------------------------------


@dataclass
class Stack:
    """A stack's state folder and what ``stack.json`` records about it."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    silos: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    database: str = "sqlite"

    @classmethod
    def load(cls, root: Path | str = DEFAULT_STATE) -> Stack:
        root = Path(root).resolve()
        f = root / "stack.json"
        if not f.is_file():
            return cls(root=root)
        data = json.loads(f.read_text())
        return cls(
            root=root,
            ports=data["ports"],
            silos=data["silos"],
            pids=data.get("pids", {}),
            database=data.get("database", "sqlite"),
        )

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "stack.json.tmp"
        data = {"ports": self.ports, "silos": self.silos, "pids": self.pids, "database": self.database}
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.root / "stack.json")

    # where things live
    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    @property
    def prefect_ui(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def credentials(self) -> dict[str, dict[str, str]]:
        return json.loads((self.root / "s3" / "credentials.json").read_text())

    def identity_env(self, identity: str) -> dict[str, str]:
        """The environment that makes boto3 (silotune, prefect-aws, MLflow) sign as ``identity``."""
        c = self.credentials()[identity]
        return {
            "AWS_ACCESS_KEY_ID": c["access_key"],
            "AWS_SECRET_ACCESS_KEY": c["secret_key"],
            "AWS_DEFAULT_REGION": REGION,
        }

    def prefect_env(self) -> dict[str, str]:
        return {
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_HOME": str(self.root / "prefect"),
            # Silo results cross processes (and, at real silos, hosts) through the S3 result bucket.
            "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK": f"s3-bucket/{RESULTS_BLOCK}",
        }

    def store_spec(self) -> dict[str, Any]:
        """The ``store`` section of a federation config that uses this stack's S3 bucket."""
        return {"kind": "s3", "endpoint_url": self.s3_endpoint, "bucket": DATA_BUCKET, "region": REGION}

    def tracking_spec(self, experiment: str = "silotune") -> dict[str, Any]:
        return {"kind": "mlflow", "uri": self.mlflow_uri, "experiment": experiment}

    def pools(self) -> list[str]:
        return [COORDINATOR_POOL, *(f"silo-{s}" for s in self.silos)]


# --- ports and processes -----------------------------------------------------------------------


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


def _alive(pid: int) -> bool:
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


def _group_alive(pgid: int) -> bool:
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


def _spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
    """Start ``cmd`` in a new session (its own process group) with stdout/stderr to logs/<name>.log."""
    stack.logs.mkdir(parents=True, exist_ok=True)
    log = open(stack.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child, closed below
    log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
    log.flush()
    full_env = {**os.environ, **OFFLINE_ENV, **env}
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


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait(what: str, check: Any, timeout: float, stack: Stack, name: str, interval: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        pid = stack.pids.get(name)
        if pid is not None and not _alive(pid):
            raise StackError(
                f"{what} exited during start-up; log {stack.logs / name}.log:\n"
                f"{_tail(stack.logs / f'{name}.log')}"
            )
        try:
            if check():
                return
        except Exception as exc:  # not ready yet
            last = exc
        time.sleep(interval)
    raise StackError(
        f"{what} not healthy after {timeout:.0f} s ({last}); log {stack.logs / name}.log:\n"
        f"{_tail(stack.logs / f'{name}.log')}"
    )


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return bool(200 <= r.status < 300)


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name!r} not found next to {sys.executable} or on PATH (run infra/install.sh)")
    return found


# --- S3 identities -----------------------------------------------------------------------------


def _identities(silos: Iterable[str]) -> dict[str, list[str]]:
    """What each identity may do (SeaweedFS actions; ``*`` matches across ``/``).

    Silos read global adapters and write only their own update slot (and their own secure-aggregation
    messages); they write Prefect results.
    """
    ids = {
        "admin": ["Admin", "Read", "Write", "List", "Tagging"],
        "coordinator": [
            f"Read:{DATA_BUCKET}",
            f"Write:{DATA_BUCKET}",
            f"List:{DATA_BUCKET}",
            f"Read:{RESULTS_BUCKET}",
            f"Write:{RESULTS_BUCKET}",
        ],
        "mlflow": [f"Read:{MLFLOW_BUCKET}", f"Write:{MLFLOW_BUCKET}", f"List:{MLFLOW_BUCKET}"],
    }
    for s in silos:
        ids[f"silo-{s}"] = [
            # The global adapter (plaintext, or its CKKS ciphertext and pointer), secure-aggregation
            # messages addressed to silos; never another silo's update.
            f"Read:{DATA_BUCKET}/*/global.safetensors",
            f"Read:{DATA_BUCKET}/*/global.json",
            f"Read:{DATA_BUCKET}/*/aggregate.ckks",
            f"Read:{DATA_BUCKET}/*/secagg/*",
            # Its own update slot (any encoding) and its own secure-aggregation messages.
            f"Write:{DATA_BUCKET}/*/updates/{s}.*",
            f"Write:{DATA_BUCKET}/*/secagg/adverts/{s}",
            f"Write:{DATA_BUCKET}/*/secagg/shares/*/{s}",
            f"Write:{DATA_BUCKET}/*/secagg/unmask/{s}",
            # With CKKS only a silo can decrypt, so the publishing silo writes the final adapter.
            f"Write:{DATA_BUCKET}/*/final/*",
            f"Read:{RESULTS_BUCKET}",
            f"Write:{RESULTS_BUCKET}",
        ]
    return ids


def _write_identities(stack: Stack) -> None:
    d = stack.root / "s3"
    d.mkdir(parents=True, exist_ok=True)
    cred_file = d / "credentials.json"
    creds: dict[str, dict[str, str]] = json.loads(cred_file.read_text()) if cred_file.is_file() else {}
    actions = _identities(stack.silos)
    for ident in actions:
        creds.setdefault(
            ident,
            {"access_key": f"{ident[:12]}-{secrets.token_hex(6)}", "secret_key": secrets.token_urlsafe(30)},
        )
    fd = os.open(cred_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds, fh, indent=2)
    config = {
        "identities": [
            {
                "name": ident,
                "credentials": [
                    {"accessKey": creds[ident]["access_key"], "secretKey": creds[ident]["secret_key"]}
                ],
                "actions": acts,
            }
            for ident, acts in actions.items()
        ]
    }
    fd = os.open(d / "identities.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh, indent=2)


def s3_client(stack: Stack, identity: str = "admin") -> Any:
    import boto3
    from botocore.config import Config

    env = stack.identity_env(identity)
    return boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


# --- the parts ---------------------------------------------------------------------------------


def _start_seaweedfs(stack: Stack) -> None:
    p = stack.ports
    data = stack.root / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        _bin("weed"),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={p['s3']}",
        f"-s3.port.grpc={p['s3_grpc']}",
        f"-master.port={p['weed_master']}",
        f"-master.port.grpc={p['weed_master_grpc']}",
        f"-volume.port={p['weed_volume']}",
        f"-volume.port.grpc={p['weed_volume_grpc']}",
        f"-filer.port={p['weed_filer']}",
        f"-filer.port.grpc={p['weed_filer_grpc']}",
        f"-admin.port={p['weed_admin']}",
        f"-admin.port.grpc={p['weed_admin_grpc']}",
        f"-s3.config={stack.root / 's3' / 'identities.json'}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # Nothing leaves the machine.
        "-master.telemetry=false",
    ]
    _spawn(stack, "seaweedfs", cmd, {})


def _wait_seaweedfs(stack: Stack, timeout: float) -> None:
    # The S3 port opens before buckets can be created: ready means a bucket creation succeeded.
    def ready() -> bool:
        c = s3_client(stack)
        for b in (DATA_BUCKET, RESULTS_BUCKET, MLFLOW_BUCKET):
            try:
                c.create_bucket(Bucket=b)
            except c.exceptions.BucketAlreadyOwnedByYou:
                pass
            except c.exceptions.BucketAlreadyExists:
                pass
        return True

    _wait("SeaweedFS (S3)", ready, timeout, stack, "seaweedfs")


def _pg_bin(name: str) -> str:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).is_file():
            return str(d / name)
    return _bin(name)


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; as root, run it as the system's `postgres` user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _start_postgres(stack: Stack) -> None:
    """Prefect's production database, on loopback, data in the state folder (``up --database postgres``)."""
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
    _spawn(stack, "postgres", _as_postgres_user([*cmd, "-k", str(sock)]), {})


def _wait_postgres(stack: Stack, timeout: float) -> None:
    import asyncio

    async def ensure_db() -> bool:
        import asyncpg

        conn = await asyncpg.connect(host="127.0.0.1", port=stack.ports["postgres"], user="postgres")
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'prefect'"):
                await conn.execute("CREATE DATABASE prefect")
        finally:
            await conn.close()
        return True

    _wait("PostgreSQL", lambda: asyncio.run(ensure_db()), timeout, stack, "postgres")


def _start_prefect(stack: Stack) -> None:
    (stack.root / "prefect").mkdir(parents=True, exist_ok=True)
    env = {
        "PREFECT_HOME": str(stack.root / "prefect"),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(stack.ports["prefect"]),
        "PREFECT_API_DATABASE_CONNECTION_URL": (
            f"postgresql+asyncpg://postgres@127.0.0.1:{stack.ports['postgres']}/prefect"
            if stack.database == "postgres"
            else f"sqlite+aiosqlite:///{stack.root / 'prefect' / 'prefect.db'}"
        ),
        "PREFECT_UI_API_URL": stack.prefect_api,
        # SQLite busy errors become 503s that clients retry after 2 s; log them to explain slow rounds.
        "PREFECT_API_LOG_RETRYABLE_ERRORS": "true",
        # Automations are not used here; their service writes bookkeeping rows for every event.
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    }
    cmd = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(stack.ports["prefect"])]
    _spawn(stack, "prefect-server", cmd, env)


def _start_mlflow(stack: Stack) -> None:
    d = stack.root / "mlflow"
    d.mkdir(parents=True, exist_ok=True)
    env = {
        **stack.identity_env("mlflow"),
        "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint,
        # The default job runner spawns ~15 processes (~1.8 GB); federations do not need it.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(stack.ports["mlflow"]),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{d / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{MLFLOW_BUCKET}/artifacts",
    ]
    _spawn(stack, "mlflow", cmd, env)


def _configure_prefect(stack: Stack) -> None:
    """Work pools (coordinator + one process pool per silo) and the S3 result-storage block."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    with temporary_settings({PREFECT_API_URL: stack.prefect_api}):
        with get_client(sync_client=True) as client:
            for pool in stack.pools():
                with contextlib.suppress(ObjectAlreadyExists):
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        # No keys in the block: each process signs with its own identity from its environment.
        creds = AwsCredentials(
            region_name=REGION,
            aws_client_parameters=AwsClientParameters(
                endpoint_url=stack.s3_endpoint, config={"s3": {"addressing_style": "path"}}
            ),
        )
        S3Bucket(bucket_name=RESULTS_BUCKET, credentials=creds).save(RESULTS_BLOCK, overwrite=True)


def deploy(stack: Stack) -> None:
    """Register ``deployments/prefect.yaml``'s deployments for this stack's pools (``prefect deploy``)."""
    names = ["federated-training/federated-training", "scheduled-retraining/nightly"]
    available = _declared_silo_deployments()
    for s in stack.silos:
        for flow_name in ("silo-round", "silo-evaluate", "silo-step"):
            if f"{flow_name}/silo-{s}" in available:
                names.append(f"{flow_name}/silo-{s}")
    cmd = [_bin("prefect"), "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml"]
    for n in names:
        cmd += ["-n", n]
    env = {**os.environ, **OFFLINE_ENV, **stack.prefect_env(), "SILOTUNE_HOME": str(REPO_ROOT)}
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    (stack.logs / "deploy.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise StackError(
            f"prefect deploy failed (log {stack.logs / 'deploy.log'}):\n"
            f"{out.stdout[-3000:]}{out.stderr[-3000:]}"
        )


def _deployed(stack: Stack) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.prefect_api}), get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name("federated-training/federated-training")
        except ObjectNotFound:
            return False
    return True


def _declared_silo_deployments() -> set[str]:
    import yaml

    flows = {":silo_round": "silo-round", ":silo_evaluate": "silo-evaluate", ":silo_step": "silo-step"}
    data = yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())
    out = set()
    for d in data.get("deployments", []):
        for suffix, flow_name in flows.items():
            if d["entrypoint"].endswith(suffix):
                out.add(f"{flow_name}/{d['name']}")
    return out


def _start_worker(stack: Stack, pool: str) -> None:
    if pool == COORDINATOR_POOL:
        identity = "coordinator"
        cmd = [sys.executable, "-m", "flows.cli", "worker", pool]
    else:
        identity = pool
        cmd = [sys.executable, "-m", "flows.cli", "silo", "join", pool.removeprefix("silo-")]
    env = {**stack.prefect_env(), **stack.identity_env(identity), "SILOTUNE_HOME": str(REPO_ROOT)}
    _spawn(stack, f"worker-{pool}", cmd, env)


def _online_workers(stack: Stack, pool: str) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.prefect_api}), get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(pool)
    return {w.name for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"}


def _wait_workers(stack: Stack, pools: Iterable[str], timeout: float) -> None:
    """Wait until each pool has its worker online (by name: a killed worker may still look online)."""
    pending = set(pools)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pool in list(pending):
            name = f"worker-{pool}"
            pid = stack.pids.get(name)
            if pid is not None and not _alive(pid):
                raise StackError(f"worker for pool {pool} exited:\n{_tail(stack.logs / f'{name}.log')}")
            with contextlib.suppress(Exception):
                if f"{pool}-{pid}" in _online_workers(stack, pool):
                    pending.discard(pool)
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
    while _group_alive(stack.pids[name]) and time.monotonic() < deadline:
        time.sleep(0.1)


def start_worker(stack: Stack, *pools: str, timeout: float = 120.0) -> None:
    """(Re)start pools' workers (side by side) and wait until they are online."""
    for pool in pools:
        name = f"worker-{pool}"
        if name in stack.pids and _group_alive(stack.pids[name]):
            raise StackError(f"{name} is already running")
        _start_worker(stack, pool)
    _wait_workers(stack, pools, timeout)


# --- commands ----------------------------------------------------------------------------------


def up(
    root: Path | str = DEFAULT_STATE,
    *,
    silos: Iterable[str] | None = None,
    auto_ports: bool = False,
    database: str | None = None,
    redeploy: bool = False,
    timeout: float = 240.0,
    echo: Any = print,
) -> Stack:
    """Start the whole stack and return once every part is healthy; on any failure, stop what started."""
    t0 = time.monotonic()
    stack = Stack.load(root)
    if stack.ports and any(_alive(p) for p in stack.pids.values()):
        running = sorted(n for n, p in stack.pids.items() if _alive(p))
        raise StackError(
            f"stack in {stack.root} is already running ({', '.join(running)}); `silotune stack down` first"
        )
    if not stack.ports:
        stack.ports = free_ports(DEFAULT_PORTS) if auto_ports else dict(DEFAULT_PORTS)
    if silos is not None:
        stack.silos = list(silos)
    elif not stack.silos:
        stack.silos = list(DEFAULT_SILOS)
    if database is not None:
        if database not in ("sqlite", "postgres"):
            raise StackError(f"database must be 'sqlite' or 'postgres', not {database!r}")
        stack.database = database
    if stack.database == "postgres" and "postgres" not in stack.ports:
        stack.ports["postgres"] = free_ports(["postgres"])["postgres"] if auto_ports else 5432
    stack.pids = {}
    busy = sorted(f"{n}={p}" for n, p in stack.ports.items() if port_open(p))
    if busy:
        raise StackError(
            f"port(s) already in use on 127.0.0.1: {', '.join(busy)} (another stack? `silotune stack down`)"
        )
    stack.save()
    _write_identities(stack)
    try:
        _start_seaweedfs(stack)
        if stack.database == "postgres":
            _start_postgres(stack)
            _wait_postgres(stack, timeout)
            echo(f"PostgreSQL       127.0.0.1:{stack.ports['postgres']} (Prefect's database)")
        _start_prefect(stack)
        _wait_seaweedfs(stack, timeout)
        echo(
            f"SeaweedFS S3     {stack.s3_endpoint}  "
            f"(buckets {DATA_BUCKET}, {RESULTS_BUCKET}, {MLFLOW_BUCKET})"
        )
        _start_mlflow(stack)
        _wait(
            "Prefect server",
            lambda: _http_ok(f"{stack.prefect_api}/health"),
            timeout,
            stack,
            "prefect-server",
        )
        echo(f"Prefect server   {stack.prefect_ui}")
        _configure_prefect(stack)
        for pool in stack.pools():
            _start_worker(stack, pool)
        if redeploy or not _deployed(stack):
            deploy(stack)
            echo("deployments      registered from deployments/prefect.yaml")
        else:  # kept as they are: a schedule turned on from the CLI or the UI stays on
            echo("deployments      already registered (`up --redeploy` re-reads deployments/prefect.yaml)")
        _wait("MLflow server", lambda: _http_ok(f"{stack.mlflow_uri}/health"), timeout, stack, "mlflow")
        echo(f"MLflow server    {stack.mlflow_uri}")
        _wait_workers(stack, stack.pools(), timeout)
        echo(f"workers          {', '.join(stack.pools())} online")
    except BaseException:
        down(stack.root, echo=lambda *_: None)
        raise
    echo(f"stack up in {time.monotonic() - t0:.0f} s; state in {stack.root}")
    return stack


def _terminate(stack: Stack, names: list[str], grace: float, echo: Any) -> None:
    for name in names:
        if _group_alive(stack.pids[name]):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stack.pids[name], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_group_alive(stack.pids[n]) for n in names):
        time.sleep(0.2)
    for name in names:
        if _group_alive(stack.pids[name]):
            echo(f"{name} did not stop within {grace:.0f} s of SIGTERM: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stack.pids[name], signal.SIGKILL)


def down(root: Path | str = DEFAULT_STATE, *, grace: float = 15.0, echo: Any = print) -> Stack:
    """Stop every part: workers first (while the API can still hear their goodbye), then the servers.

    SIGTERM goes to each process group, SIGKILL after ``grace`` s; then the ports must be closed.
    """
    stack = Stack.load(root)
    workers = [n for n in stack.pids if n.startswith("worker-")]
    _terminate(stack, workers, grace, echo)
    _terminate(stack, [n for n in stack.pids if n not in workers], grace, echo)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        any(_group_alive(p) for p in stack.pids.values()) or any(port_open(p) for p in stack.ports.values())
    ):
        time.sleep(0.2)
    left = [n for n, p in stack.pids.items() if _group_alive(p)]
    ports = sorted(f"{n}={p}" for n, p in stack.ports.items() if port_open(p))
    if left or ports:
        raise StackError(f"stack not fully stopped: processes {left}, ports still open {ports}")
    stack.pids = {}
    if stack.ports:
        stack.save()
    echo(f"stack down; state kept in {stack.root}")
    return stack


def status(root: Path | str = DEFAULT_STATE) -> dict[str, Any]:
    stack = Stack.load(root)
    procs = {n: _alive(p) for n, p in stack.pids.items()}
    return {
        "state": str(stack.root),
        "processes": procs,
        "prefect_ui": stack.prefect_ui if stack.ports else None,
        "mlflow_ui": stack.mlflow_uri if stack.ports else None,
        "s3_endpoint": stack.s3_endpoint if stack.ports else None,
        "silos": stack.silos,
        "running": bool(procs) and all(procs.values()),
    }


@contextlib.contextmanager
def prefect_api(stack: Stack) -> Iterator[None]:
    """Talk to this stack's Prefect API in this process (and sign S3 requests as the coordinator)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_DEFAULT_RESULT_STORAGE_BLOCK,
        temporary_settings,
    )

    env = stack.identity_env("coordinator")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with temporary_settings(
            {
                PREFECT_API_URL: stack.prefect_api,
                PREFECT_DEFAULT_RESULT_STORAGE_BLOCK: f"s3-bucket/{RESULTS_BLOCK}",
            }
        ):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
