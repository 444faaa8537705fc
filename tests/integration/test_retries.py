"""Deterministic errors are reported once; only transient ones are retried."""

from __future__ import annotations

import importlib
import logging
import pkgutil

import pytest
from prefect import Task, flow, task

import tasks
from silotune.errors import DataError, StoreError, StoreUnavailable
from tasks.runtime import install_expected_error_filter, transient, unreachable

pytestmark = [pytest.mark.integration]


# A store that cannot be reached may answer next time; a missing or corrupted object will not.
@pytest.mark.parametrize(
    ("error", "tries"), [(DataError, 1), (StoreError, 1), (StoreUnavailable, 3), (OSError, 3)]
)
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


def test_expected_errors_log_one_line_without_a_traceback(prefect_api, caplog) -> None:
    @task(retries=1, retry_delay_seconds=0, retry_condition_fn=transient)
    def bad_data() -> None:
        raise DataError("train.jsonl:3: invalid JSON")

    @task
    def crash() -> None:
        raise ZeroDivisionError("a bug")

    @flow
    def run(which: str) -> None:
        (bad_data if which == "data" else crash)()

    install_expected_error_filter()  # as every silotune flow does when it starts
    with caplog.at_level(logging.INFO, logger="prefect"), pytest.raises(DataError):
        run("data")
    # the run loggers only: Prefect's events client may log its own failures (with a traceback) and
    # quote the state message in them
    runs = ("prefect.task_runs", "prefect.flow_runs")
    failed = [r for r in caplog.records if r.name in runs and "invalid JSON" in r.getMessage()]
    # Prefect logs the flow's failure with logger.exception: the filter drops the traceback
    assert any("Encountered exception" in r.getMessage() for r in failed)
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in failed)
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]  # not retried either
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="prefect"), pytest.raises(ZeroDivisionError):
        run("bug")
    assert any(r.exc_info is not None for r in caplog.records if "a bug" in r.getMessage())


def test_every_retrying_task_retries_only_transient_errors() -> None:
    """A task with retries must use tasks.runtime.transient, so bad input is never retried."""
    found = []
    for info in pkgutil.iter_modules(tasks.__path__):
        module = importlib.import_module(f"tasks.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, Task) and obj.retries:
                found.append(obj.name)
                assert obj.retry_condition_fn in (transient, unreachable), (
                    f"task {obj.name} retries without transient or unreachable"
                )
    assert len(found) >= 4


@pytest.mark.parametrize(
    ("error", "tries"),
    [(StoreUnavailable, 3), (ConnectionError, 3), (RuntimeError, 1), (FileExistsError, 1), (StoreError, 1)],
)
def test_the_coordinators_store_steps_retry_only_an_outage(prefect_api, error: type[Exception], tries: int) -> None:
    """A crash in a coordinator step is not worth its 37 s of waits: only an unreachable service is."""
    calls: list[int] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=unreachable)
    def step() -> None:
        calls.append(1)
        raise error("s3://store: gone")

    @flow
    def run() -> None:
        step()

    with pytest.raises(error):
        run()
    assert len(calls) == tries
