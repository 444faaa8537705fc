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
own identity, limited to exact per-silo prefixes (see :func:`_identities`).

The Prefect API requires authentication: the server runs with
``PREFECT_SERVER_API_AUTH_STRING``, a random secret generated once per stack
(``prefect/api-auth-string``, mode 0600), and every client the stack starts or
configures (workers, ``prefect deploy``, :func:`prefect_api`) sends it as
``PREFECT_API_AUTH_STRING``. Requests without it get HTTP 401 (``/api/health``
and ``/api/ready`` stay open for probes); the UI asks for the string once.
It is one shared secret: it keeps out whoever is not part of the federation,
not a participant that holds it, so each silo still enforces its own policy.

Silo policies. Each silo's worker is ``silotune silo join <silo> --policy
<state>/policies/<silo>.yaml``: the policy is loaded into the worker's process and
every run is checked against it before any data is read (:mod:`silotune.policy`).
Each silo has its own folder under the state, ``silos/<silo>/``: ``private/`` is its
``private_dir`` (signing key, CKKS secret, noise secret, ledgers, accepted configs,
``refusals.log``), shared with no other silo; ``data/`` holds the demo data of the
default policy. The coordinator's keys folder is ``coordinator/keys/``. Where the
policies come from:

- ``up(config=...)`` (``silotune stack up --config federation.yaml``, repeatable):
  each config is rewritten for the stack by :func:`stack_config` (store, tracking,
  orchestration, the silos' private folders, the coordinator's keys folder; every
  key created on this machine and pinned with :func:`silotune.keys.pin_local_keys`)
  and written to ``federations/<federation_id>.yaml`` (``silotune run`` it). Every
  silo's policy is then written *strict* from the configs it takes part in
  (:func:`silotune.policy.local_policy`): its federation ids, the configs'
  protection, signing, methods and DP settings as floors, the configs' data paths,
  this stack's S3 endpoint and key variables, the pinned coordinator key and base
  model; and the silo accepts each config (its signed fingerprint in
  ``private/accepted/``), so it runs each federation exactly as configured. A silo
  in several configs gets the weakest of their floors, while the acceptances still
  pin each federation's exact config. Existing policies are replaced.
- ``up()`` without a config keeps the policy files already in ``policies/`` (a silo's
  own, or written by an earlier ``up --config``) and writes a *default* policy for a
  silo that has none: any federation id and protection, DP optional, no acceptance,
  but uploads signed with pinned keys, the coordinator key of this stack pinned, the
  store pinned to this stack's S3 bucket and key variables, the private folder pinned,
  and the silo's data in ``silos/<silo>/data/`` (the deterministic demo data for the
  demo silos clinic, bank and lab; another silo's operator puts its files there).
  Such a policy runs only configs made for this stack: :func:`stack_config`
  (``silotune stack config``) pins the keys and folders.

A policy is read when its worker starts: after editing one, restart that silo's worker
(:func:`kill_worker` then :func:`start_worker`, or ``stack down`` and ``up``).

