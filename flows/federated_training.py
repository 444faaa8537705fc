"""The coordinator's flow: start or resume, then rounds of silo runs → aggregation → commit.

Control flow only: every step is a task or a silo flow that exchanges object-store
keys and small records. Re-running with the same ``federation_id`` resumes after
the last committed round.

Each round is one wave of silo runs: a silo evaluates the global adapter it receives (the previous
round's output, in round 1 the initial adapter) and trains from it. So round r's evaluation arrives
with round r+1's wave and is recorded at round r+1's commit; after the last round one
evaluate-only wave scores the final global. R rounds cost R+1 waves.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.runner import runner_for
from silotune.aggregation.sampling import silos_of_round
from silotune.config import FederationConfig
from silotune.errors import QuorumError
from silotune.protection import scheme_for
from silotune.records import RoundSummary
from tasks.aggregate import aggregate, root_update
from tasks.commit import commit
from tasks.publish import publish
from tasks.record_evaluation import record_eval
from tasks.report import report
from tasks.runtime import install_expected_error_filter, published_location
from tasks.secure import close_upload, open_round
from tasks.start import start_or_resume
from tasks.track import track_start


@flow(name="federated-training", flow_run_name="{config.federation_id}", log_prints=True)
def federated_training(config: FederationConfig, reuse: str | None = None) -> dict[str, Any]:
    """Run (or resume) a federation. Returns the final metrics and where the results are.

    ``reuse`` (experiments only, e.g. the robustness grid): the name of a memo in which identical
    local work of the processes that run this federation is done once (see ``tasks.runtime``).
    """
    install_expected_error_filter()
    logger = get_run_logger()
    runner = runner_for(config)
    state = track_start(config, start_or_resume(config))
    if state.completed_rounds:
        logger.info(
            "resuming %s after round %d of %d", config.federation_id, state.completed_rounds, config.rounds
        )
    done = 100.0 * state.completed_rounds / config.rounds
    progress = _show_progress(logger, None, done, config.federation_id)
    scheme = scheme_for(config)
    for r in range(state.completed_rounds, config.rounds):
        pending = state.pending_evaluation  # r - 1 (-1: the initial global), or None if already recorded
        started = time.perf_counter()
        failures = []
        drawn = silos_of_round(config, r)  # client sampling: the round's silos (all without it)
        if scheme.steps_before_upload:  # secure aggregation: the masking graph, which each silo checks
            open_round(config, r)
        for phase in scheme.steps_before_upload:  # secure aggregation: adverts, then encrypted shares
            _, phase_failures = runner.step(config, phase, r, silos=drawn)
            failures += phase_failures
        wave = runner.run_round(
            config, r, state.global_ref, evaluate=pending is not None, reuse=reuse, silos=drawn
        )
        failures += wave.failures
        try:
            if len(wave.updates) < config.aggregation.min_silos:
                raise QuorumError(
                    f"round {r + 1}: only {len(wave.updates)} silo(s) returned an update, quorum is "
                    f"{config.aggregation.min_silos}; failures: {[f.model_dump() for f in failures]}"
                )
            if scheme.steps_after_upload:  # survivors fixed, then e.g. they reveal the masks' shares
                survivors = close_upload(config, r, wave.updates)
                for phase in scheme.steps_after_upload:
                    _, phase_failures = runner.step(config, phase, r, silos=survivors)
                    failures += phase_failures
            if config.aggregation.root_data_path is not None:  # FLTrust scores the silos against it
                root_update(config, r, state.global_ref, reuse)
            agg = aggregate(config, r, state.global_ref, wave.updates)
        except QuorumError:
            if pending is not None:  # the evaluations this wave did get still count
                record_eval(config, state, pending, wave.evals, wave.eval_failures)
            raise
        # One task: record round r-1's evaluation (and track round r-1), then commit round r.
        evals = wave.evals if pending is not None else None
        seconds = time.perf_counter() - started
        state = commit(config, state, r, wave.updates, failures, agg, evals, wave.eval_failures, seconds)
        logger.info(
            "round %d: aggregation %.2f s of %.2f s (%.1f%%), %d silo(s)",
            r + 1,
            agg.seconds,
            seconds,
            100.0 * agg.seconds / seconds if seconds > 0 else 0.0,
            len(agg.included),
        )
        if pending is not None and pending >= 0:
            _log_round(logger, config, state.history[pending])
        _show_progress(logger, progress, 100.0 * (r + 1) / config.rounds)
    final = state.pending_evaluation
    if final is not None:  # the last round's output: one evaluate-only wave
        evals, eval_failures = runner.evaluate(config, final, state.global_ref, reuse=reuse)
        state = record_eval(config, state, final, evals, eval_failures)
        if final >= 0:
            _log_round(logger, config, state.history[final])
    if scheme.publishes_at_silo:  # only silos hold the key: the designated one publishes
        publisher = config.ckks_publisher
        published, publish_failures = runner.step(
            config,
            "publish",
            state.completed_rounds,
            silos=[publisher],
            global_ref=state.global_ref,
            run_id=state.tracking_run_id,
        )
        if publisher not in published or not published[publisher].objects:
            raise RuntimeError(f"the publishing silo {publisher!r} could not publish: {publish_failures}")
        adapter_dir = published_location(config, published[publisher].objects[0])
    else:
        adapter_dir = publish(config, state)
    first, last = report(config, state, adapter_dir)
    return {
        "federation_id": config.federation_id,
        "rounds": state.completed_rounds,
        "initial": first,  # weighted holdout metrics of the initial global (HoldoutMetrics or None)
        "final": last,  # … and of the final global
        "history": state.history,  # list[RoundSummary]
        "initial_eval": state.initial_eval,
        "adapter": adapter_dir,
        "tracking_run_id": state.tracking_run_id,
        "tracking_uri": config.tracking.uri if config.tracking.kind == "mlflow" else None,
        "global_key": state.global_ref.key,
    }


def _show_progress(logger: Any, artifact: Any, percent: float, federation_id: str = "") -> Any:
    """Create (``artifact`` None) or update the rounds' progress artifact; returns its id.

    A display only: Prefect creates a fresh API client for it, which does not wait out a server
    that is away (restarting), so a failure here is logged and the federation goes on.
    """
    try:
        if artifact is None:
            return create_progress_artifact(progress=percent, description=f"rounds of {federation_id}")
        update_progress_artifact(artifact, percent)
    except Exception as exc:  # the progress bar must never stop a federation
        logger.warning("progress not shown (%s: %s); the federation goes on", type(exc).__name__, exc)
    return artifact


def _log_round(logger: Any, config: FederationConfig, h: RoundSummary) -> None:
    g = h.global_eval
    if g is None:  # no silo holds a holdout (a baseline), or none evaluated
        logger.info(
            "round %d/%d: %d silo(s) in, %d out; no holdout evaluated",
            h.round,
            config.rounds,
            len(h.included),
            len(h.excluded),
        )
        return
    logger.info(
        "round %d/%d: %d silo(s) in, %d out; holdout loss %.4f, exact match %.3f",
        h.round,
        config.rounds,
        len(h.included),
        len(h.excluded),
        g.loss,
        g.exact_match,
    )
