"""The Prefect server of the stack, its work pools and deployments, and clients that reach it.

The server runs on loopback with the stack's API auth string (see :mod:`ops.credentials`) on SQLite
in the state folder, or on PostgreSQL (:mod:`ops.postgres`) with ``up --database postgres``. With
``up --tls`` it is Prefect's own ASGI app under uvicorn with the stack's certificate (what ``prefect
server start`` runs, plus uvicorn's ``--ssl-*`` options), listening on the stack's host address. Its work
pools are ordinary ``process`` pools, one for the coordinator and one per silo (``silo-<name>``), and
``deployments/prefect.yaml`` registers the flows on them.

Prefect (and prefect-aws) are imported inside the functions: about 2 s that ``stack status`` and
``stack down`` do not need.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import yaml

from ops.state import REGION, REPO_ROOT, RESULTS_BLOCK, RESULTS_BUCKET, Stack, StackError
from ops.supervise import find_bin, spawn
from ops.tls import SERVER_CERT, SERVER_KEY
from silotune.modeling import OFFLINE_ENV


def start(stack: Stack) -> None:
    """Start the Prefect server (``prefect server start``) on the stack's port, with its auth string."""
    (stack.root / "prefect").mkdir(parents=True, exist_ok=True)
    env = {
        "PREFECT_HOME": str(stack.root / "prefect"),
        "PREFECT_SERVER_API_HOST": stack.host,
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
    port = str(stack.ports["prefect"])
    cmd = [find_bin("prefect"), "server", "start", "--host", stack.host, "--port", port]
    if stack.tls:
        import prefect  # the app's folder, as `prefect server start` passes it to uvicorn

        env["PREFECT__SERVER_FINAL"] = "1"
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(prefect.__module_path__.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            stack.host,
            "--port",
            port,
            "--ssl-certfile",
            str(stack.tls_dir / SERVER_CERT),
            "--ssl-keyfile",
            str(stack.tls_dir / SERVER_KEY),
        ]
    spawn(stack, "prefect-server", cmd, env)


def _tls_settings(stack: Stack) -> dict:
    from prefect.settings import PREFECT_API_SSL_CERT_FILE

    return {PREFECT_API_SSL_CERT_FILE: str(stack.ca_file)} if stack.ca_file else {}


@contextlib.contextmanager
def api_settings(stack: Stack) -> Iterator[None]:
    """Prefect settings of this process that reach (and authenticate to) this stack's API."""
    # prefect takes ~1 s to import: ops.stack imports this module for `stack status`/`down`
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings(
        {
            PREFECT_API_URL: stack.prefect_api,
            PREFECT_API_AUTH_STRING: stack.prefect_auth_string(),
            **_tls_settings(stack),
        }
    ):
        yield


def configure(stack: Stack) -> None:
    """Work pools (coordinator + one process pool per silo) and the S3 result-storage block."""
    # prefect takes ~1 s to import: ops.stack imports this module for `stack status`/`down`
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    with api_settings(stack):
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
    cmd = [find_bin("prefect"), "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml"]
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


def deployed(stack: Stack) -> bool:
    """Whether the coordinator's deployment is registered (``up`` then keeps the deployments as they are)."""
    # prefect takes ~1 s to import: ops.stack imports this module for `stack status`/`down`
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with api_settings(stack), get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name("federated-training/federated-training")
        except ObjectNotFound:
            return False
    return True


def _declared_silo_deployments() -> set[str]:
    """The silo deployments ``deployments/prefect.yaml`` declares, as ``<flow>/<name>``."""
    flows = {":silo_round": "silo-round", ":silo_evaluate": "silo-evaluate", ":silo_step": "silo-step"}
    data = yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())
    out = set()
    for d in data.get("deployments", []):
        for suffix, flow_name in flows.items():
            if d["entrypoint"].endswith(suffix):
                out.add(f"{flow_name}/{d['name']}")
    return out


@contextlib.contextmanager
def prefect_api(stack: Stack) -> Iterator[None]:
    """Talk to this stack's Prefect API (with its auth string) here; sign S3 requests as the coordinator."""
    # prefect takes ~1 s to import: ops.stack imports this module for `stack status`/`down`
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_DEFAULT_RESULT_STORAGE_BLOCK,
        temporary_settings,
    )

    env = {**stack.identity_env("coordinator"), **stack.tls_env(), **stack.mlflow_env("coordinator")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with temporary_settings(
            {
                PREFECT_API_URL: stack.prefect_api,
                PREFECT_API_AUTH_STRING: stack.prefect_auth_string(),
                PREFECT_DEFAULT_RESULT_STORAGE_BLOCK: f"s3-bucket/{RESULTS_BLOCK}",
                **_tls_settings(stack),
            }
        ):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def online_workers(stack: Stack, pool: str) -> set[str]:
    """The names of the workers the server counts as online on ``pool``."""
    # prefect takes ~1 s to import: ops.stack imports this module for `stack status`/`down`
    from prefect.client.orchestration import get_client

    with api_settings(stack), get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(pool)
    return {w.name for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"}
