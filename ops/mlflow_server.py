"""The MLflow tracking server of the stack: artifacts proxied to SeaweedFS.

Its backend store is SQLite in the state folder, or PostgreSQL's ``mlflow`` database with
``up --database postgres``. With ``up --tls`` it serves HTTPS (uvicorn's ``--ssl-*`` options) with
MLflow's basic-auth app (``--app-name basic-auth``): one user per role (:func:`ops.credentials.
write_mlflow_users`; admin, coordinator, reader), default permission READ, users and permissions in
the ``mlflow_auth`` database (PostgreSQL) or ``mlflow/auth.db``.
"""

from __future__ import annotations

import json
import secrets
import sys
import urllib.request
from base64 import b64encode

from ops.credentials import write_mlflow_users, write_secret
from ops.state import MLFLOW_BUCKET, Stack, StackError
from ops.supervise import spawn
from ops.tls import SERVER_CERT, SERVER_KEY, client_context


def _db_uri(stack: Stack, name: str) -> str:
    if stack.database == "postgres":
        return f"postgresql+psycopg2://postgres@127.0.0.1:{stack.ports['postgres']}/{name}"
    return f"sqlite:///{stack.root / 'mlflow' / (name + '.db')}"


def start(stack: Stack) -> None:
    """Start ``mlflow server`` (one worker) signing as the ``mlflow`` identity."""
    d = stack.root / "mlflow"
    d.mkdir(parents=True, exist_ok=True)
    env = {
        **stack.identity_env("mlflow"),
        # The server reaches SeaweedFS on loopback (the certificate names 127.0.0.1 too).
        "MLFLOW_S3_ENDPOINT_URL": f"{stack.scheme}://127.0.0.1:{stack.ports['s3']}",
        # The default job runner spawns ~15 processes (~1.8 GB); federations do not need it.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **({"AWS_CA_BUNDLE": str(stack.ca_file)} if stack.ca_file else {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        stack.host,
        "--port",
        str(stack.ports["mlflow"]),
        "--workers",
        "1",
        "--backend-store-uri",
        _db_uri(stack, "mlflow"),
        "--artifacts-destination",
        f"s3://{MLFLOW_BUCKET}/artifacts",
    ]
    if stack.tls:
        users = write_mlflow_users(stack)
        ini = d / "auth.ini"
        write_secret(
            ini,
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {_db_uri(stack, 'mlflow_auth')}\n"
            "admin_username = admin\n"
            f"admin_password = {users['admin']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        )
        key_file = d / "flask-secret"
        if not key_file.is_file():
            write_secret(key_file, secrets.token_urlsafe(32))
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(ini),
            MLFLOW_FLASK_SERVER_SECRET_KEY=key_file.read_text().strip(),
        )
        cert, key = stack.tls_dir / SERVER_CERT, stack.tls_dir / SERVER_KEY
        cmd += ["--app-name", "basic-auth", "--uvicorn-opts", f"--ssl-certfile {cert} --ssl-keyfile {key}"]
    spawn(stack, "mlflow", cmd, env)


def _call(stack: Stack, method: str, path: str, body: dict | None = None) -> dict:
    users = stack.mlflow_users()
    req = urllib.request.Request(
        f"{stack.mlflow_uri}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + b64encode(f"admin:{users['admin']}".encode()).decode(),
        },
    )
    with urllib.request.urlopen(req, timeout=10, context=client_context(stack.ca_file)) as r:
        return json.loads(r.read() or b"{}")


def configure_users(stack: Stack) -> None:
    """Create the coordinator and reader users (once); the admin exists from the server's first start."""
    if not stack.tls:
        return
    for role, password in stack.mlflow_users().items():
        if role == "admin":
            continue
        try:
            _call(stack, "GET", f"users/get?username={role}")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise StackError(f"MLflow: cannot read user {role}: HTTP {exc.code}") from None
            _call(stack, "POST", "users/create", {"username": role, "password": password})
