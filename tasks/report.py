"""The federation's final report: the history and cost plots to MLflow, the summary artifact to Prefect."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.records import FederationState, HoldoutMetrics
from silotune.report import initial_and_final, plot_costs, plot_history, summary_markdown
from tasks.runtime import tracker_for


# Persists no result and is never cached: its return value only feeds the coordinator flow, in-process.
@task(name="report", persist_result=False, cache_policy=NO_CACHE)
def report(
    config: FederationConfig, state: FederationState, final_adapter_dir: str | None
) -> tuple[HoldoutMetrics | None, HoldoutMetrics | None]:
    """Plot the history to MLflow and Prefect, close the MLflow run; return the weighted holdout metrics
    of the initial and the final global adapter (None where not evaluated)."""
    tracker = tracker_for(config)
    png = plot_history(state.history, state.initial_eval, title=f"silotune federation {config.federation_id}")
    costs = plot_costs(state, title=config.federation_id)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in (("federation_history.png", png), ("federation_costs.png", costs)):
            p = Path(tmp) / name
            p.write_bytes(data)
            tracker.log_file(state.tracking_run_id, p, "plots")
    create_markdown_artifact(
        key=f"{config.federation_id}-summary".replace("_", "-"),
        markdown=summary_markdown(
            state,
            planned_rounds=config.rounds,
            silos=[s.name for s in config.silos],
            final_adapter_dir=final_adapter_dir,
            plot_png=png,
            costs_png=costs,
        ),
        description="Federation summary",
    )
    tracker.finish(state.tracking_run_id)
    return initial_and_final(state)
