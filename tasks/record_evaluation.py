"""Record the silos' holdout evaluation of a round's output when no commit follows to carry it."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.federation.commit import record_evaluation
from silotune.records import EvalRecord, FederationState, SiloFailure
from tasks import runtime
from tasks.runtime import store_for
from tasks.track import track_evaluation


# Persists no result and is never cached: its return value only feeds the coordinator flow, in-process.
# A retry records the same evaluation: the evaluation object is write-once, and the first one written
# is the one recorded.
@task(
    name="record-evaluation",
    task_run_name="record-evaluation-r{round_}",
    **runtime.STORE_RETRIES,
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
    track_evaluation(config, new, round_)
    return new
