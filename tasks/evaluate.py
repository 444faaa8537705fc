"""Evaluation of a global adapter on a silo's local holdout (runs at the silo)."""

from __future__ import annotations

from prefect import task

from silotune.config import FederationConfig
from silotune.federation.silo import evaluate_silo
from silotune.records import EvalRecord, ObjectRef
from tasks import runtime
from tasks.runtime import adapter_for, store_for


@task(
    name="evaluate",
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=runtime.transient,
    task_run_name="evaluate-{silo}-r{round_}",
)
def evaluate_global(
    config: FederationConfig, silo: str, round_: int, global_ref: ObjectRef, reuse: str | None = None
) -> EvalRecord | None:
    with runtime.compute_slot(config):
        return evaluate_silo(
            config,
            silo,
            round_,
            global_ref,
            store_for(config),
            adapter_for(config, silo),
            memo=runtime.work_memo(reuse),
        )
