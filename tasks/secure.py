"""Protocol steps of protected rounds: secure-aggregation phases and publishing at a silo."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from silotune import protection as prot
from silotune.config import FederationConfig
from silotune.federation import FederationState, ObjectRef, UpdateRecord, close_secagg_upload
from silotune.publish import publish_final
from tasks.runtime import TRAIN_LOCK, adapter_for, store_for, tracker_for


@task(
    name="secagg-advertise",
    task_run_name="secagg-advertise-{silo}-r{round_}",
    persist_result=False,
    cache_policy=NO_CACHE,
)
def secagg_advertise(config: FederationConfig, silo: str, round_: int) -> str:
    """Silo: fresh X25519 keys for this round; the advert goes to the store."""
    return prot.secagg_advertise(config, silo, round_, store_for(config))


@task(
    name="secagg-share",
    task_run_name="secagg-share-{silo}-r{round_}",
    persist_result=False,
    cache_policy=NO_CACHE,
)
def secagg_share(config: FederationConfig, silo: str, round_: int) -> list[str]:
    """Silo: encrypted Shamir shares of its mask key and self-mask seed, one per other silo."""
    return prot.secagg_share(config, silo, round_, store_for(config))


@task(
    name="secagg-unmask",
    task_run_name="secagg-unmask-{silo}-r{round_}",
    persist_result=False,
    cache_policy=NO_CACHE,
)
def secagg_unmask(config: FederationConfig, silo: str, round_: int) -> str | None:
    """Silo: the shares that remove the survivors' masks (never both shares of one silo)."""
    return prot.secagg_unmask(config, silo, round_, store_for(config))


@task(
    name="secagg-close-upload",
    task_run_name="secagg-close-upload-r{round_}",
    persist_result=False,
    cache_policy=NO_CACHE,
)
def close_upload(config: FederationConfig, round_: int, records: list[UpdateRecord]) -> list[str]:
    """Coordinator: verify the masked uploads and fix the round's survivors."""
    return close_secagg_upload(config, store_for(config), round_, records)


@task(name="publish-at-silo", task_run_name="publish-at-{silo}", persist_result=False, cache_policy=NO_CACHE)
def publish_at_silo(config: FederationConfig, silo: str, global_ref: ObjectRef, run_id: str | None) -> str:
    """Silo: decrypt the final global adapter and publish it (CKKS: the coordinator cannot)."""
    store = store_for(config)
    final = prot.load_global(config, silo, global_ref.key, global_ref.sha256, store)
    state = FederationState(
        federation_id=config.federation_id,
        fingerprint=config.fingerprint(),
        global_ref=global_ref,
        tracking_run_id=run_id,
    )
    with TRAIN_LOCK:
        prefix = publish_final(adapter_for(config), state, store, tracker_for(config), final)
    return f"{store.describe().rstrip('/')}/{prefix}"
