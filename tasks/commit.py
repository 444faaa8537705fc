"""Commit a round at the coordinator: its manifest, then the resume point (``state.json``)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.federation.commit import commit_round, record_evaluation
from silotune.records import AggregateRecord, EvalRecord, FederationState, SiloFailure, UpdateRecord
from tasks.runtime import store_for
from tasks.track import track_evaluation


# Persists no result and is never cached: its return value only feeds the coordinator flow, in-process.
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
    round_seconds: float | None = None,
) -> FederationState:
    """Record the evaluation that came with this round's silo runs (of round ``round_ - 1``'s output,
    when ``evals`` is given), commit round ``round_``, then track the evaluated round."""
    store = store_for(config)
    evaluated = state.pending_evaluation if evals is not None else None
    if evaluated is not None:
        state = record_evaluation(
            config, store, state, evaluated, evals or [], eval_failures or [], save=False
        )
    new = commit_round(config, store, state, round_, updates, failures, agg, round_seconds=round_seconds)
    if evaluated is not None:
        track_evaluation(config, new, evaluated)
    return new
