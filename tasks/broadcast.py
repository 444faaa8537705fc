"""Broadcast: publish the round's global adapter (creating or resuming the federation)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.federation.commit import start_federation
from silotune.records import FederationState
from tasks.runtime import TRAIN_LOCK, adapter_for, store_for


@task(name="broadcast", persist_result=False, cache_policy=NO_CACHE)
def broadcast(config: FederationConfig) -> FederationState:
    """Return the federation's resume point; on a fresh federation, write the initial global adapter."""
    with TRAIN_LOCK:
        adapter = adapter_for(config)
    return start_federation(config, store_for(config), adapter)
