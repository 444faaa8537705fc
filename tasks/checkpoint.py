"""Committing a round (manifest + resume point), recording evaluations as they arrive, and reporting.

A round's holdout evaluation arrives with the next round's silo runs, so a round is tracked
(MLflow nested run and metrics at its step, Prefect table artifact) when its evaluation is
recorded: in the next round's ``commit-round`` task, or in ``record-evaluation`` after the last
round. One task per round: every Prefect task run costs several API writes.

These tasks persist no result and are never cached: their return values only feed the
coordinator flow, in the same process.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.federation.commit import commit_round, record_evaluation, save_state
from silotune.records import AggregateRecord, EvalRecord, FederationState, SiloFailure, UpdateRecord
from silotune.report import plot_history
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
        initial = state.initial_eval or {}
        metrics = {f"global.{k}": float(v) for k, v in initial.get("global_eval", {}).items()}
        for silo, ev in initial.get("eval", {}).items():
            metrics.update({f"silo.{silo}.eval.{k}": float(v) for k, v in ev.items()})
        tracker.log_initial(state.tracking_run_id, metrics)
        return
    summary = state.history[round_]
    tracker.log_round(state.tracking_run_id, round_ + 1, summary)
    create_table_artifact(
        key=f"{config.federation_id}-round-{round_ + 1}".replace("_", "-"),
        table=round_table(summary),
        description=f"Federation {config.federation_id}, round {round_ + 1}: training and holdout metrics.",
    )


def round_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    silos = sorted(
        set(summary["train"])
        | set(summary["eval"])
        | set(summary["excluded"])
        | set(summary.get("eval_failures", {}))
    )
    for silo in silos:
        tr = summary["train"].get(silo, {})
        ev = summary["eval"].get(silo, {})
        if silo in summary["excluded"]:
            status = "excluded: " + summary["excluded"][silo][:120]
        elif silo in summary.get("eval_failures", {}):
            status = "included; evaluation failed: " + summary["eval_failures"][silo][:100]
        else:
            status = "included"
        rows.append(
            {
                "silo": silo,
                "status": status,
                "examples": tr.get("num_examples", ""),
                "train_loss_first": round(tr["first_loss"], 4) if "first_loss" in tr else "",
                "train_loss_final": round(tr["final_loss"], 4) if "final_loss" in tr else "",
                "tokens_per_s": round(tr["tokens_per_second"], 1) if "tokens_per_second" in tr else "",
                "update_norm": round(tr["update_norm"], 4) if "update_norm" in tr else "",
                "holdout_loss": round(ev["loss"], 4) if "loss" in ev else "",
                "holdout_exact_match": round(ev["exact_match"], 4) if "exact_match" in ev else "",
            }
        )
    g = summary.get("global_eval") or {}
    rows.append(
        {
            "silo": "GLOBAL (weighted)",
            "status": "",
            "examples": g.get("num_examples", ""),
            "train_loss_first": "",
            "train_loss_final": "",
            "tokens_per_s": "",
            "update_norm": round(summary["delta_norm"], 4)
            if summary.get("delta_norm") is not None
            else "(encrypted)",
            "holdout_loss": round(g["loss"], 4) if "loss" in g else "",
            "holdout_exact_match": round(g["exact_match"], 4) if "exact_match" in g else "",
        }
    )
    return rows


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
def report(config: FederationConfig, state: FederationState, final_adapter_dir: str | None) -> dict[str, Any]:
    """Plot the history to MLflow and Prefect; return a small summary for the caller."""
    tracker = tracker_for(config)
    png = plot_history(state.history, state.initial_eval, title=f"silotune federation {config.federation_id}")
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "federation_history.png"
        p.write_bytes(png)
        tracker.log_file(state.tracking_run_id, p, "plots")
    first = (state.initial_eval or {}).get("global_eval", {})
    last = state.history[-1]["global_eval"] if state.history else {}
    md = [
        f"# Federation `{config.federation_id}`",
        "",
        f"Rounds completed: **{state.completed_rounds}** of {config.rounds}; "
        f"silos: {', '.join(s.name for s in config.silos)}.",
        "",
    ]
    if first and last:
        md += [
            "| holdout (weighted over silos) | initial global | final global |",
            "|---|---|---|",
            f"| loss | {first['loss']:.4f} | {last['loss']:.4f} |",
            f"| exact match | {first['exact_match']:.3f} | {last['exact_match']:.3f} |",
            "",
        ]
    md += [
        f"Final adapter: `{final_adapter_dir}`",
        f"MLflow run: `{state.tracking_run_id}`",
        "",
        f"![history](data:image/png;base64,{base64.b64encode(png).decode()})",
    ]
    create_markdown_artifact(
        key=f"{config.federation_id}-summary".replace("_", "-"),
        markdown="\n".join(md),
        description="Federation summary",
    )
    tracker.finish(state.tracking_run_id)
    return {"initial": first, "final": last}
