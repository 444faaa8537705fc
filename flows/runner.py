"""The silo-runner seam: how the coordinator gets work done at each silo.

The coordinator flow only talks to a ``SiloRunner``. The embedded runner calls
the silo flows as subflows in this process, one silo after another. A runner
for the real stack submits the same flows to each silo's work pool; the
coordinator flow does not change.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from silotune.config import FederationConfig
from silotune.federation import EvalRecord, ObjectRef, SiloFailure, UpdateRecord

log = logging.getLogger(__name__)


class SiloRunner(Protocol):
    def train(
        self, config: FederationConfig, round_: int, global_ref: ObjectRef
    ) -> tuple[list[UpdateRecord], list[SiloFailure]]: ...

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


class InProcessRunner:
    """Silos as subflows of the coordinator flow (the embedded default)."""

    def train(
        self, config: FederationConfig, round_: int, global_ref: ObjectRef
    ) -> tuple[list[UpdateRecord], list[SiloFailure]]:
        from flows.silo import silo_round

        records, failures = [], []
        for silo in config.silos:
            state = silo_round(config, silo.name, round_, global_ref, return_state=True)
            if state.is_completed():
                records.append(state.result())
            else:
                failures.append(_failure(silo.name, round_, "train", state))
                log.warning("round %d: silo %s failed: %s", round_ + 1, silo.name, failures[-1].error)
        return records, failures

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


def runner_for(config: FederationConfig) -> SiloRunner:
    return InProcessRunner()
