"""Publishing the robustness grid: files, one MLflow run, Prefect artifacts."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from silotune.config import TrackingSpec
from silotune.robustness import GridRow, table_records, write_results
from silotune.tracking import MlflowTracker


@task(name="publish-grid")
def publish_grid(
    rows: list[GridRow], out: str, *, title: str, notes: list[str], tracking: TrackingSpec, grid_id: str
) -> dict[str, Any]:
    """Write CSV/markdown/PNG/JSON under ``out``, log them to an MLflow run, and create Prefect artifacts."""
    paths = write_results(rows, Path(out), title=title, notes=notes)
    run_id = None
    if tracking.kind == "mlflow":
        tracker = MlflowTracker(tracking)
        client = tracker.client
        exp = client.get_experiment_by_name(tracking.experiment)
        exp_id = exp.experiment_id if exp is not None else tracker._experiment_id()
        run = client.create_run(
            exp_id, tags={"mlflow.runName": grid_id, "silotune.kind": "robustness-grid-summary"}
        )
        run_id = run.info.run_id
        for rec in table_records(rows):
            slug = f"{rec['attack']}.{rec['rule']}"
            client.log_metric(run_id, f"grid.{slug}.union_loss", float(rec["union_loss"]))
            client.log_metric(run_id, f"grid.{slug}.union_exact_match", float(rec["union_exact_match"]))
            if rec["backdoor_success"] != "":
                client.log_metric(run_id, f"grid.{slug}.backdoor_success", float(rec["backdoor_success"]))
        for p in paths.values():
            client.log_artifact(run_id, str(p), "robustness")
        client.set_terminated(run_id)
    md = paths["markdown"].read_text()
    png = base64.b64encode(paths["png"].read_bytes()).decode()
    create_markdown_artifact(
        key=f"{grid_id}-robustness".replace("_", "-"),
        markdown=md + f"\n\n![grid](data:image/png;base64,{png})\n",
        description="Robustness grid: attacks × aggregation rules",
    )
    create_table_artifact(
        key=f"{grid_id}-robustness-table".replace("_", "-"),
        table=table_records(rows),
        description="Robustness grid rows",
    )
    return {"paths": {k: str(v) for k, v in paths.items()}, "mlflow_run_id": run_id}
