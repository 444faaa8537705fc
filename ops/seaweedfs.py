"""SeaweedFS, the stack's S3 service: ``weed mini`` on loopback, data in the state folder.

It serves three buckets (the federations' data, the coordinator's Prefect results, MLflow's
artifacts) to the identities of :mod:`ops.credentials`, read from ``s3/identities.json``.
"""

from __future__ import annotations

from ops.credentials import s3_client
from ops.state import DATA_BUCKET, MLFLOW_BUCKET, RESULTS_BUCKET, Stack
from ops.supervise import find_bin, spawn, wait_until


def start(stack: Stack) -> None:
    """Start ``weed mini`` with every port of the stack given explicitly and telemetry off."""
    p = stack.ports
    data = stack.root / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        find_bin("weed"),
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
    spawn(stack, "seaweedfs", cmd, {})


def wait_ready(stack: Stack, timeout: float) -> None:
    """Wait until the stack's buckets exist (the S3 port opens before a bucket can be created)."""

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

    wait_until("SeaweedFS (S3)", ready, timeout, stack, "seaweedfs")
