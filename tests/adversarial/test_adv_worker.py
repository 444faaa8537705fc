"""A malicious coordinator or Prefect server points a silo's worker at code of its choosing.

Whoever can create deployments on the Prefect server (the server itself, the coordinator, any
holder of the API auth string) can put a deployment of *any* flow on the pool ``silo-<name>``. A
worker that loads that flow from storage runs the deployment's pull steps and entrypoint next to
the silo's keys, data and policy: arbitrary code at the silo. A silo's worker therefore runs only
the silo flows shipped with its own installed silotune, chosen by flow name, and refuses anything
else without loading it.
"""

from __future__ import annotations

from uuid import uuid4

import prefect.flow_engine
import prefect.flows
import pytest
from prefect.client.schemas.objects import FlowRun

import ops.worker
from ops.worker import InProcessWorker


def _run_of(worker: InProcessWorker, flow_name: str) -> FlowRun:
    run = FlowRun(flow_id=uuid4(), name="innocent-name")
    worker._flow_names[run.flow_id] = flow_name  # what the server answers for read_flow(run.flow_id)
    return run


@pytest.fixture
def loaded(monkeypatch) -> list[FlowRun]:
    calls: list[FlowRun] = []

    def record(flow_run: FlowRun):  # stands in for Prefect's loader: pull steps + entrypoint
        calls.append(flow_run)
        return lambda: None

    # Every loader a worker could reach: Prefect's, and any name ops.worker imported it under.
    monkeypatch.setattr(prefect.flow_engine, "load_flow", record)
    monkeypatch.setattr(prefect.flows, "load_flow_from_flow_run", record)
    monkeypatch.setattr(ops.worker, "load_flow", record, raising=False)
    return calls


@pytest.mark.parametrize("flow_name", ["exfiltrate", "federated-training", "scheduled-retraining"])
def test_silo_worker_refuses_flows_it_does_not_ship(loaded, flow_name: str) -> None:
    worker = InProcessWorker(work_pool_name="silo-clinic")
    with pytest.raises(Exception, match="not a silo flow"):
        worker._flow_for(_run_of(worker, flow_name))
    assert loaded == [], "the silo worker loaded code named by the server"


def test_silo_worker_runs_its_own_silo_flows(loaded) -> None:
    worker = InProcessWorker(work_pool_name="silo-clinic")
    flow = worker._flow_for(_run_of(worker, "silo-round"))
    from flows.silo import silo_round

    assert flow is silo_round and loaded == []


def test_coordinator_worker_loads_no_stored_code_either(loaded) -> None:
    worker = InProcessWorker(work_pool_name="coordinator", role="coordinator")
    assert worker._flow_for(_run_of(worker, "federated-training")).name == "federated-training"
    with pytest.raises(Exception, match="not served"):
        worker._flow_for(_run_of(worker, "exfiltrate"))
    assert loaded == []
