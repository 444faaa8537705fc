"""Evaluate a federation's adapter with EleutherAI's lm-evaluation-harness (control flow only)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from silotune.config import FederationConfig
from tasks.harness import harness, publish_harness


@flow(name="harness-eval", flow_run_name="harness-{config.federation_id}", log_prints=True)
def harness_eval(
    config: FederationConfig,
    tasks: list[str],
    adapter_dir: str | None,
    out: str,
    run_id: str | None = None,
    limit: int | None = None,
    max_gen_toks: int = 64,
) -> dict[str, Any]:
    """Run the harness tasks (``holdouts``: one generated task per silo holdout) on the base model plus
    ``adapter_dir`` (None: the base model alone); results to ``run_id``'s MLflow run and Prefect."""
    results = harness(config, tasks, adapter_dir, out, limit, max_gen_toks)
    pub = publish_harness(config, results, out, run_id)
    return {"results": results, **pub}
