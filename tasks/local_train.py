"""Local post-training at a silo (runs on the silo's own worker): the delta goes to its private folder."""

from __future__ import annotations

from prefect import task

from silotune.config import FederationConfig
from silotune.federation.silo import TrainedDelta, train_step
from silotune.records import ObjectRef
from tasks import runtime
from tasks.runtime import adapter_for, store_for


# Idempotent: the same inputs train the same delta; the DP ledger counts an identical release once and
# refuses one with other inputs, so a retry never spends privacy twice.
@task(
    name="local-train",
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=runtime.transient,
    task_run_name="local-train-{silo}-r{round_}",
)
def local_train(
    config: FederationConfig, silo: str, round_: int, global_ref: ObjectRef, reuse: str | None = None
) -> TrainedDelta:
    with runtime.compute_slot(config):
        return train_step(
            config,
            silo,
            round_,
            global_ref,
            store_for(config),
            adapter_for(config, silo),
            memo=runtime.work_memo(reuse),
            lifetime_epsilon=runtime.lifetime_epsilon(silo),
        )
