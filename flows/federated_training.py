"""The coordinator's flow: rounds of broadcast → local training → aggregation → evaluation.

Control flow only: every step is a task or a silo flow that exchanges object-store
keys and small records. Re-running with the same ``federation_id`` resumes after
the last committed round.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.runner import runner_for
from silotune.config import FederationConfig
from silotune.errors import QuorumError
from silotune.federation import summarize_evals
from tasks.aggregate import aggregate, root_update
from tasks.broadcast import broadcast
from tasks.checkpoint import commit, report, track_round, track_start
from tasks.publish import publish
from tasks.secure import close_upload


@flow(name="federated-training", flow_run_name="{config.federation_id}", log_prints=True)
def federated_training(config: FederationConfig) -> dict[str, Any]:
    """Run (or resume) a federation. Returns the final metrics and where the results are."""
    logger = get_run_logger()
    runner = runner_for(config)
    state = broadcast(config)
    initial = None
    if state.completed_rounds == 0 and state.initial_eval is None:
        evals, _ = runner.evaluate(config, -1, state.global_ref)
        initial = {"eval": {e.silo: e.result for e in evals}, "global_eval": summarize_evals(evals)}
    state = track_start(config, state, initial)
    if state.completed_rounds:
        logger.info(
            "resuming %s after round %d of %d", config.federation_id, state.completed_rounds, config.rounds
        )
    progress = create_progress_artifact(
        progress=100.0 * state.completed_rounds / config.rounds,
        description=f"rounds of {config.federation_id}",
    )
    secagg = config.security.protection == "secagg"
    for r in range(state.completed_rounds, config.rounds):
        failures = []
        if secagg:  # keys for this round: adverts, then encrypted shares
            for phase in ("secagg-advertise", "secagg-share"):
                _, phase_failures = runner.step(config, phase, r)
                failures += phase_failures
        records, train_failures = runner.train(config, r, state.global_ref)
        failures += train_failures
        if len(records) < config.aggregation.min_silos:
            raise QuorumError(
                f"round {r + 1}: only {len(records)} silo(s) returned an update, quorum is "
                f"{config.aggregation.min_silos}; failures: {[f.model_dump() for f in failures]}"
            )
        if secagg:  # survivors fixed, then they reveal the shares that remove the masks
            survivors = close_upload(config, r, records)
            _, unmask_failures = runner.step(config, "secagg-unmask", r, silos=survivors)
            failures += unmask_failures
        if config.aggregation.root_data_path is not None:  # FLTrust scores the silos against it
            root_update(config, r, state.global_ref)
        agg = aggregate(config, r, state.global_ref, records)
        evals, eval_failures = runner.evaluate(config, r, agg.next_global)
        state = commit(config, state, r, records, failures + eval_failures, agg, evals)
        track_round(config, state, r)
        g = state.history[-1]["global_eval"]
        logger.info(
            "round %d/%d: %d silo(s) in, %d out; holdout loss %.4f, exact match %.3f",
            r + 1,
            config.rounds,
            len(agg.included),
            len(agg.excluded) + len(failures),
            g.get("loss", float("nan")),
            g.get("exact_match", float("nan")),
        )
        update_progress_artifact(progress, 100.0 * (r + 1) / config.rounds)
    if config.security.protection == "ckks":  # only silos hold the key: one of them publishes
        published, publish_failures = {}, []
        for silo in config.silos:
            published, publish_failures = runner.step(
                config,
                "publish",
                state.completed_rounds,
                silos=[silo.name],
                global_ref=state.global_ref,
                run_id=state.tracking_run_id,
            )
            if published:
                break
        if not published:
            raise RuntimeError(f"no silo could publish the final adapter: {publish_failures}")
        adapter_dir = next(iter(published.values()))
    else:
        adapter_dir = publish(config, state)
    summary = report(config, state, adapter_dir)
    return {
        "federation_id": config.federation_id,
        "rounds": state.completed_rounds,
        "initial": summary["initial"],
        "final": summary["final"],
        "history": state.history,
        "initial_eval": state.initial_eval,
        "adapter": adapter_dir,
        "tracking_run_id": state.tracking_run_id,
        "tracking_uri": config.tracking.uri if config.tracking.kind == "mlflow" else None,
        "global_key": state.global_ref.key,
    }
