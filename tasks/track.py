"""Tracking at the coordinator: open the federation's MLflow run, and track each round as it is evaluated.

A round's holdout evaluation arrives with the next round's silo runs, so a round is tracked (MLflow
nested run and metrics at its step, Prefect table artifact) when its evaluation is recorded: in the
next round's ``commit-round`` task, or in ``record-evaluation`` after the last round. One task per
round: every Prefect task run costs several API writes.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.federation.commit import save_state
from silotune.records import FederationState
from silotune.report import round_table
from silotune.tracking import initial_metrics
from tasks import runtime
from tasks.runtime import store_for, tracker_for


# Persists no result and is never cached: its return value only feeds the coordinator flow, in-process.
# Retried when the store (state.json) or the tracking server cannot be reached.
@task(name="track-start", **runtime.STORE_RETRIES, persist_result=False, cache_policy=NO_CACHE)
def track_start(config: FederationConfig, state: FederationState) -> FederationState:
    """Start (or reopen) the federation's MLflow run; its initial evaluation comes with round 1."""
    run_id = tracker_for(config).start(config, state.tracking_run_id)
    if run_id == state.tracking_run_id:
        return state
    new = state.model_copy(update={"tracking_run_id": run_id})
    save_state(store_for(config), new)
    return new


def track_evaluation(config: FederationConfig, state: FederationState, round_: int) -> None:
    """MLflow metrics at the round's step (nested run per round) and the round's Prefect table.

    Runs inside the task that recorded the evaluation of round ``round_`` (``-1``: the initial global).
    """
    tracker = tracker_for(config)
    if round_ < 0:
        tracker.log_initial(state.tracking_run_id, initial_metrics(state.initial_eval))
        return
    summary = state.history[round_]
    tracker.log_round(state.tracking_run_id, round_ + 1, summary)
    create_table_artifact(
        key=f"{config.federation_id}-round-{round_ + 1}".replace("_", "-"),
        table=round_table(summary),
        description=f"Federation {config.federation_id}, round {round_ + 1}: training and holdout metrics.",
    )
