"""The silo's flows: a round (evaluate, then train), an evaluation, protocol steps; on the silo's pool.

Every run first checks the config it was sent against the silo's own policy (``tasks.runtime.admit``):
a refused run fails before any data is read, with a message naming each field and policy line.

The runs persist no Prefect results. What a run returns to the coordinator is a signed, plain-JSON
record the silo writes into its own store prefix (:mod:`silotune.results`), read back by the
coordinator with a schema and a size limit: Prefect's result store would rebuild its serializer,
pickle included, from metadata the silo's engine reported. Under DP or protection a record holds
only what the silo's policy releases.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.states import Failed, State

from silotune.config import FederationConfig
from silotune.records import ObjectRef, SiloEvalResult, SiloRoundResult, SiloStepResult
from tasks.evaluate import evaluate_global
from tasks.local_train import local_train
from tasks.release import clip_and_noise, protect, sign, upload
from tasks.runtime import admit
from tasks.secure import protocol_step, publish_at_silo, report

SILO_STEPS = ("secagg-advertise", "secagg-share", "secagg-unmask", "publish")

_evaluate = evaluate_global.with_options(persist_result=False, cache_policy=NO_CACHE)
_train = local_train.with_options(persist_result=False, cache_policy=NO_CACHE)


def _error(state: State) -> str:
    try:
        state.result()
    except Exception as exc:  # the task's own exception, with its message
        return f"{type(exc).__name__}: {exc}"
    return state.message or str(state)


def _run_id() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


@flow(name="silo-round", flow_run_name="{silo}-round-{round_}", log_prints=True, persist_result=False)
def silo_round(
    config: FederationConfig,
    silo: str,
    round_: int,
    global_ref: ObjectRef,
    evaluate: bool = True,
    reuse: str | None = None,
) -> State | None:
    """Evaluate the global adapter received (round ``round_ - 1``'s output), then post-train from it.

    The steps are the design's: evaluate → local train → clip and noise → protect → sign → upload,
    each its own task passing paths in the silo's private folder. One run per silo per round: the
    evaluation of the previous round's output rides along with the next round's training. If a step
    fails the run fails, but its record still carries the evaluation (and the error), so the
    coordinator counts the evaluation.
    """
    config, release = admit(config, silo)
    result = SiloRoundResult(silo=silo, round=round_, run_id=_run_id())
    if evaluate:
        ev = _evaluate(config, silo, round_ - 1, global_ref, reuse, return_state=True)
        if ev.is_completed():
            result.evaluation = ev.result()
        else:
            result.eval_error = _error(ev)
    try:
        trained = _train(config, silo, round_, global_ref, reuse)
        trained = clip_and_noise(config, trained)
        payload = protect(config, trained)
        signature = sign(config, silo, round_, payload)
        result.update = upload(config, trained, payload, signature)
    except Exception as exc:  # the failed task's own exception, with its message
        result.train_error = f"{type(exc).__name__}: {exc}"
    report(config, silo, round_, "round", result, release)
    if result.train_error is not None:
        return Failed(message=f"local training failed: {result.train_error}")
    return None


@flow(name="silo-evaluate", flow_run_name="{silo}-evaluate-{round_}", log_prints=True, persist_result=False)
def silo_evaluate(
    config: FederationConfig, silo: str, round_: int, global_ref: ObjectRef, reuse: str | None = None
) -> None:
    """Evaluate a global adapter on the silo's local holdout (the final global, after the last round)."""
    config, release = admit(config, silo)
    evaluation = _evaluate(config, silo, round_, global_ref, reuse)
    report(
        config,
        silo,
        round_,
        "evaluate",
        SiloEvalResult(silo=silo, round=round_, evaluation=evaluation, run_id=_run_id()),
        release,
    )


@flow(name="silo-step", flow_run_name="{silo}-{stage}-{round_}", log_prints=True, persist_result=False)
def silo_step(
    config: FederationConfig,
    silo: str,
    stage: str,
    round_: int,
    global_ref: ObjectRef | None = None,
    run_id: str | None = None,
) -> Any:
    """A protocol step at the silo: secure-aggregation phases, or publishing a decrypted adapter."""
    config, release = admit(config, silo)
    if stage not in SILO_STEPS:
        raise ValueError(f"unknown silo step {stage!r}; known: {', '.join(SILO_STEPS)}")
    if stage == "publish":
        if global_ref is None:
            raise ValueError("silo-step 'publish' needs global_ref")
        keys = [publish_at_silo(config, silo, global_ref, run_id)]
    else:
        keys = protocol_step(config, silo, round_, stage)
    record = SiloStepResult(silo=silo, round=round_, stage=stage, objects=keys, run_id=_run_id())
    report(config, silo, round_, stage, record, release)
