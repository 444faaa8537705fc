"""Committing a round (manifest + resume point) and reporting it."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from silotune.config import FederationConfig
from silotune.federation import (
    AggregateRecord,
    EvalRecord,
    FederationState,
    SiloFailure,
    UpdateRecord,
    commit_round,
    save_state,
)
from silotune.report import plot_history
from tasks.runtime import store_for, tracker_for


@task(name="commit-round", task_run_name="commit-r{round_}")
def commit(
    config: FederationConfig,
    state: FederationState,
    round_: int,
    updates: list[UpdateRecord],
    failures: list[SiloFailure],
    agg: AggregateRecord,
    evals: list[EvalRecord],
) -> FederationState:
    return commit_round(config, store_for(config), state, round_, updates, failures, agg, evals)


def round_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    silos = sorted(set(summary["train"]) | set(summary["eval"]) | set(summary["excluded"]))
    for silo in silos:
        tr = summary["train"].get(silo, {})
        ev = summary["eval"].get(silo, {})
        rows.append(
            {
                "silo": silo,
                "status": "excluded: " + summary["excluded"][silo][:120]
                if silo in summary["excluded"]
                else "included",
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


@task(name="track-round", task_run_name="track-r{round_}")
def track_round(config: FederationConfig, state: FederationState, round_: int) -> None:
    """Per-round MLflow nested run + Prefect table artifact."""
    summary = state.history[-1]
    tracker_for(config).log_round(state.tracking_run_id, round_ + 1, summary)
    create_table_artifact(
        key=f"{config.federation_id}-round-{round_ + 1}".replace("_", "-"),
        table=round_table(summary),
        description=f"Federation {config.federation_id}, round {round_ + 1}: training and holdout metrics.",
    )


@task(name="track-start")
def track_start(
    config: FederationConfig, state: FederationState, initial: dict[str, Any] | None
) -> FederationState:
    tracker = tracker_for(config)
    run_id = tracker.start(config, state.tracking_run_id)
    new = state.model_copy(update={"tracking_run_id": run_id})
    if initial is not None:
        new = new.model_copy(update={"initial_eval": initial})
        metrics = {f"global.{k}": float(v) for k, v in initial["global_eval"].items()}
        for silo, ev in initial["eval"].items():
            metrics.update({f"silo.{silo}.eval.{k}": float(v) for k, v in ev.items()})
        tracker.log_initial(run_id, metrics)
    save_state(store_for(config), new)
    return new


@task(name="report")
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
