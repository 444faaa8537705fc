"""The consortium's small certificate authority, and the rules for the links that use it.

``silotune ca init`` (or ``stack up --tls``) makes a CA (``tls/ca.pem``; its key ``tls/ca.key``, mode
0600, stays with whoever admits hosts) and a server certificate for the coordinator's services
(``tls/server.pem`` and ``tls/server.key``) naming the addresses clients use (its IPs and DNS names).
Every client pins the CA: Prefect (``PREFECT_API_SSL_CERT_FILE``), boto3 (``AWS_CA_BUNDLE``), MLflow
(``MLFLOW_TRACKING_SERVER_CERT_PATH``); a server whose certificate the CA did not sign, or one that has
expired or is not yet valid (a wrong clock on either side), is refused with one line
(:func:`explain_tls_error`).

Plain ``http://`` is allowed only to a loopback address (:func:`check_url`): across hosts every link is
HTTPS. Keys are ECDSA P-256, made with the ``cryptography`` package.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from silotune.errors import SilotuneError
from silotune.links import LinkError, is_loopback, require_secure

__all__ = ["TLSError", "check_url", "client_context", "explain_tls_error", "is_loopback", "make_ca"]

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


class TLSError(SilotuneError):
    """A certificate could not be made, or a TLS link was refused."""


def _write(path: Path, data: bytes, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600 if secret else 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "silotune consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(folder: Path | str, *, name: str = "silotune consortium CA", days: int = 3650) -> Path:
    """Create ``ca.pem`` and ``ca.key`` in ``folder`` (kept if they exist); returns the CA certificate."""
    folder = Path(folder)
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    if cert_path.is_file() and key_path.is_file():
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), secret=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return cert_path


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_server_cert(
    folder: Path | str,
    hosts: Iterable[str],
    *,
    name: str = "server",
    days: int = 397,
    valid_from: dt.datetime | None = None,
    ca_folder: Path | str | None = None,
) -> tuple[Path, Path]:
    """A server certificate for ``hosts`` (IP addresses and DNS names), signed by the CA in ``ca_folder``
    (default ``folder``); written as ``<name>.pem`` and ``<name>.key`` (0600). Returns (cert, key).

    ``valid_from`` (default now, less 5 minutes) and ``days`` set the validity window: tests make expired
    and not-yet-valid certificates with them.
    """
    folder = Path(folder)
    ca_folder = Path(ca_folder) if ca_folder is not None else folder
    try:
        ca_cert = x509.load_pem_x509_certificate((ca_folder / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((ca_folder / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError:
        raise TLSError(f"no CA in {ca_folder} (`silotune ca init --dir {ca_folder}` makes one)") from None
    hosts = list(hosts)
    if not hosts:
        raise TLSError("a server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    start = valid_from or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    _write(key_path, _key_pem(key), secret=True)
    # The chain: the server certificate, then the CA (clients that pin the CA verify it either way).
    _write(
        cert_path,
        cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM),
        secret=False,
    )
    return cert_path, key_path


def check_url(url: str, what: str) -> str:
    """``url``, if it may carry the federation's traffic (see :func:`silotune.links.require_secure`)."""
    try:
        return require_secure(url, what)
    except LinkError as exc:
        raise TLSError(str(exc)) from None


def client_context(ca_file: Path | str | None) -> ssl.SSLContext:
    """An SSL context that trusts only the CA in ``ca_file`` (the system's store when None)."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def explain_tls_error(exc: BaseException, url: str, ca_file: Path | str | None) -> str | None:
    """One line for a TLS failure in ``exc`` (or its causes), or None when it is not one."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur)
        if isinstance(cur, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            reason = getattr(cur, "verify_message", None) or text
            pinned = f"the pinned CA {ca_file}" if ca_file else "the system's CAs"
            if "expired" in reason:
                why = "its certificate has expired, or this host's clock is ahead"
            elif "not yet valid" in reason:
                why = "its certificate is not yet valid, or this host's clock is behind"
            elif "mismatch" in reason or "match" in reason:
                why = "its certificate does not name this address"
            else:
                why = f"its certificate is not signed by {pinned}"
            return f"refusing {url}: {why} ({reason})"
        if isinstance(cur, ssl.SSLError):
            return f"refusing {url}: TLS handshake failed ({text})"
        cur = cur.__cause__ or cur.__context__
    return None


def probe(url: str, ca_file: Path | str | None, what: str) -> None:
    """Check that ``url`` may be used (:func:`check_url`) and that its server passes TLS verification
    against ``ca_file``; :class:`TLSError` with one line otherwise. A server that does not answer (not
    started yet) or answers an HTTP error is not a TLS failure: nothing is raised."""
    check_url(url, what)
    if not url.startswith("https://"):
        return
    try:
        with urllib.request.urlopen(url, timeout=10, context=client_context(ca_file)):
            pass
    except Exception as exc:
        line = explain_tls_error(exc, url, ca_file)
        if line is not None:
            raise TLSError(line) from None
