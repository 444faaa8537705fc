"""Silo-side protocol steps (secure-aggregation phases, publishing under CKKS) and the result report."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from silotune.config import FederationConfig
from silotune.federation.coordinator import close_upload as close_round_upload
from silotune.federation.coordinator import open_round as open_protected_round
from silotune.protection import ProtocolRefusal, SiloContext, run_silo_step, scheme_for
from silotune.publish import publish_final
from silotune.records import FederationState, ObjectRef, UpdateRecord
from silotune.results import Release, put_result, redact
from tasks.runtime import TRAIN_LOCK, adapter_for, store_for, tracker_for


@task(
    name="protocol-step",
    task_run_name="{stage}-{silo}-r{round_}",
    persist_result=False,
    cache_policy=NO_CACHE,
)
def protocol_step(config: FederationConfig, silo: str, round_: int, stage: str) -> list[str]:
    """Silo: one step of the protection scheme's protocol (e.g. secure aggregation's adverts)."""
    return list(run_silo_step(config, silo, round_, stage, store_for(config))["keys"])


@task(
    name="report",
    task_run_name="report-{stage}-{silo}-r{round_}",
    persist_result=False,
    cache_policy=NO_CACHE,
)
def report(
    config: FederationConfig, silo: str, round_: int, stage: str, record: BaseModel, release: Release
) -> str:
    """Silo: write its signed result record, holding only what its policy releases."""
    return put_result(config, store_for(config), silo, round_, stage, redact(record, release, config))


@task(name="open-round", task_run_name="open-round-r{round_}", persist_result=False, cache_policy=NO_CACHE)
def open_round(config: FederationConfig, round_: int) -> list[str]:
    """Coordinator: announce what the silos check before their first protocol step (the masking graph)."""
    return open_protected_round(config, store_for(config), round_)


@task(
    name="close-upload", task_run_name="close-upload-r{round_}", persist_result=False, cache_policy=NO_CACHE
)
def close_upload(config: FederationConfig, round_: int, records: list[UpdateRecord]) -> list[str]:
    """Coordinator: verify the protected uploads and fix the round's survivors."""
    return close_round_upload(config, store_for(config), round_, records)


@task(name="publish-at-silo", task_run_name="publish-at-{silo}", persist_result=False, cache_policy=NO_CACHE)
def publish_at_silo(config: FederationConfig, silo: str, global_ref: ObjectRef, run_id: str | None) -> str:
    """Silo: decrypt the final global adapter it checked and publish it under its own prefix (CKKS).

    Only the config's designated publisher publishes: every silo publishing a different checked
    pointer on request would let the coordinator difference their means into one silo's update.
    """
    if not scheme_for(config).publishes_at_silo:
        raise ProtocolRefusal(
            f"silo {silo!r} refuses to publish: under protection {config.security.protection!r} "
            "the coordinator publishes"
        )
    if silo != config.ckks_publisher:
        raise ProtocolRefusal(
            f"silo {silo!r} refuses to publish: the designated publisher is {config.ckks_publisher!r}"
        )
    store = store_for(config)
    ctx = SiloContext(config, silo, 0, store)
    final, _ = scheme_for(config).read_global(ctx, global_ref)
    state = FederationState(
        federation_id=config.federation_id,
        fingerprint=config.fingerprint(),
        global_ref=global_ref,
        tracking_run_id=run_id,
    )
    with TRAIN_LOCK:
        return publish_final(adapter_for(config), state, store, tracker_for(config), final, publisher=silo)
