"""The silo's flows: one local round, one evaluation. They run on the silo's work pool."""

from __future__ import annotations

from prefect import flow

from silotune.config import FederationConfig
from silotune.federation import EvalRecord, ObjectRef, UpdateRecord
from tasks.evaluate import evaluate_global
from tasks.local_train import local_train


@flow(name="silo-round", flow_run_name="{silo}-round-{round_}", log_prints=True)
def silo_round(config: FederationConfig, silo: str, round_: int, global_ref: ObjectRef) -> UpdateRecord:
    """Fetch the global adapter, post-train locally, upload the update; return its record."""
    return local_train(config, silo, round_, global_ref)


@flow(name="silo-evaluate", flow_run_name="{silo}-evaluate-{round_}", log_prints=True)
def silo_evaluate(
    config: FederationConfig, silo: str, round_: int, global_ref: ObjectRef
) -> EvalRecord | None:
    """Evaluate a global adapter on the silo's local holdout."""
    return evaluate_global(config, silo, round_, global_ref)
