"""TLS and plain-HTTP rules of the links between hosts (no network namespaces needed: loopback servers).

A silo refuses, with one line, a Prefect API whose certificate the pinned CA did not sign, one that has
expired, and one not yet valid (what a silo with a wrong clock sees); a store, a tracker or ``silo join``
given plain ``http://`` to a non-loopback host refuses before sending anything.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import os
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ops.state import REPO_ROOT
from ops.tls import make_ca, make_server_cert
from silotune.config import StoreSpec, TrackingSpec
from silotune.errors import SilotuneError, StoreError
from silotune.store import S3Store


def test_store_refuses_plain_http_to_another_host() -> None:
    with pytest.raises(StoreError, match=r"store.endpoint_url: plain http:// to 10.213.0.1 is refused"):
        S3Store(StoreSpec(kind="s3", endpoint_url="http://10.213.0.1:8333", bucket="b"))
    # Nothing is contacted: the store refuses when it is opened.
    S3Store(StoreSpec(kind="s3", endpoint_url="http://127.0.0.1:8333", bucket="b"))  # loopback: allowed
    S3Store(StoreSpec(kind="s3", endpoint_url="https://10.213.0.1:8333", bucket="b"))


def test_tracker_refuses_plain_http_to_another_host() -> None:
    from silotune.tracking import MlflowTracker

    with pytest.raises(SilotuneError, match=r"tracking.uri: plain http:// to coordinator is refused"):
        MlflowTracker(TrackingSpec(uri="http://coordinator:5000"))


@contextlib.contextmanager
def _https_server(cert: Path, key: Path):
    """An HTTPS server on a free loopback port that answers 200 to everything."""

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"https://127.0.0.1:{srv.server_address[1]}/api"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """The consortium's CA, another CA, and server certificates: good, foreign, expired, not yet valid."""
    root = tmp_path_factory.mktemp("pki")
    ours, theirs = root / "ours", root / "theirs"
    make_ca(ours)
    make_ca(theirs, name="someone else's CA")
    now = dt.datetime.now(dt.UTC)
    out = {"ca": ours / "ca.pem"}
    out["good"], out["good.key"] = make_server_cert(ours, ["127.0.0.1"], name="good")
    out["foreign"], out["foreign.key"] = make_server_cert(theirs, ["127.0.0.1"], name="foreign")
    out["expired"], out["expired.key"] = make_server_cert(
        ours, ["127.0.0.1"], name="expired", valid_from=now - dt.timedelta(days=30), days=10
    )
    out["future"], out["future.key"] = make_server_cert(
        ours, ["127.0.0.1"], name="future", valid_from=now + dt.timedelta(days=2), days=10
    )
    return out


def _policy(tmp_path: Path, demo_data) -> Path:
    from silotune.policy import SiloPolicy, dump_policy

    path = tmp_path / "clinic.yaml"
    dump_policy(
        SiloPolicy(
            silo="clinic",
            private_dir=str(tmp_path / "private"),
            train_path=str(demo_data["clinic"]["train"]),
            eval_path=str(demo_data["clinic"]["eval"]),
            federations=["*"],
            stores=["s3://127.0.0.1:8333/silotune"],
        ),
        path,
    )
    return path


def _join(policy: Path, api: str, ca: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "AWS_", "SSL_CERT"))} | {
        "PREFECT_API_SSL_CERT_FILE": str(ca),
        "PYTHONPATH": str(REPO_ROOT),
        "COLUMNS": "300",
    }
    cmd = [sys.executable, "-m", "cli", "silo", "join", "clinic", "--policy", str(policy), "--api-url", api]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


WHY = {
    "foreign": "its certificate is not signed by the pinned CA",
    "expired": "its certificate has expired, or this host's clock is ahead",
    "future": "its certificate is not yet valid, or this host's clock is behind",
}


@pytest.mark.parametrize("cert", sorted(WHY))
def test_a_server_the_pinned_ca_does_not_vouch_for_is_refused_in_one_line(pki, cert: str) -> None:
    from ops.tls import TLSError, probe

    with _https_server(pki[cert], pki[f"{cert}.key"]) as api, pytest.raises(TLSError) as err:
        probe(f"{api}/health", pki["ca"], "api")
    assert str(err.value).startswith(f"refusing {api}/health: {WHY[cert]}")
    assert "\n" not in str(err.value)


def test_silo_join_refuses_a_foreign_certificate(pki, tmp_path, demo_data) -> None:
    with _https_server(pki["foreign"], pki["foreign.key"]) as api:
        out = _join(_policy(tmp_path, demo_data), api, pki["ca"])
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"refusing {api}/health: {WHY['foreign']}" in errors[0], text[-2000:]


def test_silo_join_refuses_plain_http_to_another_host(tmp_path, pki, demo_data) -> None:
    out = _join(_policy(tmp_path, demo_data), "http://coordinator.invalid:4200/api", pki["ca"])
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in text, text[-2000:]
    assert "plain http:// to coordinator.invalid is refused" in text, text[-2000:]


def test_probe_accepts_the_consortium_certificate(pki) -> None:
    from ops.tls import probe

    with _https_server(pki["good"], pki["good.key"]) as api:
        probe(f"{api}/health", pki["ca"], "api")  # no error
