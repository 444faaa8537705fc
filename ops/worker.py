"""The long-lived worker that serves a work pool: every flow run is a real Prefect run, executed in-process.

Prefect's process worker starts a new Python interpreter for each flow run; here
that costs 15-21 s per round (imports of torch/transformers, loading the model)
against well under a second of orchestration. Federated rounds are many and short,
so each pool is served by an :class:`InProcessWorker` instead: a
``prefect.workers.base.BaseWorker`` that polls its pool like any worker (pending →
running → completed states, logs, cancellation, heartbeats all go through the
Prefect API) but runs each flow run with ``prefect.flow_engine.run_flow`` in a
thread of its own long-lived process. The base model therefore stays loaded in
``tasks.runtime.MODELS`` from one round to the next.

A worker runs only the flows this installation ships, chosen by the flow's *name*, and never loads
a flow from a deployment's storage: loading one runs the deployment's pull steps and entrypoint,
which whoever can create deployments on the Prefect server chooses (the server, the coordinator, any
holder of the API auth string). A silo's worker (``role="silo"``, the default) runs only the three
silo flows; the coordinator's also runs the federation and retraining flows. Anything else fails with
one line, unloaded.

The pools stay ordinary ``process`` pools: a stock ``prefect worker start --pool
silo-<name>`` can serve them too (slower, one process per run). That stock worker is also the
fallback if Prefect changes the private ``BaseWorker`` members this worker relies on: they are all
reached through :class:`ops.prefect_private.FencedWorker`, never from this module. The stock worker
does run a deployment's pull steps and command, so it is for a silo that trusts the server.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import anyio
import anyio.abc
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import WorkerFlowRunResponse
from prefect.context import SyncClientContext
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.exceptions import ObjectNotFound
from prefect.flow_engine import run_flow
from prefect.logging.loggers import flow_run_logger
from prefect.settings import PREFECT_WORKER_QUERY_SECONDS, temporary_settings
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorkerResult

from flows.api_client import busy_retry_settings
from ops.prefect_private import FencedWorker
from silotune.compute import (
    DEVICE_ENV,
    colocated_workers,
    default_threads,
    serialise_colocated,
    usable_cores,
)

log = logging.getLogger("silotune.worker")


# A run scheduled to start at most this far ahead is claimed at its start time from its Scheduled
# event; later ones are left to the pool's poll.
CLAIM_WAIT_S = 5.0


class InProcessResult(BaseWorkerResult):
    """What the worker reports for a run (status 0: the engine ran; the run's own state says how it went)."""


Role = Literal["silo", "coordinator"]


class FlowRefused(Exception):
    """A run of a flow this worker does not ship: it is failed without loading any code."""


def served_flows(role: Role = "silo") -> dict[str, Any]:
    """The flows a worker of ``role`` runs, by flow name: this installation's code, never stored code."""
    # Imported when the first run arrives: the flows import torch and transformers (seconds).
    from flows.silo import silo_evaluate, silo_round, silo_step

    flows = [silo_round, silo_evaluate, silo_step]
    if role == "coordinator":
        from flows.federated_training import federated_training
        from flows.retraining import scheduled_retraining

        flows += [federated_training, scheduled_retraining]
    return {f.name: f for f in flows}


class InProcessWorker(FencedWorker):
    """Serves a ``process`` work pool, running each flow run in this process (see the module docstring)."""

    type = "process"  # the pool type it serves; pools stay usable by a stock process worker
    job_configuration = BaseJobConfiguration
    job_configuration_variables = BaseVariables
    # Registered under its own key so it never replaces Prefect's ProcessWorker in the type registry.
    registry_key = "silotune-inprocess"

    @classmethod
    def get_description(cls) -> str:
        return "Runs flow runs of a process pool in one long-lived process, keeping models loaded."

    def __init__(self, *args: Any, role: Role = "silo", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.role: Role = role
        self._flows: dict[str, Any] | None = None
        self._flow_names: dict[Any, str] = {}
        self._unnamed: dict[str, Any] = {}
        self._refused: dict[UUID, str] = {}

    def _flow_for(self, flow_run: FlowRun) -> Any:
        if self._flows is None:
            self._flows = served_flows(self.role)
        name = self._flow_names.get(flow_run.flow_id)
        if name is None:
            with get_client(sync_client=True) as client:
                name = client.read_flow(flow_run.flow_id).name
            self._flow_names[flow_run.flow_id] = name
        if name in self._flows:
            return self._flows[name]
        # Never `load_flow(flow_run)`: that runs the deployment's pull steps and entrypoint, chosen by
        # whoever created the deployment (see the module docstring).
        if self.role == "silo":
            raise FlowRefused(
                f"flow {name!r} is not a silo flow: this silo's worker runs only {sorted(self._flows)}"
            )
        raise FlowRefused(f"flow {name!r} is not served by this worker: it runs only {sorted(self._flows)}")

    def _named(self, flow: Any, flow_run: FlowRun) -> Any:
        """``flow``, or a copy that does not rename the run when its creator already named it so.

        The engine renames every run of a flow with a ``flow_run_name`` template (one more API write
        per run); the coordinator names the silo runs it creates from the same template.
        """
        template = flow.flow_run_name
        if not isinstance(template, str):
            return flow
        try:
            name = template.format(**flow_run.parameters)
        except (KeyError, IndexError, ValueError, AttributeError):
            return flow
        if name != flow_run.name:
            return flow
        if flow.name not in self._unnamed:
            unnamed = copy.copy(flow)
            unnamed.flow_run_name = None
            self._unnamed[flow.name] = unnamed
        return self._unnamed[flow.name]

    def _execute(self, flow_run: FlowRun) -> int:
        try:
            flow = self._named(self._flow_for(flow_run), flow_run)
        except FlowRefused as exc:
            log.error("flow run %s refused: %s", flow_run.id, exc)
            self._refused[flow_run.id] = str(exc)
            return 1
        try:
            # The engine's API client (found through this context) retries a busy server within tens
            # of milliseconds instead of Prefect's 2 s (see flows/api_client.py).
            with SyncClientContext(httpx_settings=busy_retry_settings(sync=True)):
                run_flow(flow, flow_run=flow_run, return_type="state", error_logger=flow_run_logger(flow_run))
            return 0
        except BaseException:  # the engine itself failed: the worker reports the run as crashed
            log.exception("flow run %s could not be executed", flow_run.id)
            return 1

    async def run(
        self,
        flow_run: FlowRun,
        configuration: BaseJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> InProcessResult:
        if task_status is not None:
            task_status.started(os.getpid())
        code = await anyio.to_thread.run_sync(self._execute, flow_run, abandon_on_cancel=True)
        return InProcessResult(identifier=str(flow_run.id), status_code=code)

    async def submit_run(self, flow_run: FlowRun) -> None:
        # The stock path prepares infrastructure first (re-reads the deployment, renders the job template,
        # relabels the run, proposes an extra state, records a pid): ~6 API calls per run for a process
        # this worker does not start. Claim the run (Pending) and hand it to a thread; the engine reports
        # Running/Completed/Failed itself, exactly as it does in a subprocess.
        try:
            if await self.propose_pending(flow_run):
                self.start_soon(self._run_and_release, flow_run)
            else:
                self.release_slot(flow_run.id)
        finally:
            self.submission_done(flow_run.id)

    async def _run_and_release(self, flow_run: FlowRun) -> None:
        try:
            code = await anyio.to_thread.run_sync(self._execute, flow_run, abandon_on_cancel=True)
            if code != 0:
                reason = self._refused.pop(flow_run.id, "the flow run engine failed in the silotune worker")
                await self.propose_crashed(flow_run, reason)
        finally:
            self.release_slot(flow_run.id)

    async def claim(self, flow_run_id: UUID) -> None:
        """Submit the run a Scheduled event names: one read, then the Pending proposal that claims it.

        Cheaper than polling the pool (a write on the server) for each event. A run scheduled to start
        within ``CLAIM_WAIT_S`` is claimed at its start time, not before: the coordinator schedules a
        wave's runs to start together once it has created them all (on SQLite, a write in the middle of
        a run creation makes the creation fail and retry). A run that is no longer Scheduled, belongs
        to another pool or queue, or starts later is left to the regular poll.
        """
        pool = self.synced_pool()
        if pool is None:
            await self.get_and_submit_flow_runs()
            return
        try:
            flow_run = await self.client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return
        state = flow_run.state
        start = flow_run.next_scheduled_start_time
        wait = (start - datetime.now(UTC)).total_seconds() if start is not None else 0.0
        if (
            state is None
            or not state.is_scheduled()
            or flow_run.work_pool_name != pool.name
            or flow_run.work_queue_id is None
            or (self.queue_names() and flow_run.work_queue_name not in self.queue_names())
            or wait > CLAIM_WAIT_S
        ):
            return
        if wait > 0:
            await anyio.sleep(wait)
        queue = flow_run.work_queue_id
        await self.submit_scheduled(
            [WorkerFlowRunResponse(work_pool_id=pool.id, work_queue_id=queue, flow_run=flow_run)]
        )

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: BaseJobConfiguration, grace_seconds: int = 30
    ) -> None:
        # A run shares this process; Prefect's cancellation marks it cancelled and the engine stops it at
        # its next state transition. The process itself (and the other runs' models) stay up.
        return None


async def _wake_on_scheduled_runs(worker: InProcessWorker, pool: str) -> None:
    """Claim runs the moment they are scheduled (Prefect events), not at the next poll.

    Polling stays on as the fallback (every few seconds); each poll of a pool is also a database write
    on the server, so polling fast instead would load the server for every idle second. The event
    stream does not apply related-resource filters (Prefect 3.9 matches every event against them), so
    the pool is checked here: another pool's runs cost this worker nothing, and the server nothing.
    """
    while True:
        try:
            async with get_client() as client:
                pool_resource = f"prefect.work-pool.{(await client.read_work_pool(pool)).id}"
            flt = EventFilter(event=EventNameFilter(name=["prefect.flow-run.Scheduled"]))
            async with get_events_subscriber(filter=flt) as events, anyio.create_task_group() as tg:
                async for event in events:
                    if any(r.id == pool_resource for r in event.related):
                        run_id = UUID(event.resource.id.removeprefix("prefect.flow-run."))
                        tg.start_soon(_claim, worker, run_id)
        except Exception as exc:  # server restarting, pool not created yet: retry
            log.debug("event subscription for pool %s: %s; retrying", pool, exc)
            await anyio.sleep(2)


async def _claim(worker: InProcessWorker, flow_run_id: UUID) -> None:
    try:
        await worker.claim(flow_run_id)
    except Exception as exc:  # the regular poll picks the run up
        log.warning("could not claim flow run %s from its event: %s", flow_run_id, exc)


def serve(
    pool: str,
    *,
    role: Role = "silo",
    name: str | None = None,
    query_seconds: float = 5.0,
    limit: int | None = None,
) -> None:
    """Serve ``pool`` until SIGTERM/SIGINT: runs start on their Scheduled event, polls are the fallback.

    ``role``: which of this installation's flows the worker runs (:func:`served_flows`)."""
    # SIGTERM (`silotune stack down`) stops the worker like Ctrl-C: the loops unwind, the worker deregisters.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    log_compute_budget(pool)
    worker = InProcessWorker(
        work_pool_name=pool,
        role=role,
        name=name or f"{pool}-{os.getpid()}",
        limit=limit,
        create_pool_if_not_found=True,
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_wake_on_scheduled_runs, worker, pool)
            await worker.start()
            tg.cancel_scope.cancel()

    with (
        temporary_settings({PREFECT_WORKER_QUERY_SECONDS: query_seconds}),
        contextlib.suppress(KeyboardInterrupt),
    ):
        anyio.run(main)


def compute_budget() -> dict[str, Any]:
    """What this worker's runs compute on: usable cores, co-located silo workers, threads, devices."""
    import torch  # seconds; the worker imports it with the flows at the first run anyway

    workers = colocated_workers()
    serialised = serialise_colocated(None, workers)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cores": usable_cores(),
        "colocated_workers": workers,
        "serialised": serialised,
        "threads": default_threads(workers=workers, serialised=serialised),
        "device": f"cuda:0 ({gpus[0]}; {len(gpus)} GPU(s))" if gpus else "cpu",
        "device_override": os.environ.get(DEVICE_ENV),
    }


def log_compute_budget(pool: str) -> None:
    """One log line: the threads and device this worker's runs use (train.* may still override them)."""
    b = compute_budget()
    turns = " taking turns" if b["serialised"] else ""
    override = f" (${DEVICE_ENV}={b['device_override']})" if b["device_override"] else ""
    # stderr, not the logger: the worker's log file gets it whatever logging is configured.
    print(
        f"pool {pool}: {b['cores']} usable core(s), {b['colocated_workers']} co-located silo worker(s)"
        f"{turns} -> {b['threads']} torch thread(s); device {b['device']}{override}",
        file=sys.stderr,
        flush=True,
    )


def ensure_silo_deployments(pool: str) -> list[str]:
    """Register ``silo-round|silo-evaluate|silo-step/<pool>`` if the coordinator has not (a new silo)."""
    from flows.silo import silo_evaluate, silo_round, silo_step  # imports torch (seconds)

    created = []
    with get_client(sync_client=True) as client:
        for fl in (silo_round, silo_evaluate, silo_step):
            try:
                client.read_deployment_by_name(f"{fl.name}/{pool}")
            except ObjectNotFound:
                fl.to_deployment(
                    name=pool,
                    work_pool_name=pool,
                    tags=["silotune", "silo"],
                    description=f"{fl.name} at the silo behind pool {pool} (registered by its worker).",
                    # as in deployments/prefect.yaml: the flow validates its parameters when it starts
                    enforce_parameter_schema=False,
                ).apply()
                created.append(f"{fl.name}/{pool}")
    return created
