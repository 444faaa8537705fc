"""Reading a wave's silo results at the coordinator (their signed records in the store).

A store the coordinator cannot reach for a moment (its link cut, the store restarting) must not count
as every silo failing the round: the read is a task, retried while the store is unavailable. A record
that is missing, forged or malformed is that silo's failure, reported once.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from silotune.config import FederationConfig
from silotune.records import SiloEvalResult, SiloRoundResult, SiloStepResult
from silotune.results import ResultError, read_result
from tasks import runtime

# Which record each silo flow writes.
RECORDS: dict[str, type[BaseModel]] = {
    "silo-round": SiloRoundResult,
    "silo-evaluate": SiloEvalResult,
    "silo-step": SiloStepResult,
}


def read_record(
    config: FederationConfig, flow_name: str, stage: str, silo: str, round_: int
) -> BaseModel | str:
    """The silo's record of ``stage`` in round ``round_``, or why it cannot be taken (ResultError's text).

    Raises :class:`~silotune.errors.StoreUnavailable` if the store cannot be reached.
    """
    try:
        return read_result(config, runtime.store_for(config), silo, round_, stage, RECORDS[flow_name])
    except ResultError as exc:
        return str(exc)


# Reads only: a retry reads the same records again.
@task(
    name="read-results",
    task_run_name="read-{stage}-results-r{round_}",
    **runtime.STORE_RETRIES,
    persist_result=False,
    cache_policy=NO_CACHE,
)
def read_results(
    config: FederationConfig, flow_name: str, stage: str, round_: int, silos: list[str]
) -> dict[str, BaseModel | str]:
    """:func:`read_record` of each silo, by silo; retried while the store is unavailable."""
    return {silo: read_record(config, flow_name, stage, silo, round_) for silo in silos}
