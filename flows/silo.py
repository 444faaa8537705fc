"""The silo's flows: one local round, one evaluation, protocol steps. They run on the silo's work pool.

Their results (small records: object keys, hashes, metrics) are persisted so the
coordinator can read them from another process or host: with the real stack the
default result storage is the stack's S3 result bucket (a prefect-aws ``S3Bucket``
block), serialized as JSON (never pickle: the coordinator must not unpickle what a silo wrote).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from silotune.config import FederationConfig
from silotune.federation import EvalRecord, ObjectRef, UpdateRecord
from tasks.evaluate import evaluate_global
from tasks.local_train import local_train
from tasks.runtime import localize
from tasks.secure import publish_at_silo, secagg_advertise, secagg_share, secagg_unmask

SILO_STEPS = ("secagg-advertise", "secagg-share", "secagg-unmask", "publish")


@flow(
    name="silo-round",
    flow_run_name="{silo}-round-{round_}",
    log_prints=True,
    persist_result=True,
    result_serializer="json",
)
def silo_round(config: FederationConfig, silo: str, round_: int, global_ref: ObjectRef) -> UpdateRecord:
    """Fetch the global adapter, post-train locally, upload the update; return its record."""
    return local_train(localize(config, silo), silo, round_, global_ref)


@flow(
    name="silo-evaluate",
    flow_run_name="{silo}-evaluate-{round_}",
    log_prints=True,
    persist_result=True,
    result_serializer="json",
)
def silo_evaluate(
    config: FederationConfig, silo: str, round_: int, global_ref: ObjectRef
) -> EvalRecord | None:
    """Evaluate a global adapter on the silo's local holdout."""
    return evaluate_global(localize(config, silo), silo, round_, global_ref)


@flow(
    name="silo-step",
    flow_run_name="{silo}-{stage}-{round_}",
    log_prints=True,
    persist_result=True,
    result_serializer="json",
)
def silo_step(
    config: FederationConfig,
    silo: str,
    stage: str,
    round_: int,
    global_ref: ObjectRef | None = None,
    run_id: str | None = None,
) -> Any:
    """A protocol step at the silo: secure-aggregation phases, or publishing a decrypted adapter."""
    config = localize(config, silo)
    if stage == "secagg-advertise":
        return secagg_advertise(config, silo, round_)
    if stage == "secagg-share":
        return secagg_share(config, silo, round_)
    if stage == "secagg-unmask":
        return secagg_unmask(config, silo, round_)
    if stage == "publish":
        if global_ref is None:
            raise ValueError("silo-step 'publish' needs global_ref")
        return publish_at_silo(config, silo, global_ref, run_id)
    raise ValueError(f"unknown silo step {stage!r}; known: {', '.join(SILO_STEPS)}")
