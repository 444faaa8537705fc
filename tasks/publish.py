"""Publish the final adapter (PEFT format) to the object store and MLflow."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.publish import publish_final, register_final, registered_name
from silotune.records import FederationState
from silotune.tracking import MlflowTracker
from tasks.runtime import TRAIN_LOCK, adapter_for, store_for, tracker_for


@task(name="publish-final", persist_result=False, cache_policy=NO_CACHE)
def publish(config: FederationConfig, state: FederationState) -> str:
    """Returns where the adapter folder lives (store location + key prefix)."""
    store = store_for(config)
    tracker = tracker_for(config)
    with TRAIN_LOCK:
        prefix = publish_final(adapter_for(config), state, store, tracker)
    register_final(config, state, tracker)
    return f"{store.describe().rstrip('/')}/{prefix}"


@task(name="promotion", persist_result=False, cache_policy=NO_CACHE)
def promotion(config: FederationConfig, run_id: str | None) -> dict[str, str] | None:
    """The registered version made from the federation's run: version, alias (champion/challenger), reason."""
    tracker = tracker_for(config)
    if run_id is None or not isinstance(tracker, MlflowTracker):
        return None
    return tracker.promotion_of(registered_name(config), run_id)
