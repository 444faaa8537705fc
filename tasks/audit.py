"""Audits of a finished federation (membership inference, backdoor success), logged to its MLflow run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from silotune.audit import audit_federation, audit_markdown, backdoor_success, plot_audit
from silotune.config import FederationConfig
from silotune.data import read_records
from silotune.federation.commit import load_state
from silotune.store import get_tensors
from tasks.runtime import TRAIN_LOCK, adapter_for, store_for, tracker_for


@task(name="audit-federation", task_run_name="audit-{config.federation_id}")
def audit(config: FederationConfig, max_examples: int | None, out_dir: str | None = None) -> dict[str, Any]:
    """Run the audit, log metrics + ROC plot + JSON to the federation's MLflow run and a Prefect artifact."""
    store = store_for(config)
    with TRAIN_LOCK:
        report = audit_federation(
            config,
            store,
            adapter_for(config),
            max_examples=max_examples,
            batch_size=config.evaluation.batch_size,
        )
    state = load_state(store, config.federation_id)
    run_id = state.tracking_run_id if state else None
    tracker = tracker_for(config)
    tracker.log_metrics(run_id, report.metrics(), step=report.rounds)
    png = plot_audit(report)
    md = audit_markdown(report)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "audit.json").write_text(json.dumps(report.as_dict(), indent=2))
        (folder / "audit_roc.png").write_bytes(png)
        (folder / "audit.md").write_text(md)
        for name in ("audit.json", "audit_roc.png", "audit.md"):
            tracker.log_file(run_id, folder / name, "audit")
    create_markdown_artifact(
        key=f"{config.federation_id}-audit".replace("_", "-"),
        markdown=md,
        description="Privacy/robustness audit",
    )
    return {**report.as_dict(), "tracking_run_id": run_id}


@task(name="backdoor-eval", task_run_name="backdoor-{config.federation_id}")
def backdoor_eval(
    config: FederationConfig, trigger: str, target: str, max_examples: int | None = None
) -> dict[str, float]:
    """Backdoor success of the federation's final adapter on every silo's holdout (no MIA)."""
    store = store_for(config)
    state = load_state(store, config.federation_id)
    if state is None:
        raise ValueError(f"no federation {config.federation_id!r} in {store.describe()}")
    final = get_tensors(store, state.global_ref.key, expected_sha256=state.global_ref.sha256)
    chats = [c for s in config.silos if s.eval_path for c in read_records(s.eval_path)]
    if max_examples is not None:
        chats = chats[:max_examples]
    with TRAIN_LOCK:
        res = backdoor_success(
            adapter_for(config),
            final,
            chats,
            trigger=trigger,
            target=target,
            max_seq_len=config.model.max_seq_len,
            batch_size=config.evaluation.batch_size,
        )
    return res.metrics()
