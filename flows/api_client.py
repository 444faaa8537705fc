"""Prefect API clients that retry a busy server within tens of milliseconds, not seconds.

The stack's Prefect server on SQLite answers HTTP 503 when two writes overlap ("database is
locked"): the server rolled the request back, so Prefect's client retries it, for every method,
but only after ``2 ** attempt`` seconds, and it sleeps those 2 s even with retries switched off
(``PREFECT_CLIENT_MAX_RETRIES=0``); no setting shortens it. One such stall costs more than the
whole orchestration of a round. The transports here retry a 503 (or 429) themselves after 10, 20,
40, 80 ms, then every 150 ms (about 2.5 s in all) before Prefect's client sees the answer;
Prefect's own policy stays the last resort. Used for the coordinator's run creations and inside
the silotune workers' runs.
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


class BusyRetryTransport(httpx.AsyncBaseTransport):
    """Wraps an async transport; answers 503/429 are retried after a short back-off."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for delay in BACKOFF_S:
            response = await self._inner.handle_async_request(request)
            if response.status_code not in RETRY_CODES:
                return response
            await response.aclose()
            await asyncio.sleep(delay)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class BusyRetrySyncTransport(httpx.BaseTransport):
    """Wraps a sync transport; answers 503/429 are retried after a short back-off."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for delay in BACKOFF_S:
            response = self._inner.handle_request(request)
            if response.status_code not in RETRY_CODES:
                return response
            response.close()
            time.sleep(delay)
        return self._inner.handle_request(request)

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


def busy_retry_settings(*, sync: bool = False) -> dict[str, Any]:
    """``httpx_settings`` for ``prefect.client.orchestration.get_client`` (or ``SyncClientContext``).

    The inner transport is configured like the one Prefect's client builds for a server URL:
    the same TLS verification, connection limits, HTTP/2 setting and 3 connection retries.
    """
    options: dict[str, Any] = {
        "verify": _verify(),
        "limits": httpx.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=25),
        "http2": bool(PREFECT_API_ENABLE_HTTP2.value()),
        "retries": 3,
    }
    if sync:
        return {"transport": BusyRetrySyncTransport(httpx.HTTPTransport(**options))}
    return {"transport": BusyRetryTransport(httpx.AsyncHTTPTransport(**options))}
