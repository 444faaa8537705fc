"""The silo-runner seam: how the coordinator gets work done at each silo.

The coordinator flow only talks to a ``SiloRunner``. The embedded runner calls
the silo flows as subflows in this process (several at once where the cores allow). The
work-pool runner (``orchestration.mode: workpools``, the real stack) submits the
same flows as runs of each silo's deployments (``silo-round/<pool>``,
``silo-evaluate/<pool>``), all silos at once, and waits for them; the
coordinator flow does not change.

A round is one wave of ``silo-round`` runs: each silo evaluates the global adapter it receives
(the previous round's output) and trains from it. Both runners read a wave's outcome the same
way (:func:`wave_outcome`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.context import FlowRunContext
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.exceptions import MissingContextError
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Crashed, Scheduled
from prefect.utilities.asyncutils import run_coro_as_sync

from flows.api_client import busy_retry_settings
from flows.silo import silo_evaluate, silo_round, silo_step
from silotune.config import FederationConfig
from silotune.records import (
    EvalRecord,
    ObjectRef,
    SiloFailure,
    SiloRoundResult,
    UpdateRecord,
)
from silotune.results import ResultError
from tasks.results import read_record, read_results

log = logging.getLogger(__name__)


class Wave(NamedTuple):
    """A round's silo runs: the updates of round r, and the evaluations of round r-1's output."""

    updates: list[UpdateRecord]
    failures: list[SiloFailure]
    evals: list[EvalRecord]
    eval_failures: list[SiloFailure]


class SiloRunner(Protocol):
    def run_round(
        self,
        config: FederationConfig,
        round_: int,
        global_ref: ObjectRef,
        *,
        evaluate: bool,
        reuse: str | None = None,
        silos: list[str] | None = None,
    ) -> Wave: ...

    def evaluate(
        self, config: FederationConfig, round_: int, global_ref: ObjectRef, *, reuse: str | None = None
    ) -> tuple[list[EvalRecord], list[SiloFailure]]: ...

    def step(
        self,
        config: FederationConfig,
        stage: str,
        round_: int,
        *,
        silos: list[str] | None = None,
        global_ref: ObjectRef | None = None,
        run_id: str | None = None,
    ) -> tuple[dict[str, Any], list[SiloFailure]]: ...


class Outcome(NamedTuple):
    """A silo run's final state and what it reported: its signed result record (``silo-round`` writes
    one even when training fails, with its evaluation), or the exception that says why there is none."""

    state: Any
    value: Any


def read_outcome(
    config: FederationConfig, flow_name: str, stage: str, silo: str, round_: int, state: Any
) -> Outcome:
    """One run's record from the silo's results prefix, never through Prefect's result store.

    The record must be the one this run wrote (its ``run_id``): a record left by an earlier run of
    the same step is not taken for this run's. A refused or crashed run writes none: its state's
    message says why. A store that cannot be reached raises StoreUnavailable (:func:`read_outcomes`
    retries it).
    """
    stage = _record_stage(flow_name, stage)
    return _outcome(silo, stage, state, read_record(config, flow_name, stage, silo, round_))


def read_outcomes(
    config: FederationConfig, flow_name: str, stage: str, round_: int, states: dict[str, Any]
) -> dict[str, Outcome]:
    """:func:`read_outcome` of each run (by silo), the records read in one task
    (``tasks.results.read_results``), retried while the coordinator cannot reach the store: an outage
    on the coordinator's side is not a failure of every silo.
    """
    stage = _record_stage(flow_name, stage)
    records = read_results(config, flow_name, stage, round_, list(states)) if states else {}
    return {silo: _outcome(silo, stage, state, records[silo]) for silo, state in states.items()}


def _record_stage(flow_name: str, stage: str) -> str:
    """The stage that names the flow's record in the silo's results prefix."""
    return {"silo-round": "round", "silo-evaluate": "evaluate"}.get(flow_name, stage)


def _outcome(silo: str, stage: str, state: Any, record: Any) -> Outcome:
    if isinstance(record, str):  # no record this run could be credited with: why
        if not state.is_completed() and (state.message or ""):
            return Outcome(state, RuntimeError(state.message))
        return Outcome(state, ResultError(record))
    run_id = getattr(getattr(state, "state_details", None), "flow_run_id", None)
    if run_id is not None and getattr(record, "run_id", None) not in (None, str(run_id)):
        if not state.is_completed() and (state.message or ""):
            return Outcome(state, RuntimeError(state.message))
        return Outcome(state, ResultError(f"silo {silo!r}: {stage} record was written by another run"))
    return Outcome(state, record)


def _error(out: Outcome) -> str:
    if isinstance(out.value, BaseException):
        return f"{type(out.value).__name__}: {out.value}"
    return getattr(out.state, "message", None) or str(out.state)


def step_results(
    outcomes: dict[str, Outcome], round_: int, stage: str
) -> tuple[dict[str, Any], list[SiloFailure]]:
    """Results of the completed runs by silo; a failure for every other run."""
    results: dict[str, Any] = {}
    failures: list[SiloFailure] = []
    for silo, out in outcomes.items():
        if out.state.is_completed() and not isinstance(out.value, BaseException):
            results[silo] = out.value
        else:
            failures.append(SiloFailure(silo=silo, round=round_, stage=stage, error=_error(out)))
    return results, failures


def wave_outcome(
    outcomes: dict[str, Outcome], round_: int, *, evaluate: bool, lost: list[SiloFailure] | None = None
) -> Wave:
    """Read a wave of ``silo-round`` runs (by silo) into updates and evaluations.

    A run that failed in training still returns its :class:`SiloRoundResult`, so its evaluation
    counts; a run that crashed, was lost or whose result cannot be read fails both stages.
    """
    wave = Wave([], [], [], [])
    for f in lost or []:
        wave.failures.append(f)
        if evaluate:
            wave.eval_failures.append(f.model_copy(update={"round": round_ - 1, "stage": "evaluate"}))
    for silo, out in outcomes.items():
        value = out.value
        if not isinstance(value, SiloRoundResult):
            error = _error(out)
            value = SiloRoundResult(
                silo=silo, round=round_, train_error=error, eval_error=error if evaluate else None
            )
        if value.update is not None and out.state.is_completed():
            wave.updates.append(value.update)
        else:
            error = value.train_error or _error(out)
            wave.failures.append(SiloFailure(silo=silo, round=round_, stage="train", error=error))
        if value.evaluation is not None:
            wave.evals.append(value.evaluation)
        elif value.eval_error is not None:
            wave.eval_failures.append(
                SiloFailure(silo=silo, round=round_ - 1, stage="evaluate", error=value.eval_error)
            )
    for f in wave.failures:
        _logger().warning("round %d: silo %s failed (%s): %s", round_ + 1, f.silo, f.stage, f.error)
    for f in wave.eval_failures:
        _logger().warning("round %d: silo %s could not evaluate: %s", round_ + 1, f.silo, f.error)
    return wave


def silo_workers(config: FederationConfig, silos: int) -> int:
    """How many co-located silos the embedded runner runs at once.

    ``orchestration.silo_workers`` when set; else the cores divided by each silo's torch threads
    (``train.torch_threads``, 1 when unset), and 1 on two cores or fewer, where threads only add
    contention (a 4-silo round of the tiny model on 2 busy cores: 15.4 s one at a time, 19.6 s with
    two workers).
    """
    if config.orchestration.silo_workers is not None:
        return max(1, min(config.orchestration.silo_workers, silos))
    cores = os.cpu_count() or 1
    if cores <= 2:
        return 1
    return max(1, min(silos, cores // (config.train.torch_threads or 1)))


def _subflows(
    config: FederationConfig,
    flow_name: str,
    stage: str,
    round_: int,
    silos: list[str],
    run: Callable[[str], Any],
) -> dict[str, Outcome]:
    """Run a silo flow as a subflow for each silo; read each one's record.

    With more than one worker (:func:`silo_workers`) the subflows run in threads, each in a copy of
    the coordinator's context (so each is still a child of its flow run); the silos' local training
    takes turns on the process's shared model (``tasks.runtime.TRAIN_LOCK``), their orchestration,
    signing, protection and uploads overlap. The outcomes come back in ``silos``' order.
    """
    workers = silo_workers(config, len(silos))
    with _no_heartbeats():
        if workers <= 1:
            states = {name: run(name) for name in silos}
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="silo") as pool:
                futures = {name: pool.submit(contextvars.copy_context().run, run, name) for name in silos}
                states = {name: futures[name].result() for name in silos}
    return read_outcomes(config, flow_name, stage, round_, states)


class InProcessRunner:
    """Silos as subflows of the coordinator flow (the embedded default).

    The subflows send no heartbeats of their own: they run in the coordinator's process and thread,
    whose run heartbeats for them, and a flow run's heartbeat thread, which sleeps in 1-s steps, is
    joined when the run ends: up to 1 s per silo and round for nothing.
    """

    def run_round(
        self,
        config: FederationConfig,
        round_: int,
        global_ref: ObjectRef,
        *,
        evaluate: bool,
        reuse: str | None = None,
        silos: list[str] | None = None,
    ) -> Wave:
        outcomes = _subflows(
            config,
            "silo-round",
            "train",
            round_,
            silos or [s.name for s in config.silos],
            lambda n: silo_round(config, n, round_, global_ref, evaluate, reuse, return_state=True),
        )
        return wave_outcome(outcomes, round_, evaluate=evaluate)

    def evaluate(
        self, config: FederationConfig, round_: int, global_ref: ObjectRef, *, reuse: str | None = None
    ) -> tuple[list[EvalRecord], list[SiloFailure]]:
        outcomes = _subflows(
            config,
            "silo-evaluate",
            "evaluate",
            round_,
            [s.name for s in config.silos],
            lambda n: silo_evaluate(config, n, round_, global_ref, reuse, return_state=True),
        )
        results, failures = step_results(outcomes, round_, "evaluate")
        return [r.evaluation for r in results.values() if r.evaluation is not None], failures

    def step(
        self,
        config: FederationConfig,
        stage: str,
        round_: int,
        *,
        silos: list[str] | None = None,
        global_ref: ObjectRef | None = None,
        run_id: str | None = None,
    ) -> tuple[dict[str, Any], list[SiloFailure]]:
        """Run a protocol step (``flows.silo.silo_step``) at each silo, or at ``silos``."""
        outcomes = _subflows(
            config,
            "silo-step",
            stage,
            round_,
            silos or [s.name for s in config.silos],
            lambda n: silo_step(config, n, stage, round_, global_ref, run_id, return_state=True),
        )
        results, failures = step_results(outcomes, round_, stage)
        for f in failures:
            log.warning("round %d: silo %s failed %s: %s", round_ + 1, f.silo, stage, f.error)
        return results, failures


class WorkPoolRunner:
    """Silos as flow runs on their own work pools, submitted together, awaited with timeouts.

    A run nobody picks up within ``orchestration.pickup_timeout_s`` (no worker on the pool) or that does
    not finish within ``orchestration.silo_timeout_s`` (worker killed mid-run, host gone) becomes a
    :class:`SiloFailure` and its run is marked crashed, so the round goes on with the quorum instead of
    hanging. Results come back as the silos' signed records in their own store prefixes
    (:mod:`silotune.results`), never through Prefect's result store; they are read once every run is final.
    """

    def __init__(self) -> None:
        self._deployments: dict[str, Any] = {}
        self._seconds: dict[str, float] = {}  # each silo's last run, Running to final

    def run_round(
        self,
        config: FederationConfig,
        round_: int,
        global_ref: ObjectRef,
        *,
        evaluate: bool,
        reuse: str | None = None,
        silos: list[str] | None = None,
    ) -> Wave:
        params = {"round_": round_, "global_ref": global_ref, "evaluate": evaluate, "reuse": reuse}
        outcomes, lost = self._wave("silo-round", "train", config, round_, params, silos=silos)
        return wave_outcome(outcomes, round_, evaluate=evaluate, lost=lost)

    def evaluate(
        self, config: FederationConfig, round_: int, global_ref: ObjectRef, *, reuse: str | None = None
    ) -> tuple[list[EvalRecord], list[SiloFailure]]:
        params = {"round_": round_, "global_ref": global_ref, "reuse": reuse}
        results, failures = self._run("silo-evaluate", "evaluate", config, round_, params)
        return [r.evaluation for r in results.values() if r.evaluation is not None], failures

    def step(
        self,
        config: FederationConfig,
        stage: str,
        round_: int,
        *,
        silos: list[str] | None = None,
        global_ref: ObjectRef | None = None,
        run_id: str | None = None,
    ) -> tuple[dict[str, Any], list[SiloFailure]]:
        """A protocol step (``flows.silo.silo_step``) as a run of ``silo-step/<pool>`` at each silo."""
        params = {"stage": stage, "round_": round_, "global_ref": global_ref, "run_id": run_id}
        return self._run("silo-step", stage, config, round_, params, silos=silos)

    def _run(
        self,
        flow_name: str,
        stage: str,
        config: FederationConfig,
        round_: int,
        params: dict[str, Any],
        *,
        silos: list[str] | None = None,
    ) -> tuple[dict[str, Any], list[SiloFailure]]:
        outcomes, failures = self._wave(flow_name, stage, config, round_, params, silos=silos)
        results, more = step_results(outcomes, round_, stage)
        for f in failures + more:
            _logger().warning("round %d: silo %s failed (%s): %s", round_ + 1, f.silo, f.stage, f.error)
        return results, failures + more

    def _wave(
        self,
        flow_name: str,
        stage: str,
        config: FederationConfig,
        round_: int,
        params: dict[str, Any],
        *,
        silos: list[str] | None = None,
    ) -> tuple[dict[str, Outcome], list[SiloFailure]]:
        """Create every silo's run on its pool, wait for them, read their results.

        Returns the outcomes by silo and the failures of runs that could not be created or were lost.
        The runs are created longest-running silo first (by its previous run): creations go one after
        another, so the silo that needs the most time gets the earliest start.

        The runs are tagged ``federation:<id>``, ``silo:<name>``, ``round:<n>`` rather than linked as
        subflows (the link is one more insert per silo), and named as the silo flow would name them
        (``clinic-round-3``), so the worker need not rename them. Creation is idempotent (the
        idempotency key names the coordinator's run, the flow, the stage and the round).
        """
        template = {f.name: f.flow_run_name for f in (silo_round, silo_evaluate, silo_step)}[flow_name]
        names = silos or [s.name for s in config.silos]
        parent = _current_flow_run_id()
        specs = {
            silo: {
                "deployment": f"{flow_name}/{config.silo(silo).pool}",
                "name": template.format(silo=silo, **params),
                "parameters": {"config": config, "silo": silo, **params},
                "tags": [f"federation:{config.federation_id}", f"silo:{silo}", f"round:{round_ + 1}"],
                "idempotency_key": f"{parent}:{flow_name}/{config.silo(silo).pool}:{stage}:{round_}",
            }
            for silo in sorted(names, key=lambda n: -self._seconds.get(n, 0.0))
        }
        waves = _Wave(specs, self._deployments, config, flow_name)
        run_coro_as_sync(waves.run())
        t0 = time.perf_counter()
        outcomes = read_outcomes(
            config, flow_name, stage, round_, {silo: out.state for silo, out in waves.outcomes.items()}
        )
        waves.read_s = time.perf_counter() - t0
        failures = [
            SiloFailure(silo=silo, round=round_, stage=stage, error=why) for silo, why in waves.lost.items()
        ]
        self._seconds.update(waves.seconds)
        logger = _logger()
        logger.info(
            "%s: %d run(s) created in %.2f s (%s), final after %.2f s, results read %.2f s later",
            flow_name,
            len(waves.runs),
            waves.created_s,
            ", ".join(f"{k}={v.id}" for k, v in waves.runs.items()),
            waves.final_s,
            waves.read_s,
        )
        # In the config's order, whatever the creation order: aggregation must not depend on timing.
        return {n: outcomes[n] for n in names if n in outcomes}, failures


# A wave's runs are created scheduled this far ahead (beyond the workers' claim horizon and their
# polls' prefetch), then released all at once; a run whose coordinator died before releasing it
# still starts then.
HOLD_S = 60.0


async def _subscribe(stack: contextlib.AsyncExitStack, flt: Any) -> Any:
    """An iterator over the filtered state events, or None (then the caller polls) if the server's
    event stream cannot be opened."""
    try:
        events = await stack.enter_async_context(get_events_subscriber(filter=flt))
    except Exception as exc:
        log.warning("no state events (%s: %s); polling", type(exc).__name__, exc)
        return None
    return events.__aiter__()


class _Wave:
    """One wave of silo runs on the stack, in one event loop and one API client.

    Creates the runs held (scheduled ``HOLD_S`` ahead), then releases them (rescheduled to now, one
    small write each): the silos' workers start on them only once every run exists. On SQLite a
    creation is a read-then-write transaction that fails and retries whenever another write lands in
    between, and a busy silo writes often (claim, states, task runs, logs): created while the first
    silos already run, the last run waited for seconds. Then waits for the runs' state events (a
    subscription to exactly these runs; a read every ``orchestration.poll_s`` as the fallback),
    enforces the pickup/finish timeouts and returns each run's final state (its record is read
    from the store afterwards).
    """

    def __init__(
        self,
        specs: dict[str, dict[str, Any]],
        deployments: dict[str, Any],
        config: FederationConfig,
        flow: str,
    ) -> None:
        self.specs, self.deployments, self.config, self.flow = specs, deployments, config, flow
        self.runs: dict[str, Any] = {}
        self.lost: dict[str, str] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.seconds: dict[str, float] = {}
        self.created_s = self.final_s = self.read_s = 0.0

    async def run(self) -> None:
        t0 = time.perf_counter()
        async with get_client(httpx_settings=busy_retry_settings()) as client:
            await self._create(client)
            self.created_s = time.perf_counter() - t0
            finals = await self._await_final(client)
            self.final_s = time.perf_counter() - t0 - self.created_s
            self.outcomes = {silo: Outcome(state, None) for silo, state in finals.items()}

    async def _create(self, client: Any) -> None:
        # One after another: on SQLite overlapping creations collide (busy, retried, but each
        # collision costs a round trip). A single run needs no holding back.
        hold = len(self.specs) > 1
        state = Scheduled(scheduled_time=datetime.now(UTC) + timedelta(seconds=HOLD_S)) if hold else None
        for silo, spec in self.specs.items():
            try:
                name = spec["deployment"]
                if name not in self.deployments:
                    self.deployments[name] = (await client.read_deployment_by_name(name)).id
                self.runs[silo] = await client.create_flow_run_from_deployment(
                    self.deployments[name],
                    parameters=spec["parameters"],
                    name=spec["name"],
                    state=state,
                    tags=spec["tags"],
                    idempotency_key=spec["idempotency_key"],
                )
            except Exception as exc:  # e.g. the silo's deployment is not registered
                self.lost[silo] = f"could not submit {spec['deployment']}: {type(exc).__name__}: {exc}"
        if not hold:
            return
        for silo, run in list(self.runs.items()):  # longest-running silo first, as created
            try:
                await client.set_flow_run_state(run.id, Scheduled(), force=True)
            except Exception as exc:
                self.lost[silo] = f"could not release {run.name}: {type(exc).__name__}: {exc}"
                del self.runs[silo]

    async def _await_final(self, client: Any) -> dict[str, Any]:
        """Wait until every run is final; return their final states by silo.

        Runs given up on (pickup or finish timeout) are marked Crashed, so that a late worker does not
        run them after the round moved on, and land in ``lost`` with the reason.
        """
        orch = self.config.orchestration
        pending = {fr.id: silo for silo, fr in self.runs.items()}
        reads: dict[str, Any] = {}
        if not pending:
            return reads
        start = time.monotonic()
        flt = EventFilter(
            event=EventNameFilter(prefix=["prefect.flow-run."]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{i}" for i in pending]),
        )
        async with contextlib.AsyncExitStack() as stack:
            it = await _subscribe(stack, flt)
            while pending:
                runs = await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending)))
                )
                waited = time.monotonic() - start
                for fr in runs:
                    silo = pending[fr.id]
                    state = fr.state
                    if state is not None and state.is_final():
                        reads[silo] = state
                        if fr.start_time is not None and fr.end_time is not None:
                            self.seconds[silo] = (fr.end_time - fr.start_time).total_seconds()
                        del pending[fr.id]
                        continue
                    pool = self.config.silo(silo).pool
                    reason = None
                    if (state is None or state.is_scheduled()) and waited > orch.pickup_timeout_s:
                        reason = (
                            f"no worker picked up {self.flow} on pool {pool!r} "
                            f"within {orch.pickup_timeout_s:.0f} s "
                            f"(is the silo's worker running? `silotune silo join {silo}`)"
                        )
                    elif waited > orch.silo_timeout_s:
                        reason = (
                            f"{self.flow} on pool {pool!r} did not finish within {orch.silo_timeout_s:.0f} s "
                            f"(state {state.name if state else '?'}: worker lost or silo too slow)"
                        )
                    if reason:
                        await client.set_flow_run_state(fr.id, Crashed(message=reason), force=True)
                        self.lost[silo] = reason
                        del pending[fr.id]
                if not pending:
                    break
                # Wake on the next state event of any pending run; read anyway every poll_s
                # (timeouts, or an event delivered before the state is readable).
                if it is None:  # no event stream (the server was away): poll
                    await asyncio.sleep(orch.poll_s)
                    continue
                try:
                    await asyncio.wait_for(it.__anext__(), timeout=orch.poll_s)
                except TimeoutError:
                    pass
                except StopAsyncIteration:  # the stream ended: poll from here on
                    it = None
                except Exception as exc:  # the stream broke (server restart): poll from here on
                    log.warning("state events lost (%s: %s); polling", type(exc).__name__, exc)
                    it = None
        return reads


@contextlib.contextmanager
def _no_heartbeats() -> Iterator[None]:
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _logger() -> Any:
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _current_flow_run_id() -> str:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else "no-parent"


def runner_for(config: FederationConfig) -> SiloRunner:
    if config.orchestration.mode == "workpools":
        return WorkPoolRunner()
    return InProcessRunner()
