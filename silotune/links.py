"""Which URLs may carry a federation's traffic: ``https://`` anywhere, plain ``http://`` only to loopback.

Across hosts every link (the Prefect API, the S3 store, MLflow) is HTTPS with the consortium's CA
pinned (``silotune ca init``); plain HTTP stays for the one-machine stack on 127.0.0.1. The store
(:class:`silotune.store.S3Store`), the tracker and ``silo join`` check their endpoint with
:func:`require_secure` before the first request.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from silotune.errors import SilotuneError

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class LinkError(SilotuneError):
    """A link would carry federation traffic in the clear, or was refused by TLS."""


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_secure(url: str, what: str) -> str:
    """``url`` if it is ``https://``, or ``http://`` to loopback; else :class:`LinkError` naming ``what``."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return url
    if parts.scheme == "http":
        if is_loopback(parts.hostname):
            return url
        raise LinkError(
            f"{what}: plain http:// to {parts.hostname} is refused (only loopback may be plain HTTP); "
            "use https:// with the consortium's CA (`silotune ca init`)"
        )
    raise LinkError(f"{what}: {url!r} is not an http(s):// URL")
