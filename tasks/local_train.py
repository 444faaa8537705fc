"""Local post-training at a silo (runs on the silo's own worker)."""

from __future__ import annotations

from prefect import task

from silotune.config import FederationConfig
from silotune.federation.silo import train_silo
from silotune.records import ObjectRef, UpdateRecord
from tasks import runtime
from tasks.runtime import TRAIN_LOCK, adapter_for, store_for


# Idempotent: the same inputs write the same update object under the same key, so a retry is safe
# (the DP ledger counts an identical release once and refuses one with other inputs).
@task(name="local-train", retries=1, retry_delay_seconds=2, task_run_name="local-train-{silo}-r{round_}")
def local_train(config: FederationConfig, silo: str, round_: int, global_ref: ObjectRef) -> UpdateRecord:
    policy = runtime.SILO_POLICIES.get(silo)
    with TRAIN_LOCK:
        return train_silo(
            config,
            silo,
            round_,
            global_ref,
            store_for(config),
            adapter_for(config, silo),
            memo=runtime.MEMO,
            lifetime_epsilon=policy.dp.max_lifetime_epsilon if policy is not None else None,
        )
