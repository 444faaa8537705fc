"""Commit a round at the coordinator: its manifest, then the resume point (``state.json``)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.federation.commit import commit_round, load_state, record_evaluation
from silotune.records import AggregateRecord, EvalRecord, FederationState, SiloFailure, UpdateRecord
from tasks import runtime
from tasks.runtime import store_for
from tasks.track import track_evaluation


# Persists no result and is never cached: its return value only feeds the coordinator flow, in-process.
# Retried when the store cannot be reached; a retry never commits a round twice (see below).
@task(
    name="commit-round",
    task_run_name="commit-r{round_}",
    **runtime.STORE_RETRIES,
    persist_result=False,
    cache_policy=NO_CACHE,
)
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
    stored = load_state(store, config.federation_id)
    if (
        stored is not None
        and stored.completed_rounds == round_ + 1
        and stored.global_ref == agg.next_global
        and stored.fingerprint == state.fingerprint
    ):
        # An earlier try of this task committed the round (state.json is the commit point) and failed
        # after it, e.g. while tracking: the round stays as committed; only the tracking runs again.
        if evaluated is not None:
            track_evaluation(config, stored, evaluated)
        return stored
    if evaluated is not None:
        state = record_evaluation(
            config, store, state, evaluated, evals or [], eval_failures or [], save=False
        )
    new = commit_round(config, store, state, round_, updates, failures, agg, round_seconds=round_seconds)
    if evaluated is not None:
        track_evaluation(config, new, evaluated)
    return new