The workers run this checkout's code: they are ``python -m flows.cli ...`` with the
repository root as working directory and first on ``PYTHONPATH`` (not the
``silotune`` console script, which imports the installed package). Each worker gets
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of ``cpu_count // (silos + 1)`` (at least 1)
unless the caller's environment sets ``OMP_NUM_THREADS``: the silos, the coordinator
and the servers share one machine.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
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
PREFECT_AUTH_FILE = "prefect/api-auth-string"
# As silotune.config validates silo names: no '*', '?' or '/', so a name is literal in an S3 action.
SILO_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

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

    @property
    def prefect_auth_file(self) -> Path:
        return self.root / PREFECT_AUTH_FILE

    def prefect_auth_string(self) -> str:
        """The secret the Prefect server requires (``PREFECT_SERVER_API_AUTH_STRING``) and clients send."""
        try:
            return self.prefect_auth_file.read_text().strip()
        except FileNotFoundError:
            raise StackError(
                f"no Prefect API auth string in {self.prefect_auth_file} (`silotune stack up` creates it)"
            ) from None

    def prefect_env(self, identity: str = COORDINATOR_POOL) -> dict[str, str]:
        """The environment of a Prefect client of this stack acting for ``identity``.

        The coordinator (and ``prefect deploy``) keeps its flow results in the S3 result bucket. A silo
        has no right on that bucket and its own Prefect home: what a silo reports travels as signed
        JSON records in its own prefix of the data bucket, never through Prefect's result store.
        """
        env = {"PREFECT_API_URL": self.prefect_api, "PREFECT_API_AUTH_STRING": self.prefect_auth_string()}
        if identity == COORDINATOR_POOL:
            env["PREFECT_HOME"] = str(self.root / "prefect")
            env["PREFECT_DEFAULT_RESULT_STORAGE_BLOCK"] = f"s3-bucket/{RESULTS_BLOCK}"
        else:
            env["PREFECT_HOME"] = str(self.root / "workers" / identity / "prefect")
        return env

    def store_spec(self) -> dict[str, Any]:
        """The ``store`` section of a federation config that uses this stack's S3 bucket."""
        return {"kind": "s3", "endpoint_url": self.s3_endpoint, "bucket": DATA_BUCKET, "region": REGION}

    def tracking_spec(self, experiment: str = "silotune") -> dict[str, Any]:
        return {"kind": "mlflow", "uri": self.mlflow_uri, "experiment": experiment}

    def pools(self) -> list[str]:
        return [COORDINATOR_POOL, *(f"silo-{s}" for s in self.silos)]

    # the silos' and the coordinator's own folders
    def silo_dir(self, silo: str) -> Path:
        """The silo's folder (mode 0700): ``private/`` (its private_dir) and ``data/``."""
        return self.root / "silos" / silo

    def private_dir(self, silo: str) -> Path:
        return self.silo_dir(silo) / "private"

    def data_dir(self, silo: str) -> Path:
        return self.silo_dir(silo) / "data"

    def policy_path(self, silo: str) -> Path:
        """The policy file the silo's worker joins with (``silo join --policy``)."""
        return self.root / "policies" / f"{silo}.yaml"

    @property
    def keys_dir(self) -> Path:
        """The coordinator's keys folder (``security.keys_dir`` of configs made for this stack)."""
        return self.root / "coordinator" / "keys"

    def config_path(self, federation_id: str) -> Path:
        """Where ``up --config`` writes a config made for this stack."""
        return self.root / "federations" / f"{federation_id}.yaml"

    def federation_config(self, federation_id: str) -> Any:
        """A config ``up --config`` made for this stack (a :class:`~silotune.config.FederationConfig`)."""
        from silotune.config import load_config

        return load_config(self.config_path(federation_id))


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
    }
)


