"""SeaweedFS, the stack's S3 service: ``weed mini`` on loopback, data in the state folder.

It serves three buckets (the federations' data, the coordinator's Prefect results, MLflow's
artifacts) to the identities of :mod:`ops.credentials`, read from ``s3/identities.json``.

With TLS (``stack up --tls``) the S3 port speaks HTTPS with the stack's server certificate. SeaweedFS
itself always binds loopback: ``weed mini`` has one bind address for all its servers, and its master,
volume and filer ports have no authentication. On a stack that serves other hosts (``--host``), a
TCP relay (``socat``, Debian's package) forwards only the S3 port from the host's address to loopback;
TLS runs end to end between the client and SeaweedFS, the relay sees ciphertext only.
"""

from __future__ import annotations

import shutil

from ops.credentials import s3_client
from ops.state import DATA_BUCKET, MLFLOW_BUCKET, RESULTS_BUCKET, Stack, StackError
from ops.supervise import find_bin, port_open, spawn, wait_until
from ops.tls import SERVER_CERT, SERVER_KEY, is_loopback


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
    if stack.tls:
        cmd += [f"-s3.cert.file={stack.tls_dir / SERVER_CERT}", f"-s3.key.file={stack.tls_dir / SERVER_KEY}"]
    spawn(stack, "seaweedfs", cmd, {})


def wait_ready(stack: Stack, timeout: float) -> None:
    """Wait until the stack's buckets exist (the S3 port opens before a bucket can be created).

    On a stack serving other hosts, the relay starts once SeaweedFS listens on loopback (SeaweedFS checks
    at start-up that its ports are free, on every address).
    """
    if not is_loopback(stack.host):
        wait_until("SeaweedFS (S3)", lambda: port_open(stack.ports["s3"]), timeout, stack, "seaweedfs")
        _start_relay(stack)

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


def _start_relay(stack: Stack) -> None:
    """Forward the S3 port from the stack's host address to SeaweedFS on loopback (TLS passes through)."""
    p = stack.ports
    socat = shutil.which("socat")
    if socat is None:
        raise StackError("socat not found: a stack serving other hosts needs it (infra/install.sh)")
    relay = [
        socat,
        f"TCP-LISTEN:{p['s3']},bind={stack.host},reuseaddr,fork",
        f"TCP:127.0.0.1:{p['s3']}",
    ]
    spawn(stack, "s3-relay", relay, {})
