"""Aggregation at the coordinator: verify, screen, combine, step the global adapter."""

from __future__ import annotations

from prefect import task

from silotune.config import FederationConfig
from silotune.federation import AggregateRecord, ObjectRef, UpdateRecord, aggregate_round
from tasks.runtime import store_for


@task(name="aggregate", task_run_name="aggregate-r{round_}")
def aggregate(
    config: FederationConfig, round_: int, global_ref: ObjectRef, records: list[UpdateRecord]
) -> AggregateRecord:
    return aggregate_round(config, store_for(config), round_, global_ref, records)
