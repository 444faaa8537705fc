"""Committing a round (manifest + resume point), recording evaluations as they arrive, and reporting.

A round's holdout evaluation arrives with the next round's silo runs, so a round is tracked
(MLflow nested run and metrics at its step, Prefect table artifact) when its evaluation is
recorded: in the next round's ``commit-round`` task, or in ``record-evaluation`` after the last
round. One task per round: every Prefect task run costs several API writes.

These tasks persist no result and are never cached: their return values only feed the
coordinator flow, in the same process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.federation.commit import commit_round, record_evaluation, save_state
from silotune.records import (
    AggregateRecord,
    EvalRecord,
    FederationState,
    HoldoutMetrics,
    SiloFailure,
    UpdateRecord,
)
from silotune.report import initial_and_final, plot_history, round_table, summary_markdown
from silotune.tracking import initial_metrics
from tasks.runtime import store_for, tracker_for


@task(name="commit-round", task_run_name="commit-r{round_}", persist_result=False, cache_policy=NO_CACHE)
def commit(
    config: FederationConfig,
    state: FederationState,
    round_: int,
    updates: list[UpdateRecord],
    failures: list[SiloFailure],
    agg: AggregateRecord,
    evals: list[EvalRecord] | None = None,
    eval_failures: list[SiloFailure] | None = None,
) -> FederationState:
    """Record the evaluation that came with this round's silo runs (of round ``round_ - 1``'s output,
    when ``evals`` is given), commit round ``round_``, then track the evaluated round."""
    store = store_for(config)
    evaluated = state.pending_evaluation if evals is not None else None
    if evaluated is not None:
        state = record_evaluation(
            config, store, state, evaluated, evals or [], eval_failures or [], save=False
        )
    new = commit_round(config, store, state, round_, updates, failures, agg)
    if evaluated is not None:
        _track_evaluation(config, new, evaluated)
    return new


@task(
    name="record-evaluation",
    task_run_name="record-evaluation-r{round_}",
    persist_result=False,
    cache_policy=NO_CACHE,
)
def record_eval(
    config: FederationConfig,
    state: FederationState,
    round_: int,
    evals: list[EvalRecord],
    eval_failures: list[SiloFailure],
) -> FederationState:
    """Record the evaluation of round ``round_``'s output (after the last round, or before a round
    fails below quorum), then track that round."""
    new = record_evaluation(config, store_for(config), state, round_, evals, eval_failures)
    _track_evaluation(config, new, round_)
    return new


def _track_evaluation(config: FederationConfig, state: FederationState, round_: int) -> None:
    """MLflow metrics at the round's step (nested run per round) and the round's Prefect table."""
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


@task(name="track-start", persist_result=False, cache_policy=NO_CACHE)
def track_start(config: FederationConfig, state: FederationState) -> FederationState:
    """Start (or reopen) the federation's MLflow run; its initial evaluation comes with round 1."""
    run_id = tracker_for(config).start(config, state.tracking_run_id)
    if run_id == state.tracking_run_id:
        return state
    new = state.model_copy(update={"tracking_run_id": run_id})
    save_state(store_for(config), new)
    return new


@task(name="report", persist_result=False, cache_policy=NO_CACHE)
def report(
    config: FederationConfig, state: FederationState, final_adapter_dir: str | None
) -> tuple[HoldoutMetrics | None, HoldoutMetrics | None]:
    """Plot the history to MLflow and Prefect, close the MLflow run; return the weighted holdout metrics
    of the initial and the final global adapter (None where not evaluated)."""
    tracker = tracker_for(config)
    png = plot_history(state.history, state.initial_eval, title=f"silotune federation {config.federation_id}")
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "federation_history.png"
        p.write_bytes(png)
        tracker.log_file(state.tracking_run_id, p, "plots")
    create_markdown_artifact(
        key=f"{config.federation_id}-summary".replace("_", "-"),
        markdown=summary_markdown(
            state,
            planned_rounds=config.rounds,
            silos=[s.name for s in config.silos],
            final_adapter_dir=final_adapter_dir,
            plot_png=png,
        ),
        description="Federation summary",
    )
    tracker.finish(state.tracking_run_id)
    return initial_and_final(state)
