"""The silo's flows: a round (evaluate, then train), an evaluation, protocol steps; on the silo's pool.

Their results (small records: object keys, hashes, metrics) are persisted so the
coordinator can read them from another process or host: with the real stack the
default result storage is the stack's S3 result bucket (a prefect-aws ``S3Bucket``
block), serialized as JSON (never pickle: the coordinator must not unpickle what a silo wrote).
The tasks inside these flows persist nothing and are never cached: only the flow's return value
crosses to the coordinator, and each persisted task result or cache lookup would be one more
round trip to the result store per task.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from silotune.config import FederationConfig
from silotune.federation import EvalRecord, ObjectRef, SiloRoundResult
from tasks.evaluate import evaluate_global
from tasks.local_train import local_train
from tasks.runtime import localize
from tasks.secure import publish_at_silo, secagg_advertise, secagg_share, secagg_unmask

SILO_STEPS = ("secagg-advertise", "secagg-share", "secagg-unmask", "publish")

_evaluate = evaluate_global.with_options(persist_result=False, cache_policy=NO_CACHE)
_train = local_train.with_options(persist_result=False, cache_policy=NO_CACHE)


def _error(state: State) -> str:
    try:
        state.result()
    except Exception as exc:  # the task's own exception, with its message
        return f"{type(exc).__name__}: {exc}"
    return state.message or str(state)


@flow(
    name="silo-round",
    flow_run_name="{silo}-round-{round_}",
    log_prints=True,
    persist_result=True,
    result_serializer="json",
)
def silo_round(
    config: FederationConfig, silo: str, round_: int, global_ref: ObjectRef, evaluate: bool = True
) -> SiloRoundResult | State:
    """Evaluate the global adapter received (round ``round_ - 1``'s output), then post-train from it.

    One run per silo per round: the evaluation of the previous round's output rides along with
    the next round's training. If training fails the run fails, but its result still carries the
    evaluation (and the training error), so the coordinator counts the evaluation.
    """
    config = localize(config, silo)
    result = SiloRoundResult(silo=silo, round=round_)
    if evaluate:
        ev = _evaluate(config, silo, round_ - 1, global_ref, return_state=True)
        if ev.is_completed():
            result.evaluation = ev.result()
        else:
            result.eval_error = _error(ev)
    tr = _train(config, silo, round_, global_ref, return_state=True)
    if tr.is_completed():
        result.update = tr.result()
        return result
    result.train_error = _error(tr)
    return Failed(message=f"local training failed: {result.train_error}", data=result)


@flow(
    name="silo-evaluate",
    flow_run_name="{silo}-evaluate-{round_}",
    log_prints=True,
    persist_result=True,
    result_serializer="json",
)
def silo_evaluate(
    config: FederationConfig, silo: str, round_: int, global_ref: ObjectRef
) -> EvalRecord | None:
    """Evaluate a global adapter on the silo's local holdout (the final global, after the last round)."""
    return _evaluate(localize(config, silo), silo, round_, global_ref)


@flow(
    name="silo-step",
    flow_run_name="{silo}-{stage}-{round_}",
    log_prints=True,
    persist_result=True,
    result_serializer="json",
)
def silo_step(
    config: FederationConfig,
    silo: str,
    stage: str,
    round_: int,
    global_ref: ObjectRef | None = None,
    run_id: str | None = None,
) -> Any:
    """A protocol step at the silo: secure-aggregation phases, or publishing a decrypted adapter."""
    config = localize(config, silo)
    if stage == "secagg-advertise":
        return secagg_advertise(config, silo, round_)
    if stage == "secagg-share":
        return secagg_share(config, silo, round_)
    if stage == "secagg-unmask":
        return secagg_unmask(config, silo, round_)
    if stage == "publish":
        if global_ref is None:
            raise ValueError("silo-step 'publish' needs global_ref")
        return publish_at_silo(config, silo, global_ref, run_id)
    raise ValueError(f"unknown silo step {stage!r}; known: {', '.join(SILO_STEPS)}")