def _spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
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
    """What each S3 identity may do: SeaweedFS ``Action:bucket/key-pattern`` grants (see :func:`s3_allows`).

    The data bucket's layout gives every silo its own top-level prefixes, so each grant is one exact
    prefix ``<area>/<silo>/*`` (``*`` crosses ``/``, but the ``/`` after the silo's name keeps
    ``clinic`` from matching ``clinic2``; silo names cannot hold ``*`` or ``?``):

    ============ ========================================== ==========================================
    identity     may                                        why
    ============ ========================================== ==========================================
    silo-<s>     write ``updates/<s>/``                     its (signed; masked or encrypted) update
                 write ``results/<s>/``                     its signed result records (plain JSON)
                 write ``messages/<s>/``                    the secure-aggregation messages it sends
                 write ``published/<s>/``                   CKKS: the final adapter it decrypted, when
                                                            it is the designated publisher (readers
                                                            read only that silo's ``published/``)
                 read ``federations/``                      globals, CKKS pointers and aggregates,
                                                            survivors, manifests, the signed config
                 read ``messages/``                         peers' adverts, shares (encrypted to their
                                                            addressee) and unmask answers
                 read ``updates/**.ckks(.sig)``             CKKS: the listed ciphertexts, to recompute
                                                            the sum it decrypts (the shared key's limit:
                                                            see silotune.protection.ckks)
                 nothing else                               no list (readers read exact keys), no
                                                            ``updates/``/``results/`` of anyone (its own
                                                            included), no ``federations/`` write, no
                                                            Prefect result bucket, no MLflow bucket
                                                            (artifacts go through the MLflow server)
    coordinator  read, list the data bucket                 every silo's slots, to aggregate and check
                 write ``federations/``                     globals, aggregates, manifests, state, final
                                                            (never a silo's prefix: it cannot forge a
                                                            silo's update, message or published final)
                 read, write the Prefect result bucket      its own flows' results (``silotune run``)
    mlflow       read, write, list the MLflow bucket        artifacts it serves (``--serve-artifacts``)
    admin        everything                                 ``stack up`` creates the buckets; tests
    ============ ========================================== ==========================================

    SeaweedFS (4.48, checked against the real server in tests/integration/test_stack_s3.py) matches a
    grant with ``*`` or ``?`` as a glob over the whole ``Action:bucket/key`` (``*`` and ``?`` match
    ``/`` too); a grant without them counts only as ``Action:bucket``, the whole bucket, so
    ``Write:bucket/exact/key`` and ``Write:bucket/prefix/`` grant nothing. Keys are checked after
    ``//`` is collapsed and ``..`` is resolved (or refused), and a copy checks Read on its source.
    """
    d = DATA_BUCKET
    ids = {
        "admin": ["Admin", "Read", "Write", "List", "Tagging"],
        "coordinator": [
            f"Read:{d}",
            f"List:{d}",
            f"Write:{d}/federations/*",
            f"Read:{RESULTS_BUCKET}",
            f"Write:{RESULTS_BUCKET}",
        ],
        "mlflow": [f"Read:{MLFLOW_BUCKET}", f"Write:{MLFLOW_BUCKET}", f"List:{MLFLOW_BUCKET}"],
    }
    for s in silos:
        if not SILO_NAME.match(s):
            raise StackError(f"silo name {s!r}: lowercase letters, digits, '-' or '_' (at most 63)")
        ids[f"silo-{s}"] = [
            *(f"Write:{d}/{area}/{s}/*" for area in ("updates", "results", "messages", "published")),
            f"Read:{d}/federations/*",
            f"Read:{d}/messages/*",
            # CKKS: a silo decrypts only a sum it recomputed from the listed, signed uploads. Only
            # ciphertexts (and their signatures) are readable; plaintext and masked uploads are not.
            f"Read:{d}/updates/*.ckks",
            f"Read:{d}/updates/*.ckks.sig",
        ]
    return ids


def s3_allows(actions: Iterable[str], action: str, bucket: str, key: str = "") -> bool:
    """Whether SeaweedFS grants ``action`` on ``bucket/key`` to an identity holding ``actions``.

    A pure-Python copy of the matching observed on the real server (``Identity.CanDo``): a bare
    action (``Read``) covers every bucket; ``Admin`` everything; a grant with ``*``/``?`` is a glob
    over ``Action:bucket/key`` where both match any character, ``/`` included; a grant without them
    is ``Action:bucket`` or ``Admin:bucket`` for the whole bucket and nothing narrower. Keys are
    normalized as the server does (leading ``/`` dropped, ``//`` collapsed).
    """
    acts = list(actions)
    if "Admin" in acts or action in acts:
        return True
    if not bucket:
        return False
    key = re.sub(r"/+", "/", key.replace("\\", "/")).lstrip("/")
    path = f"{bucket}/{key}" if key else bucket
    for a in acts:
        if any(c in a for c in "*?"):
            # fnmatch without character classes: escape '[' so only '*' and '?' are special.
            pattern = a.replace("[", "[[]")
            if any(fnmatch.fnmatchcase(f"{act}:{path}", pattern) for act in (action, "Admin")):
                return True
        elif a in (f"{action}:{bucket}", f"Admin:{bucket}"):
            return True
    return False


def _write_identities(stack: Stack, actions: dict[str, list[str]] | None = None) -> None:
    """Keys (generated once, kept) and SeaweedFS's identities file for ``actions`` (default: the stack's)."""
    d = stack.root / "s3"
    d.mkdir(parents=True, exist_ok=True)
    cred_file = d / "credentials.json"
    creds: dict[str, dict[str, str]] = json.loads(cred_file.read_text()) if cred_file.is_file() else {}
    actions = _identities(stack.silos) if actions is None else actions
    for ident in actions:
        creds.setdefault(
            ident,
            {"access_key": f"{ident[:12]}-{secrets.token_hex(6)}", "secret_key": secrets.token_urlsafe(30)},
        )
    _write_secret(cred_file, json.dumps(creds, indent=2))
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
    _write_secret(d / "identities.json", json.dumps(config, indent=2))


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)  # also when the file existed with looser bits


