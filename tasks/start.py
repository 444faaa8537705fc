"""Start or resume a federation: its initial global adapter, or the resume point of an earlier run.

Runs once, at the start of the coordinator's flow (each round's global is written by the aggregation
and received by the silos in their round runs).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.federation.commit import start_federation
from silotune.records import FederationState
from tasks import runtime
from tasks.runtime import TRAIN_LOCK, adapter_for, store_for


# A retry finds the resume point the first try wrote, or writes the same initial adapter (the seed's).
@task(name="start-or-resume", **runtime.STORE_RETRIES, persist_result=False, cache_policy=NO_CACHE)
def start_or_resume(config: FederationConfig) -> FederationState:
    """Return the federation's resume point; on a fresh federation, write the initial global adapter."""
    with TRAIN_LOCK:
        adapter = adapter_for(config)
    return start_federation(config, store_for(config), adapter)
