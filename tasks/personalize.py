"""Personalisation at a silo (runs on the silo's own worker): the result stays in its private folder."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.personalize import compare_on_holdout, personalize_silo
from tasks.runtime import TRAIN_LOCK, adapter_for, store_for


@task(name="personalize", persist_result=False, cache_policy=NO_CACHE, task_run_name="personalize-{silo}")
def personalize(
    config: FederationConfig, silo: str, steps: int | None = None
) -> dict[str, dict[str, float | int]] | None:
    """Fine-tune the final global at ``silo``; holdout metrics, global vs personalised (None: no holdout)."""
    with TRAIN_LOCK:
        store, adapter = store_for(config), adapter_for(config, silo)
        personalize_silo(config, silo, store, adapter, steps=steps)
        if config.silo(silo).eval_path is None:
            return None
        return compare_on_holdout(config, silo, store, adapter)