def _write_prefect_auth(stack: Stack) -> None:
    """Generate the stack's Prefect API auth string once (kept across ``down``/``up``, mode 0600)."""
    f = stack.prefect_auth_file
    current = f.read_text().strip() if f.is_file() else ""
    _write_secret(f, current or f"silotune:{secrets.token_urlsafe(32)}")


@contextlib.contextmanager
def _api_settings(stack: Stack) -> Iterator[None]:
    """Prefect settings of this process that reach (and authenticate to) this stack's API."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings(
        {PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: stack.prefect_auth_string()}
    ):
        yield


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


# --- configs and policies ----------------------------------------------------------------------


def _silo_folder(stack: Stack, silo: str) -> Path:
    """Create the silo's folder and private folder, readable by the owner only."""
    for d in (stack.silo_dir(silo), stack.private_dir(silo)):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
    return stack.private_dir(silo)


def stack_config(stack: Stack, config: Any) -> Any:
    """``config`` (a :class:`~silotune.config.FederationConfig`) as it runs on this stack, keys pinned.

    Replaced: ``store`` (this stack's bucket), ``tracking`` (this stack's MLflow server; the experiment
    and registered model are kept), ``orchestration.mode`` (``workpools``; the timeouts are kept), each
    silo's ``private_dir`` (``silos/<silo>/private``, its own) and ``work_pool`` (the stack's
    ``silo-<silo>``), and ``security.keys_dir`` (``coordinator/keys``). Data paths are made absolute.
    Then :func:`silotune.keys.pin_local_keys` creates what is missing (the silos' signing keys, the
    coordinator's, for CKKS the shared context) and pins the public keys in the config (signing on):
    they are part of the fingerprint every silo accepts.
    """
    from silotune.config import parse_config
    from silotune.errors import SilotuneError
    from silotune.keys import pin_local_keys

    unknown = [s.name for s in config.silos if s.name not in stack.silos]
    if unknown:
        raise StackError(
            f"federation {config.federation_id}: silo(s) {', '.join(unknown)} not on this stack "
            f"(silos {', '.join(stack.silos)}; `stack up --silos` names them)"
        )
    data = config.model_dump(mode="json")
    tracking = stack.tracking_spec(config.tracking.experiment)
    if config.tracking.registered_model:
        tracking["registered_model"] = config.tracking.registered_model
    data.update(
        store=stack.store_spec(),
        tracking=tracking,
        orchestration={**data["orchestration"], "mode": "workpools"},
        security={**data["security"], "keys_dir": str(stack.keys_dir)},
    )
    for silo in data["silos"]:
        silo.update(private_dir=str(_silo_folder(stack, silo["name"])), work_pool=None)
        for key in ("train_path", "eval_path"):
            if silo.get(key):
                silo[key] = str(Path(silo[key]).expanduser().resolve())
    try:
        return pin_local_keys(parse_config(data, source=f"federation {config.federation_id} on the stack"))
    except SilotuneError as exc:
        raise StackError(str(exc)) from None


def _stack_store(stack: Stack) -> Any:
    from silotune.config import StoreSpec

    return StoreSpec(**stack.store_spec())


def _coordinator_public_key(stack: Stack) -> Path:
    """The coordinator's public key file (its signing key created once, kept)."""
    from silotune.keys import CoordinatorKeys

    return CoordinatorKeys(stack.keys_dir).create_signing_key()


def _default_data(stack: Stack, silo: str) -> tuple[Path, Path]:
    """The data of a silo's default policy: ``silos/<silo>/data/{train,eval}.jsonl`` (demo data written
    for the demo silos when missing)."""
    d = stack.data_dir(silo)
    train, holdout = d / "train.jsonl", d / "eval.jsonl"
    if train.is_file() and holdout.is_file():
        return train, holdout
    from silotune.demo import DEMO_SILOS, make_demo_silos

    if silo not in {s.name for s in DEMO_SILOS}:
        raise StackError(
            f"silo {silo}: no data for its default policy; put its training data in {train} and its "
            f"holdout in {holdout}, or start the stack with `--config` (a federation config naming its data)"
        )
    import tempfile

    _silo_folder(stack, silo)
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=stack.root) as tmp:
        made = make_demo_silos(tmp, seed=0)[silo]
        shutil.copyfile(made["train"], train)
        shutil.copyfile(made["eval"], holdout)
    return train, holdout


