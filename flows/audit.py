"""Auditing a finished federation: one flow, one task (the library does the work)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from silotune.config import FederationConfig
from tasks.audit import audit


@flow(name="audit-federation", flow_run_name="audit-{config.federation_id}", log_prints=True)
def audit_federation_flow(
    config: FederationConfig, max_examples: int | None = 200, out_dir: str | None = None
) -> dict[str, Any]:
    """Membership inference and backdoor success of the final adapter, logged to its MLflow run."""
    return audit(config, max_examples, out_dir)
