"""The MLflow tracking server of the stack: SQLite in the state folder, artifacts proxied to SeaweedFS."""

from __future__ import annotations

import sys

from ops.state import MLFLOW_BUCKET, Stack
from ops.supervise import spawn


def start(stack: Stack) -> None:
    """Start ``mlflow server`` (one worker) signing as the ``mlflow`` identity."""
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
    spawn(stack, "mlflow", cmd, env)