def default_policy(stack: Stack, silo: str) -> Any:
    """A silo's policy on this stack when no config names it (see the module docstring).

    Pinned: the silo's private folder and data, this stack's S3 bucket and key variables, signed
    uploads (so the config must pin every silo's public key) and the coordinator key of this stack.
    Open: the federation id, the protection, the method, DP; no acceptance needed.
    """
    from silotune.policy import PROTECTION_ORDER, DPPolicy, SiloPolicy, StoreKeysPolicy, store_location

    train, holdout = _default_data(stack, silo)
    store = _stack_store(stack)
    return SiloPolicy(
        silo=silo,
        private_dir=str(_silo_folder(stack, silo)),
        train_path=str(train),
        eval_path=str(holdout),
        federations=["*"],
        coordinator_key=str(_coordinator_public_key(stack)),
        methods=None,
        protection=list(PROTECTION_ORDER),
        require_signing=True,
        dp=DPPolicy(require_sample_dp=False),
        stores=[store_location(store).text],
        store_keys=StoreKeysPolicy.from_spec(store),
        require_accepted_config=False,
    )


def _weakest(values: list[Any], pick: Any) -> Any:
    """None when any value is None (no floor or cap), else ``pick`` of them."""
    return None if any(v is None for v in values) else pick(values)


def merge_policies(policies: list[Any]) -> Any:
    """One policy for a silo that takes part in several federations, from their strict policies.

    Federations, methods and protection schemes: the union; signing: required if every one requires
    it; DP: the weakest floors (a cap or floor only when every policy has one). Data, private folder,
    stores and key variables must agree. Acceptance stays required, so each federation still runs only
    with the exact config its silo accepted.
    """
    from silotune.policy import PROTECTION_ORDER, DPPolicy, SiloPolicy

    first = policies[0]
    if len(policies) == 1:
        return first
    agreed = ("silo", "private_dir", "train_path", "eval_path", "stores", "store_keys", "coordinator_key")
    for field_ in agreed:
        values = {json.dumps(getattr(p, field_), default=str, sort_keys=True) for p in policies}
        if len(values) > 1:
            raise StackError(
                f"silo {first.silo}: the configs disagree on its {field_} ({', '.join(sorted(values))}); "
                "a silo has one data set, private folder and store"
            )
    dps = [p.dp for p in policies]
    sample = all(d.require_sample_dp for d in dps)
    client = all(d.require_client_dp for d in dps)
    dp = DPPolicy(
        require_sample_dp=sample,
        max_epsilon=_weakest([d.max_epsilon for d in dps], max) if sample else None,
        max_lifetime_epsilon=_weakest([d.max_lifetime_epsilon for d in dps], max) if sample else None,
        min_noise_multiplier=_weakest([d.min_noise_multiplier for d in dps], min) if sample else None,
        max_delta=_weakest([d.max_delta for d in dps], max) if sample else None,
        require_client_dp=client,
        max_client_epsilon=_weakest([d.max_client_epsilon for d in dps], max) if client else None,
    )
    federations: list[str] = []
    for p in policies:
        federations += [f for f in p.federations if f not in federations]
    any_method = any(p.methods is None for p in policies)
    methods = None if any_method else sorted({m for p in policies for m in p.methods or []})
    shas = {p.base_model_sha256 for p in policies}
    return SiloPolicy(
        **{
            **first.model_dump(),
            "federations": federations,
            "methods": methods,
            "protection": [x for x in PROTECTION_ORDER if any(x in p.protection for p in policies)],
            "require_signing": all(p.require_signing for p in policies),
            "dp": dp,
            "base_model_sha256": shas.pop() if len(shas) == 1 else None,
            "allow_attack_simulation": any(p.allow_attack_simulation for p in policies),
            "require_accepted_config": True,
        }
    )


