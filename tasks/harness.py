"""The lm-evaluation-harness on a federation's adapter: run it, publish the results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.harness import expand_tasks, harness_markdown, harness_metrics, run_harness, write_holdout_tasks
from silotune.modeling import resolve_model_path
from tasks.runtime import TRAIN_LOCK, tracker_for


@task(name="harness", cache_policy=NO_CACHE)
def harness(
    config: FederationConfig,
    requested: list[str],
    adapter_dir: str | None,
    out: str,
    limit: int | None = None,
    max_gen_toks: int = 64,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Generate the holdout tasks under ``out``/tasks and run the harness on base model + adapter."""
    holdouts = {s.name: s.eval_path for s in config.silos if s.eval_path}
    generated = write_holdout_tasks(holdouts, Path(out) / "tasks", max_gen_toks=max_gen_toks)
    with TRAIN_LOCK:
        return run_harness(
            resolve_model_path(config.model.name_or_path),
            expand_tasks(requested, generated),
            Path(out) / "tasks",
            adapter_dir=adapter_dir,
            limit=limit,
            batch_size=batch_size,
        )


@task(name="publish-harness", cache_policy=NO_CACHE)
def publish_harness(
    config: FederationConfig, results: dict[str, dict[str, float]], out: str, run_id: str | None
) -> dict[str, Any]:
    """``harness.json`` under ``out``, metrics and file to the federation's MLflow run, a Prefect artifact."""
    path = Path(out) / "harness.json"
    path.write_text(json.dumps(results, indent=2))
    tracker = tracker_for(config)
    tracker.log_metrics(run_id, harness_metrics(results))
    tracker.log_file(run_id, path, "harness")
    create_markdown_artifact(
        key=f"{config.federation_id}-harness".replace("_", "-").lower(),
        markdown=harness_markdown(results, title=f"lm-evaluation-harness on `{config.federation_id}`"),
        description="lm-evaluation-harness results",
    )
    return {"path": str(path), "metrics": harness_metrics(results)}
