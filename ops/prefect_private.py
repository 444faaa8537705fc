"""Every use of Prefect's private API in silotune, in one place.

silotune's in-process worker (:mod:`ops.worker`) is a ``prefect.workers.base.BaseWorker`` that skips
the infrastructure step of a run submission (it starts no process). That needs members of
``BaseWorker`` that are not Prefect's public API. They are used here and nowhere else:
:class:`FencedWorker` gives each one a public name, and ``ops/worker.py`` uses only those.
:data:`PRIVATE_MEMBERS` records each member with the signature it has in the Prefect version
``pyproject.toml`` pins; ``tests/unit/test_prefect_private.py`` fails when one disappears or
changes, and checks that no other module reaches them.

The public fallback, for every member below: Prefect's stock process worker. The pools are ordinary
``process`` pools, so ::

    SILOTUNE_SILO_POLICY=<state>/policies/<silo>.yaml prefect worker start --pool silo-<silo> --type process

(with the stack's worker environment, :func:`ops.stack.worker_env`; :func:`ops.stack.start_worker`
with ``stock=True`` does it) serves a silo's pool through Prefect's public API only. Each run then
starts a Python process of its own (imports, model load: 15-20 s more per run) instead of running in
the worker's, and the silo's policy reaches the run through ``SILOTUNE_SILO_POLICY``
(:func:`tasks.runtime.admit`). ``tests/integration/test_stack.py`` runs a round that way.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar
from uuid import UUID

from prefect.client.schemas.objects import FlowRun, WorkPool
from prefect.client.schemas.responses import WorkerFlowRunResponse
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult

# What :class:`FencedWorker` uses, with its signature in Prefect 3.9.1 (None: an attribute that
# ``BaseWorker.__init__`` sets). ``tests/unit/test_prefect_private.py`` compares them with the
# installed Prefect; after an upgrade, read each member's new code before recording its signature.
PRIVATE_MEMBERS: dict[str, str | None] = {
    # Overridden: the worker calls it for each run it submits (from _submit_scheduled_flow_runs).
    "_submit_run": "(self, flow_run: \"'FlowRun'\") -> 'None'",
    "_propose_pending_state": "(self, flow_run: \"'FlowRun'\") -> 'bool'",
    "_propose_crashed_state": (
        "(self, flow_run: \"'FlowRun'\", message: 'str', client: 'PrefectClient | None' = None) -> 'None'"
    ),
    "_release_limit_slot": "(self, flow_run_id: 'UUID') -> 'None'",
    "_submit_scheduled_flow_runs": (
        "(self, flow_run_response: \"list['WorkerFlowRunResponse']\") -> \"list['FlowRun']\""
    ),
    # The registry key of a worker class (prefect.utilities.dispatch): by default its ``type``.
    "__dispatch_key__": "() -> 'str | None'",
    "_runs_task_group": None,
    "_submitting_flow_run_ids": None,
    "_cancelling_observer": None,
    "_has_successfully_synced": None,
    "_work_pool": None,
    "_work_queues": None,
}
# The cancellation observer's (prefect._internal.observers.FlowRunCancellingObserver), which the
# worker's _submit_run must tell when a submission ends.
OBSERVER_MEMBERS: dict[str, str] = {
    "remove_in_flight_flow_run_id": "(self, flow_run_id: 'uuid.UUID')",
}


class FencedWorker(BaseWorker[BaseJobConfiguration, BaseVariables, BaseWorkerResult], abc.ABC):
    """A ``BaseWorker`` whose subclasses reach Prefect's private members only through public names.

    A subclass implements :meth:`submit_run` (what ``BaseWorker._submit_run`` would do: claim the run
    and start it) and :meth:`run`, and sets :attr:`registry_key`. Each method names the private member
    it uses; the fallback for all of them is the stock process worker (see the module docstring).
    """

    # The key the subclass is registered under in Prefect's worker-type registry.
    registry_key: ClassVar[str | None] = None

    @classmethod
    def __dispatch_key__(cls) -> str | None:
        # Private: Prefect registers every BaseWorker subclass under this key, by default its `type`.
        # A subclass serving "process" pools would replace Prefect's ProcessWorker in the registry.
        # Fallback: the stock process worker is that ProcessWorker.
        return cls.registry_key

    @abc.abstractmethod
    async def submit_run(self, flow_run: FlowRun) -> None:
        """Claim and start ``flow_run``; call :meth:`submission_done` when the submission is over."""

    async def _submit_run(self, flow_run: FlowRun) -> None:
        # Private override: BaseWorker._submit_scheduled_flow_runs starts it for each run it submits,
        # after taking a limit slot and marking the run as being submitted. Fallback: the stock
        # process worker's own _submit_run (prepares infrastructure, then starts a process).
        await self.submit_run(flow_run)

    async def propose_pending(self, flow_run: FlowRun) -> bool:
        """Claim the run (propose Pending); False if the server says no."""
        # Private: BaseWorker._propose_pending_state. Fallback: the stock process worker claims runs.
        return await self._propose_pending_state(flow_run)

    async def propose_crashed(self, flow_run: FlowRun, message: str) -> None:
        """Report the run as crashed (its engine failed before it could report anything)."""
        # Private: BaseWorker._propose_crashed_state. Fallback: the stock worker reports its crashes.
        await self._propose_crashed_state(flow_run, message)

    def release_slot(self, flow_run_id: UUID) -> None:
        """Give back the limit slot the submission took (safe to call twice)."""
        # Private: BaseWorker._release_limit_slot. Fallback: the stock worker releases its slots.
        self._release_limit_slot(flow_run_id)

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the worker's task group of runs (cancelled when the worker stops)."""
        # Private: BaseWorker._runs_task_group (created by setup()). Fallback: the stock worker.
        assert self._runs_task_group is not None, "the worker is not started"
        self._runs_task_group.start_soon(fn, *args)

    def submission_done(self, flow_run_id: UUID) -> None:
        """End a submission: the run is no longer being submitted nor watched as in flight for it."""
        # Private: BaseWorker._submitting_flow_run_ids and _cancelling_observer (a
        # prefect._internal.observers.FlowRunCancellingObserver), as BaseWorker._submit_run ends.
        # Fallback: the stock worker's _submit_run does this itself.
        self._submitting_flow_run_ids.discard(flow_run_id)
        if self._cancelling_observer is not None:
            self._cancelling_observer.remove_in_flight_flow_run_id(flow_run_id)

    def synced_pool(self) -> WorkPool | None:
        """The work pool, once the worker has synced with the server; None before."""
        # Private: BaseWorker._has_successfully_synced and _work_pool (the public `work_pool` raises
        # before the first sync). Fallback: the stock worker polls its pool.
        return self._work_pool if self._has_successfully_synced else None

    def queue_names(self) -> set[str]:
        """The work queues the worker was told to serve (empty: all of the pool's)."""
        # Private: BaseWorker._work_queues. Fallback: `prefect worker start --work-queue`.
        return set(self._work_queues)

    async def submit_scheduled(self, runs: list[WorkerFlowRunResponse]) -> list[FlowRun]:
        """Submit these scheduled runs exactly as a poll of the pool would (limits, duplicates)."""
        # Private: BaseWorker._submit_scheduled_flow_runs. Fallback: the stock worker's poll.
        return await self._submit_scheduled_flow_runs(runs)
