"""Deterministic errors are reported once; only transient ones are retried."""

from __future__ import annotations

import pytest
from prefect import flow, task

from silotune.errors import DataError, StoreError
from tasks.runtime import transient

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize(("error", "tries"), [(DataError, 1), (StoreError, 3), (OSError, 3)])
def test_only_transient_errors_are_retried(prefect_api, error: type[Exception], tries: int) -> None:
    calls: list[int] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=transient)
    def flaky() -> None:
        calls.append(1)
        raise error("train.jsonl:3: invalid JSON")

    @flow
    def run() -> None:
        flaky()

    with pytest.raises(error):
        run()
    assert len(calls) == tries
