"""The coordinator's and workers' API transports wait out an unreachable Prefect server (a restart),
and only where the request cannot have reached it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from flows import api_client
from flows.api_client import BusyRetrySyncTransport, BusyRetryTransport, _outage_delays


class _Flaky(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Raises ``error`` for the first ``fails`` requests, then answers 200."""

    def __init__(self, fails: int, error: type[Exception] = httpx.ConnectError) -> None:
        self.fails, self.error, self.calls = fails, error, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls <= self.fails:
            raise self.error("refused", request=request)
        return httpx.Response(200, json={"ok": True})

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self.handle_request(request)


@pytest.fixture
def no_sleep(monkeypatch):
    slept: list[float] = []

    async def fake_async_sleep(s: float) -> None:
        slept.append(s)

    monkeypatch.setattr(api_client.time, "sleep", slept.append)
    monkeypatch.setattr(api_client.asyncio, "sleep", fake_async_sleep)
    return slept


def test_outage_delays_grow_then_cap_and_stay_within_the_budget() -> None:
    delays = list(_outage_delays(60.0))
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 10.0] and max(delays) == 10.0
    assert sum(delays) <= 60.0 and sum(delays) + 10.0 > 60.0
    assert list(_outage_delays(0.0)) == []


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout])
def test_a_refused_connection_is_retried_until_the_server_is_back(no_sleep, error) -> None:
    inner = _Flaky(fails=4, error=error)
    with httpx.Client(transport=BusyRetrySyncTransport(inner, outage_s=300.0)) as client:
        assert client.post("https://prefect.test/api/flow_runs/").status_code == 200
    assert inner.calls == 5 and no_sleep == [1.0, 2.0, 4.0, 8.0]


def test_the_async_transport_waits_too(no_sleep) -> None:
    inner = _Flaky(fails=2)

    async def go() -> int:
        async with httpx.AsyncClient(transport=BusyRetryTransport(inner, outage_s=300.0)) as client:
            return (await client.get("https://prefect.test/api/health")).status_code

    assert asyncio.run(go()) == 200 and inner.calls == 3


def test_an_outage_longer_than_the_budget_raises_the_connection_error(no_sleep) -> None:
    inner = _Flaky(fails=10_000)
    with (
        httpx.Client(transport=BusyRetrySyncTransport(inner, outage_s=30.0)) as c,
        pytest.raises(httpx.ConnectError),
    ):
        c.get("https://prefect.test/api/health")
    assert sum(no_sleep) <= 30.0 and inner.calls == len(no_sleep) + 1


def test_without_an_outage_budget_a_refused_connection_fails_at_once(no_sleep) -> None:
    inner = _Flaky(fails=1)
    with httpx.Client(transport=BusyRetrySyncTransport(inner)) as c, pytest.raises(httpx.ConnectError):
        c.get("https://prefect.test/api/health")
    assert inner.calls == 1 and no_sleep == []


def test_an_error_after_the_request_may_have_arrived_is_not_resent(no_sleep) -> None:
    """A read error or a dropped answer: the server may have acted on the request (a run created), so
    resending it here could do it twice; Prefect's client decides on those."""
    inner = _Flaky(fails=1, error=httpx.ReadError)
    with (
        httpx.Client(transport=BusyRetrySyncTransport(inner, outage_s=300.0)) as c,
        pytest.raises(httpx.ReadError),
    ):
        c.post("https://prefect.test/api/flow_runs/")
    assert inner.calls == 1
