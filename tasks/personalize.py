"""Personalisation at a silo (runs on the silo's own worker): the result stays in its private folder."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.personalize import compare_on_holdout, personalize_silo
from tasks.runtime import TRAIN_LOCK, adapter_for, store_for


@task(name="personalize", persist_result=False, cache_policy=NO_CACHE, task_run_name="personalize-{silo}")
def personalize(config: FederationConfig, silo: str, steps: int | None = None) -> dict[str, Any]:
    """Fine-tune the final global at ``silo``. Returns which adapter the silo kept (decided on its
    validation file), both validation losses, and the holdout metrics of global and kept adapter
    (``holdout`` None: the silo has no holdout)."""
    with TRAIN_LOCK:
        store, adapter = store_for(config), adapter_for(config, silo)
        rec = personalize_silo(config, silo, store, adapter, steps=steps)
        holdout = None
        if config.silo(silo).eval_path is not None:
            holdout = compare_on_holdout(config, silo, store, adapter)
        return {"kept": rec.kept, "validation_loss": rec.validation_loss, "holdout": holdout}
