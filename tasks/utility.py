"""Publishing utility results: the adapter comparison to the federation's MLflow run and Prefect."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from silotune.config import FederationConfig
from silotune.report import comparison_markdown, comparison_metrics
from tasks.runtime import tracker_for


@task(name="publish-comparison")
def publish_comparison(config: FederationConfig, run_id: str | None, path: str) -> None:
    """Log ``comparison.json`` and its metrics to the federation's run; a markdown artifact of it."""
    record = json.loads(Path(path).read_text())
    tracker = tracker_for(config)
    tracker.log_file(run_id, Path(path), "comparison")
    tracker.log_metrics(run_id, comparison_metrics(record))
    create_markdown_artifact(
        key=f"{config.federation_id}-comparison".replace("_", "-").lower(),
        markdown=comparison_markdown(record),
        description="Base, federated, centralized and local-only adapters on the holdouts",
    )