def write_policies(stack: Stack, configs: list[Any] | None = None, *, echo: Any = print) -> dict[str, Path]:
    """Every silo's policy file, ``policies/<silo>.yaml``; returns them by silo.

    A silo in ``configs`` (configs made for this stack by :func:`stack_config`) gets the strict policy
    of the configs it takes part in (:func:`silotune.policy.local_policy`, merged by
    :func:`merge_policies`), with this stack's coordinator key and the base model's weights pinned, and
    accepts each of those configs. Any other silo keeps its policy file, or gets :func:`default_policy`.
    Each policy must load and its data files must exist, else :class:`StackError` (before any worker
    starts).
    """
    from silotune.errors import SilotuneError
    from silotune.policy import accept_config, dump_policy, load_policy, local_policy, model_weights_sha256

    configs = list(configs or [])
    coordinator_key = str(_coordinator_public_key(stack))
    hashes: dict[str, str | None] = {}

    def model_sha(cfg: Any) -> str | None:
        key = cfg.model.model_dump_json()
        if key not in hashes:
            try:
                hashes[key] = model_weights_sha256(cfg.model)
            except (SilotuneError, OSError) as exc:
                echo(f"policies         base model {cfg.model.name_or_path} not pinned: {exc}")
                hashes[key] = None
        return hashes[key]

    out: dict[str, Path] = {}
    for silo in stack.silos:
        path = stack.policy_path(silo)
        mine = [c for c in configs if silo in {s.name for s in c.silos}]
        try:
            if mine:
                policy = merge_policies(
                    [
                        local_policy(c, silo, coordinator_key=coordinator_key, base_model_sha256=model_sha(c))
                        for c in mine
                    ]
                )
                fids = ", ".join(c.federation_id for c in mine)
                dump_policy(
                    policy,
                    path,
                    header=f"Policy of silo {silo} on this stack: strict, for federation(s) {fids} (the "
                    "configs' protection, signing, methods and DP as floors; each config accepted). Written "
                    "by `silotune stack up --config`; restart the silo's worker after editing it.",
                )
                for c in mine:
                    accept_config(policy, c, replace=True, create_key=True)
            elif not path.is_file():
                dump_policy(
                    default_policy(stack, silo),
                    path,
                    header=f"Default policy of silo {silo} on this stack (no federation config given to "
                    "`silotune stack up`): any federation, protection and DP, but signed uploads, this "
                    "stack's coordinator key and S3 bucket, and the silo's own folders. Tighten it (then "
                    "restart the silo's worker) or start the stack with `--config`.",
                )
            policy = load_policy(path)
        except SilotuneError as exc:
            raise StackError(f"silo {silo}: {exc}") from None
        if policy.silo != silo:
            raise StackError(f"{path} is the policy of silo {policy.silo!r}, not {silo!r}")
        for key in ("train_path", "eval_path"):
            value = getattr(policy, key)
            if value is not None and not Path(value).is_file():
                raise StackError(f"silo {silo}: {key} of its policy {path}: file not found: {value}")
        out[silo] = path
    return out


