"""Tasks of the privacy–utility report: the DP recipe, scoring a finished federation, publishing."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig, TrackingSpec
from silotune.privacy_utility import (
    Recipe,
    RecipeKnobs,
    Row,
    Scores,
    choose_recipe,
    score_adapter,
    write_results,
)
from silotune.store import get_tensors
from silotune.tracking import MlflowTracker
from tasks.runtime import TRAIN_LOCK, adapter_for, store_for


@task(name="choose-dp-recipe", cache_policy=NO_CACHE)
def choose_dp_recipe(
    config: FederationConfig,
    validation: list[str],
    examples: int = 32,
    knobs: dict[str, float] | None = None,
) -> Recipe:
    """The DP recipe from base-model statistics on ``examples`` validation records (never the holdout);
    ``knobs``: :class:`RecipeKnobs` fields that replace the defaults."""
    recipe_knobs = RecipeKnobs(validation_examples=examples, **(knobs or {}))
    with TRAIN_LOCK:
        return choose_recipe(config, adapter_for(config), validation, knobs=recipe_knobs)


@task(name="score-adapter", task_run_name="score-{name}", cache_policy=NO_CACHE)
def score(
    config: FederationConfig,
    name: str,
    global_key: str | None,
    holdouts: list[str],
    members: list[str],
    mia_examples: int,
    max_new_tokens: int,
) -> Scores:
    """Union-holdout utility and membership inference of a stored global adapter (None: the initial
    adapter of ``config``'s seed, i.e. the base model)."""
    with TRAIN_LOCK:
        adapter = adapter_for(config)
        state = (
            adapter.initial_state(config.seed)
            if global_key is None
            else get_tensors(store_for(config), global_key)
        )
        return score_adapter(
            config,
            adapter,
            state,
            holdouts=holdouts,
            members=members,
            mia_examples=mia_examples,
            max_new_tokens=max_new_tokens,
            batch_size=config.evaluation.batch_size,
        )


@task(name="publish-privacy-utility", cache_policy=NO_CACHE)
def publish_report(
    rows: list[Row],
    out: str,
    *,
    title: str,
    recipe: Recipe | None,
    notes: list[str],
    tracking: TrackingSpec,
    grid_id: str,
) -> dict[str, Any]:
    """Write the table and plots under ``out``, log them to one MLflow run, create Prefect artifacts."""
    paths = write_results(rows, Path(out), title=title, recipe=recipe, notes=notes)
    run_id = None
    if tracking.kind == "mlflow":
        tracker = MlflowTracker(tracking)
        client = tracker.client
        run = client.create_run(
            tracker._experiment_id(),
            tags={"mlflow.runName": grid_id, "silotune.kind": "privacy-utility-summary"},
        )
        run_id = run.info.run_id
        for r in rows:
            for k, v in r.flat().items():
                if isinstance(v, (int, float)) and k not in ("target_epsilon",):
                    client.log_metric(run_id, f"pu.{r.name}.{k}", float(v))
        for p in paths.values():
            client.log_artifact(run_id, str(p), "privacy-utility")
        client.set_terminated(run_id)
    md = paths["markdown"].read_text()
    imgs = "".join(
        f"\n\n![{k}](data:image/png;base64,{base64.b64encode(paths[k].read_bytes()).decode()})"
        for k in ("frontier", "round_costs")
    )
    create_markdown_artifact(
        key=f"{grid_id}-privacy-utility".replace("_", "-").replace(".", "-").lower(),
        markdown=md + imgs,
        description="Privacy–utility frontier",
    )
    create_table_artifact(
        key=f"{grid_id}-privacy-utility-table".replace("_", "-").replace(".", "-").lower(),
        table=[r.flat() for r in rows],
        description="Privacy–utility cells",
    )
    return {"paths": {k: str(v) for k, v in paths.items()}, "mlflow_run_id": run_id}
