"""The silo-runner seam: how the coordinator gets work done at each silo.

The coordinator flow only talks to a ``SiloRunner``. The embedded runner calls
the silo flows as subflows in this process, one silo after another. The
work-pool runner (``orchestration.mode: workpools``, the real stack) submits the
same flows as runs of each silo's deployments (``silo-round/<pool>``,
``silo-evaluate/<pool>``), all silos at once, and waits for them; the
coordinator flow does not change.

A round is one wave of ``silo-round`` runs: each silo evaluates the global adapter it receives
(the previous round's output) and trains from it. Both runners read a wave's outcome the same
way (:func:`wave_outcome`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, NamedTuple, Protocol

from silotune.config import FederationConfig
from silotune.federation import EvalRecord, ObjectRef, SiloFailure, SiloRoundResult, UpdateRecord

log = logging.getLogger(__name__)


class Wave(NamedTuple):
    """A round's silo runs: the updates of round r, and the evaluations of round r-1's output."""

    updates: list[UpdateRecord]
    failures: list[SiloFailure]
    evals: list[EvalRecord]
    eval_failures: list[SiloFailure]


class SiloRunner(Protocol):
    def run_round(
        self, config: FederationConfig, round_: int, global_ref: ObjectRef, *, evaluate: bool
    ) -> Wave: ...

    def evaluate(
        self, config: FederationConfig, round_: int, global_ref: ObjectRef
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


def _failure(silo: str, round_: int, stage: str, state: object) -> SiloFailure:
    message = getattr(state, "message", None) or str(state)
    try:
        state.result()  # type: ignore[attr-defined]
    except Exception as exc:  # the silo's own exception, with its message
        message = f"{type(exc).__name__}: {exc}"
    return SiloFailure(silo=silo, round=round_, stage=stage, error=message)


def wave_outcome(
    states: dict[str, Any], round_: int, *, evaluate: bool, lost: list[SiloFailure] | None = None
) -> Wave:
    """Read the final states of a wave of ``silo-round`` runs (by silo) into updates and evaluations.

    A run that failed in training still returns its :class:`SiloRoundResult`, so its evaluation
    counts; a run that crashed, was lost or whose result cannot be read fails both stages.
    """
    wave = Wave([], [], [], [])
    for f in lost or []:
        wave.failures.append(f)
        if evaluate:
            wave.eval_failures.append(f.model_copy(update={"round": round_ - 1, "stage": "evaluate"}))
    for silo, state in states.items():
        try:
            value = state.result(raise_on_failure=False)
        except Exception as exc:
            value = RuntimeError(f"result of silo-round unreadable: {type(exc).__name__}: {exc}")
        if not isinstance(value, SiloRoundResult):
            error = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else str(state)
            value = SiloRoundResult(
                silo=silo, round=round_, train_error=error, eval_error=error if evaluate else None
            )
        if value.update is not None and state.is_completed():
            wave.updates.append(value.update)
        else:
            error = value.train_error or state.message or str(state)
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


class InProcessRunner:
    """Silos as subflows of the coordinator flow (the embedded default)."""

    def run_round(
        self, config: FederationConfig, round_: int, global_ref: ObjectRef, *, evaluate: bool
    ) -> Wave:
        from flows.silo import silo_round

        states = {
            silo.name: silo_round(config, silo.name, round_, global_ref, evaluate, return_state=True)
            for silo in config.silos
        }
        return wave_outcome(states, round_, evaluate=evaluate)

    def evaluate(
        self, config: FederationConfig, round_: int, global_ref: ObjectRef
    ) -> tuple[list[EvalRecord], list[SiloFailure]]:
        from flows.silo import silo_evaluate

        records, failures = [], []
        for silo in config.silos:
            state = silo_evaluate(config, silo.name, round_, global_ref, return_state=True)
            if state.is_completed():
                rec = state.result()
                if rec is not None:
                    records.append(rec)
            else:
                failures.append(_failure(silo.name, round_, "evaluate", state))
        return records, failures

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
        from flows.silo import silo_step

        results: dict[str, Any] = {}
        failures: list[SiloFailure] = []
        for name in silos or [s.name for s in config.silos]:
            state = silo_step(config, name, stage, round_, global_ref, run_id, return_state=True)
            if state.is_completed():
                results[name] = state.result()
            else:
                failures.append(_failure(name, round_, stage, state))
                log.warning("round %d: silo %s failed %s: %s", round_ + 1, name, stage, failures[-1].error)
        return results, failures


class WorkPoolRunner:
    """Silos as flow runs on their own work pools, submitted concurrently, awaited with timeouts.

    A run nobody picks up within ``orchestration.pickup_timeout_s`` (no worker on the pool) or that does
    not finish within ``orchestration.silo_timeout_s`` (worker killed mid-run, host gone) becomes a
    :class:`SiloFailure` and its run is marked crashed, so the round goes on with the quorum instead of
    hanging. Results come back through Prefect's persisted results (the silo flows set
    ``persist_result=True``; the stack's result storage is an S3 bucket).
    """

    def __init__(self) -> None:
        self._deployments: dict[str, Any] = {}

    def run_round(
        self, config: FederationConfig, round_: int, global_ref: ObjectRef, *, evaluate: bool
    ) -> Wave:
        params = {"round_": round_, "global_ref": global_ref, "evaluate": evaluate}
        states, lost = self._final_states("silo-round", "train", config, round_, params)
        return wave_outcome(states, round_, evaluate=evaluate, lost=lost)

    def evaluate(
        self, config: FederationConfig, round_: int, global_ref: ObjectRef
    ) -> tuple[list[EvalRecord], list[SiloFailure]]:
        params = {"round_": round_, "global_ref": global_ref}
        results, failures = self._run("silo-evaluate", "evaluate", config, round_, params)
        return [r for r in results.values() if r is not None], failures

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
        final, failures = self._final_states(flow_name, stage, config, round_, params, silos=silos)
        t0 = time.perf_counter()
        results: dict[str, Any] = {}
        for name, state in final.items():
            if state.is_completed():
                try:
                    results[name] = state.result()
                    continue
                except Exception as exc:
                    failures.append(
                        SiloFailure(
                            silo=name,
                            round=round_,
                            stage=stage,
                            error=f"result of {flow_name} unreadable: {type(exc).__name__}: {exc}",
                        )
                    )
            else:
                failures.append(_failure(name, round_, stage, state))
        _logger().info("%s: results read in %.2f s", flow_name, time.perf_counter() - t0)
        for f in failures:
            _logger().warning("round %d: silo %s failed (%s): %s", round_ + 1, f.silo, f.stage, f.error)
        return results, failures

    def _final_states(
        self,
        flow_name: str,
        stage: str,
        config: FederationConfig,
        round_: int,
        params: dict[str, Any],
        *,
        silos: list[str] | None = None,
    ) -> tuple[dict[str, Any], list[SiloFailure]]:
        """Submit the runs, wait for them: (final states by silo, failures of runs never run or lost)."""
        from prefect.utilities.asyncutils import run_coro_as_sync

        names = silos or [s.name for s in config.silos]
        submitted, failures = self._submit(flow_name, stage, config, round_, params, names)
        final, lost = run_coro_as_sync(_await_final(submitted, config, flow_name))
        failures += [SiloFailure(silo=n, round=round_, stage=stage, error=why) for n, why in lost.items()]
        return {n: final[n] for n in names if n in final}, failures

    def _submit(
        self,
        flow_name: str,
        stage: str,
        config: FederationConfig,
        round_: int,
        params: dict[str, Any],
        names: list[str],
    ) -> tuple[dict[str, Any], list[SiloFailure]]:
        """Create every silo's run on its pool, then return (one API call per silo, tens of ms each).

        The runs are tagged ``federation:<id>``, ``silo:<name>``, ``round:<n>`` rather than linked as
        subflows: the link is one more insert per silo. On the stack's SQLite database inserts that
        overlap fail as busy (HTTP 503) and Prefect's client waits 2 s before retrying; a round would pay
        that several times. So creation is retried here within tens of milliseconds, under an
        idempotency key (a retry never makes a second run).
        """
        from prefect.utilities.asyncutils import run_coro_as_sync

        parent = _current_flow_run_id()
        specs = {
            silo: {
                "deployment": f"{flow_name}/{config.silo(silo).pool}",
                "parameters": {"config": config, "silo": silo, **params},
                "tags": [f"federation:{config.federation_id}", f"silo:{silo}", f"round:{round_ + 1}"],
                "idempotency_key": f"{parent}:{flow_name}/{config.silo(silo).pool}:{stage}:{round_}",
            }
            for silo in names
        }
        t0 = time.perf_counter()
        outcomes = run_coro_as_sync(_create_runs(specs, self._deployments))
        submitted: dict[str, Any] = {}
        failures: list[SiloFailure] = []
        for silo, out in outcomes.items():
            if isinstance(out, BaseException):  # e.g. the silo's deployment is not registered
                failures.append(
                    SiloFailure(
                        silo=silo,
                        round=round_,
                        stage=stage,
                        error=f"could not submit {specs[silo]['deployment']}: {type(out).__name__}: {out}",
                    )
                )
            else:
                submitted[silo] = out
        _logger().info(
            "%s: %d run(s) created in %.2f s: %s",
            flow_name,
            len(submitted),
            time.perf_counter() - t0,
            ", ".join(f"{k}={v.id}" for k, v in submitted.items()),
        )
        return submitted, failures


async def _create_runs(specs: dict[str, dict[str, Any]], cache: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    async with get_client() as client:

        async def one(spec: dict[str, Any]) -> Any:
            name = spec["deployment"]
            if name not in cache:
                cache[name] = (await client.read_deployment_by_name(name)).id
            delay = 0.02
            for attempt in range(40):
                try:
                    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
                        return await client.create_flow_run_from_deployment(
                            cache[name],
                            parameters=spec["parameters"],
                            tags=spec["tags"],
                            idempotency_key=spec["idempotency_key"],
                        )
                except PrefectHTTPStatusError as exc:
                    if exc.response.status_code not in (429, 503) or attempt == 39:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
            raise AssertionError("unreachable")

        # One after another: concurrent inserts collide in SQLite and take seconds to sort out.
        results: dict[str, Any] = {}
        for silo, spec in specs.items():
            try:
                results[silo] = await one(spec)
            except Exception as exc:
                results[silo] = exc
    return results


def _logger() -> Any:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _current_flow_run_id() -> str:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else "no-parent"


async def _await_final(
    submitted: dict[str, Any], config: FederationConfig, flow_name: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Wait until every run is final, woken by the runs' state events; enforce the pickup/finish timeouts.

    Returns the final states by silo, and the silos given up on with the reason (their runs are marked
    Crashed so that a late worker does not run them after the round moved on).
    """
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.states import Crashed

    orch = config.orchestration
    pending = {fr.id: name for name, fr in submitted.items()}
    final: dict[str, Any] = {}
    lost: dict[str, str] = {}
    if not pending:
        return final, lost
    start = time.monotonic()
    flt = EventFilter(
        event=EventNameFilter(prefix=["prefect.flow-run."]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{i}" for i in pending]),
    )
    async with get_client() as client, get_events_subscriber(filter=flt) as events:
        it = events.__aiter__()
        while pending:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending)))
            )
            waited = time.monotonic() - start
            for fr in runs:
                name = pending[fr.id]
                state = fr.state
                if state is not None and state.is_final():
                    final[name] = state
                    del pending[fr.id]
                    continue
                pool = config.silo(name).pool
                reason = None
                if (state is None or state.is_scheduled()) and waited > orch.pickup_timeout_s:
                    reason = (
                        f"no worker picked up {flow_name} on pool {pool!r} "
                        f"within {orch.pickup_timeout_s:.0f} s "
                        f"(is the silo's worker running? `silotune silo join {name}`)"
                    )
                elif waited > orch.silo_timeout_s:
                    reason = (
                        f"{flow_name} on pool {pool!r} did not finish within {orch.silo_timeout_s:.0f} s "
                        f"(state {state.name if state else '?'}: worker lost or silo too slow)"
                    )
                if reason:
                    await client.set_flow_run_state(fr.id, Crashed(message=reason), force=True)
                    lost[name] = reason
                    del pending[fr.id]
            if pending:
                # Wake on the next state event of any pending run; poll anyway every poll_s (timeouts,
                # or an event delivered before the state is readable).
                with contextlib.suppress(TimeoutError, StopAsyncIteration):
                    await asyncio.wait_for(it.__anext__(), timeout=orch.poll_s)
    return final, lost


def runner_for(config: FederationConfig) -> SiloRunner:
    if config.orchestration.mode == "workpools":
        return WorkPoolRunner()
    return InProcessRunner()