def _as_configs(config: Any) -> list[Any]:
    """``up``'s ``config``: None, a config or a path, or a list of them, as FederationConfigs."""
    from silotune.config import FederationConfig, load_config
    from silotune.errors import SilotuneError

    if config is None:
        return []
    items = [config] if isinstance(config, FederationConfig | str | Path) else list(config)
    out = []
    for item in items:
        try:
            out.append(item if isinstance(item, FederationConfig) else load_config(item))
        except SilotuneError as exc:
            raise StackError(str(exc)) from None
    ids = [c.federation_id for c in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise StackError(f"federation id(s) {', '.join(dup)} given more than once")
    return out


def configure(stack: Stack, configs: list[Any], *, echo: Any = print) -> list[Any]:
    """Make each config for this stack (:func:`stack_config`), write it to ``federations/<id>.yaml``,
    then write every silo's policy (:func:`write_policies`). Returns the configs made for the stack."""
    from silotune.config import dump_config

    made = [stack_config(stack, c) for c in configs]
    for c in made:
        stack.config_path(c.federation_id).parent.mkdir(parents=True, exist_ok=True)
        dump_config(c, stack.config_path(c.federation_id))
    write_policies(stack, made, echo=echo)
    return made


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
        # Every API request needs the stack's secret (HTTP basic auth; the UI asks for it once).
        "PREFECT_SERVER_API_AUTH_STRING": stack.prefect_auth_string(),
        "PREFECT_API_AUTH_STRING": stack.prefect_auth_string(),
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
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    with _api_settings(stack):
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

    with _api_settings(stack), get_client(sync_client=True) as client:
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


def worker_env(stack: Stack, identity: str) -> dict[str, str]:
    """A worker's environment: its Prefect client and S3 identity, this checkout's code, its threads."""
    env = {**stack.prefect_env(identity), **stack.identity_env(identity), "SILOTUNE_HOME": str(REPO_ROOT)}
    # This checkout's flows, tasks and silotune first, whatever package the interpreter has installed.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if "OMP_NUM_THREADS" not in os.environ:  # the silos, the coordinator and the servers share the cores
        threads = str(max(1, (os.cpu_count() or 1) // (len(stack.silos) + 1)))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def _start_worker(stack: Stack, pool: str) -> None:
    if pool == COORDINATOR_POOL:
        identity = "coordinator"
        cmd = [sys.executable, "-m", "flows.cli", "worker", pool]
    else:
        identity = pool
        silo = pool.removeprefix("silo-")
        # The silo's own policy, loaded into the worker's process: every run is checked against it.
        policy = str(stack.policy_path(silo))
        cmd = [sys.executable, "-m", "flows.cli", "silo", "join", silo, "--policy", policy]
    env = worker_env(stack, identity)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    _spawn(stack, f"worker-{pool}", cmd, env, cwd=REPO_ROOT)


def _online_workers(stack: Stack, pool: str) -> set[str]:
    from prefect.client.orchestration import get_client

    with _api_settings(stack), get_client(sync_client=True) as client:
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


def restart_worker(stack: Stack, *pools: str, timeout: float = 120.0) -> None:
    """Stop pools' workers and start them again (a silo's worker reads its policy when it starts)."""
    running = [f"worker-{p}" for p in pools if f"worker-{p}" in stack.pids]
    _terminate(stack, running, 15.0, lambda *_: None)  # SIGTERM: each deregisters; SIGKILL after 15 s
    start_worker(stack, *pools, timeout=timeout)


# --- commands ----------------------------------------------------------------------------------


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
) -> Stack:
    """Start the whole stack and return once every part is healthy; on any failure, stop what started.

    ``config``: federation config(s) (FederationConfig objects or YAML paths) the stack is for: each is
    made for the stack (``federations/<id>.yaml``) and every silo's policy is written strict from them
    (see the module docstring). The stack's silos are then the configs' silos, unless ``silos`` names
    them (a superset). Without a config, existing policy files are kept and missing ones get the
    default policy. Everything is written before any process starts.
    """
    t0 = time.monotonic()
    configs = _as_configs(config)
    stack = Stack.load(root)
    if stack.ports and any(_alive(p) for p in stack.pids.values()):
        running = sorted(n for n, p in stack.pids.items() if _alive(p))
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
    if stack.database == "postgres" and "postgres" not in stack.ports:
        stack.ports["postgres"] = free_ports(["postgres"])["postgres"] if auto_ports else 5432
    stack.pids = {}
    busy = sorted(f"{n}={p}" for n, p in stack.ports.items() if port_open(p))
    if busy:
        raise StackError(
            f"port(s) already in use on 127.0.0.1: {', '.join(busy)} (another stack? `silotune stack down`)"
        )
    for s in stack.silos:
        if not SILO_NAME.match(s):
            raise StackError(f"silo name {s!r}: lowercase letters, digits, '-' or '_' (at most 63)")
    stack.save()
    _write_identities(stack)
    _write_prefect_auth(stack)
    if configs:
        for c in configure(stack, configs, echo=echo):
            echo(f"federation       {c.federation_id}: {stack.config_path(c.federation_id)}")
        echo(f"policies         {stack.root / 'policies'} (strict, from the config(s); each config accepted)")
    else:
        write_policies(stack, echo=echo)
        echo(f"policies         {stack.root / 'policies'} (kept, or this stack's default policy)")
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
        echo(f"Prefect server   {stack.prefect_ui}  (API auth string: {stack.prefect_auth_file})")
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
        # The Prefect API and UI ask for the string in this file (mode 0600).
        "prefect_auth_file": str(stack.prefect_auth_file) if stack.prefect_auth_file.is_file() else None,
        "silos": stack.silos,
        # Each silo worker joins with its own policy (`silotune silo policy show FILE`).
        "policies": {s: str(stack.policy_path(s)) for s in stack.silos if stack.policy_path(s).is_file()},
        "running": bool(procs) and all(procs.values()),
    }


@contextlib.contextmanager
def prefect_api(stack: Stack) -> Iterator[None]:
    """Talk to this stack's Prefect API (with its auth string) here; sign S3 requests as the coordinator."""
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
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
                PREFECT_API_AUTH_STRING: stack.prefect_auth_string(),
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
