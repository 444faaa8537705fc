"""Prefect API clients that retry a busy server within tens of milliseconds, not seconds.

The stack's Prefect server on SQLite answers HTTP 503 when two writes overlap ("database is
locked"): the server rolled the request back, so Prefect's client retries it, for every method,
but only after ``2 ** attempt`` seconds, and it sleeps those 2 s even with retries switched off
(``PREFECT_CLIENT_MAX_RETRIES=0``); no setting shortens it. One such stall costs more than the
whole orchestration of a round. The transports here retry a 503 (or 429) themselves after 10, 20,
40, 80 ms, then every 150 ms (about 2.5 s in all) before Prefect's client sees the answer;
Prefect's own policy stays the last resort. Used for the coordinator's run creations and inside
the silotune workers' runs.

They also wait out a Prefect server that is away (restarting): a refused or timed-out *connection*
means the request never reached the server, so sending it again is safe for every method. Such
errors are retried for up to ``outage_s`` (1, 2, 4, 8, then every 10 s). Prefect's own client retries
a refused connection only on a client that already connected once, so a client created during the
outage (a wave's run creations, a progress update) would fail at once without this. Any other error
(the request may have reached the server) is raised as it is.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import certifi
import httpx
from prefect.settings import (
    PREFECT_API_ENABLE_HTTP2,
    PREFECT_API_SSL_CERT_FILE,
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
)

RETRY_CODES = frozenset({429, 503})
# About 2.5 s in all; a busy spell on SQLite lasts as long as other writes keep landing.
BACKOFF_S = (0.01, 0.02, 0.04, 0.08, *(0.15,) * 15)
# A Prefect server restart on Postgres took 24 s in the multi-host test; 300 s leaves room for a slow host.
API_OUTAGE_S = 300.0
UNREACHED = (httpx.ConnectError, httpx.ConnectTimeout)


def _outage_delays(outage_s: float):
    """Delays between connection attempts, summing to at most ``outage_s``."""
    spent, delay = 0.0, 1.0
    while spent + delay <= outage_s:
        yield delay
        spent += delay
        delay = min(2 * delay, 10.0)


class BusyRetryTransport(httpx.AsyncBaseTransport):
    """Wraps an async transport; answers 503/429 are retried after a short back-off, and an
    unreachable server for up to ``outage_s``."""

    def __init__(self, inner: httpx.AsyncBaseTransport, outage_s: float = 0.0) -> None:
        self._inner, self._outage_s = inner, outage_s

    async def _send(self, request: httpx.Request) -> httpx.Response:
        for delay in _outage_delays(self._outage_s):
            try:
                return await self._inner.handle_async_request(request)
            except UNREACHED:
                await asyncio.sleep(delay)
        return await self._inner.handle_async_request(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for delay in BACKOFF_S:
            response = await self._send(request)
            if response.status_code not in RETRY_CODES:
                return response
            await response.aclose()
            await asyncio.sleep(delay)
        return await self._send(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class BusyRetrySyncTransport(httpx.BaseTransport):
    """Wraps a sync transport; answers 503/429 are retried after a short back-off, and an
    unreachable server for up to ``outage_s``."""

    def __init__(self, inner: httpx.BaseTransport, outage_s: float = 0.0) -> None:
        self._inner, self._outage_s = inner, outage_s

    def _send(self, request: httpx.Request) -> httpx.Response:
        for delay in _outage_delays(self._outage_s):
            try:
                return self._inner.handle_request(request)
            except UNREACHED:
                time.sleep(delay)
        return self._inner.handle_request(request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for delay in BACKOFF_S:
            response = self._send(request)
            if response.status_code not in RETRY_CODES:
                return response
            response.close()
            time.sleep(delay)
        return self._send(request)

    def close(self) -> None:
        self._inner.close()


def _verify() -> ssl.SSLContext:
    """TLS verification as Prefect's client sets it up (skip-verify flag, custom CA file, certifi)."""
    if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=PREFECT_API_SSL_CERT_FILE.value() or certifi.where())


def busy_retry_settings(*, sync: bool = False, outage_s: float = API_OUTAGE_S) -> dict[str, Any]:
    """``httpx_settings`` for ``prefect.client.orchestration.get_client`` (or ``SyncClientContext``).

    The inner transport is configured like the one Prefect's client builds for a server URL:
    the same TLS verification, connection limits, HTTP/2 setting and 3 connection retries. Used only
    inside runs (the API was reachable when they started), so an unreachable server is waited for.
    """
    options: dict[str, Any] = {
        "verify": _verify(),
        "limits": httpx.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=25),
        "http2": bool(PREFECT_API_ENABLE_HTTP2.value()),
        "retries": 3,
    }
    if sync:
        return {"transport": BusyRetrySyncTransport(httpx.HTTPTransport(**options), outage_s)}
    return {"transport": BusyRetryTransport(httpx.AsyncHTTPTransport(**options), outage_s)}
