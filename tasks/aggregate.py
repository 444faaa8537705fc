"""Aggregation at the coordinator: verify, screen, combine, step the global adapter."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.federation.coordinator import aggregate_round
from silotune.records import AggregateRecord, ObjectRef, UpdateRecord
from silotune.root_update import RootUpdateRecord, train_root_update
from tasks import runtime
from tasks.runtime import TRAIN_LOCK, adapter_for, store_for


# Nothing refers to what it writes (the next global) until the round is committed: a retry may write it
# again.
@task(
    name="aggregate",
    task_run_name="aggregate-r{round_}",
    **runtime.STORE_RETRIES,
    persist_result=False,
    cache_policy=NO_CACHE,
)
def aggregate(
    config: FederationConfig, round_: int, global_ref: ObjectRef, records: list[UpdateRecord]
) -> AggregateRecord:
    return aggregate_round(config, store_for(config), round_, global_ref, records)


# Idempotent: the same inputs write the same root update under the same key.
@task(
    name="root-update",
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=runtime.transient,
    task_run_name="root-update-r{round_}",
    persist_result=False,
    cache_policy=NO_CACHE,
)
def root_update(
    config: FederationConfig, round_: int, global_ref: ObjectRef, reuse: str | None = None
) -> RootUpdateRecord:
    """FLTrust: the coordinator trains on its own root data set from the round's global adapter."""
    with TRAIN_LOCK:
        return train_root_update(
            config,
            round_,
            global_ref.key,
            global_ref.sha256,
            store_for(config),
            adapter_for(config),
            memo=runtime.work_memo(reuse),
        )
