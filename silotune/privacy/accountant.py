"""Privacy accounting: one ledger per silo per federation, built on Opacus's accountants.

The math lives in Opacus (``opacus.accountants``: Rényi DP of the sampled
Gaussian mechanism, Mironov et al. 2019; numerical composition of privacy loss
random variables, Gopi et al., NeurIPS 2021). This module only keeps the books:
which (noise multiplier, sample rate, steps) a silo has spent so far, across all
rounds, in a form that survives a checkpoint to an object store.

Rules the ledger enforces (design.md, "one privacy accountant per silo per
federation"): the history only grows, ε is always computed over the whole
history, and a ledger is bound to its silo, federation and accountant, so that a
checkpoint cannot be loaded into somebody else's books.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from silotune.errors import SilotuneError
from silotune.registry import Registry

ACCOUNTANTS: Registry[type[IAccountant]] = Registry("privacy accountant")
ACCOUNTANTS.register("rdp")(RDPAccountant)
ACCOUNTANTS.register("prv")(PRVAccountant)

STATE_VERSION = 1

# One entry of the history: (noise multiplier, sample rate, steps). Consecutive
# records with the same noise multiplier and sample rate are merged, as Opacus
# does, so one long run and the same run split into rounds give the same history.
HistoryEntry = tuple[float, float, int]


class LedgerStateError(SilotuneError, ValueError):
    """A ledger checkpoint is malformed or belongs to another silo, federation or accountant."""


def _check_delta(delta: float) -> None:
    if not (is_finite_positive(delta) and delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def is_finite_positive(value: object) -> bool:
    """True for a real number that is finite and > 0 (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    number = float(value)
    return math.isfinite(number) and number > 0


def _check_target(target_epsilon: float) -> None:
    if not is_finite_positive(target_epsilon):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")


def _check_step_args(*, noise_multiplier: float, sample_rate: float, steps: int) -> None:
    problems = []
    if not is_finite_positive(noise_multiplier):
        problems.append(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (is_finite_positive(sample_rate) and sample_rate <= 1.0):
        problems.append(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        problems.append(f"steps must be an integer >= 0, got {steps!r}")
    if problems:
        raise ValueError("; ".join(problems))


def _epsilon_of(accountant: str, history: list[HistoryEntry], delta: float) -> float:
    """ε of a history under the named accountant (0.0 for an empty history)."""
    if not history:
        return 0.0
    acc = ACCOUNTANTS.get(accountant)()
    # Opacus's own get_noise_multiplier sets ``history`` directly the same way;
    # calling ``step()`` once per step would cost O(steps) for the same result.
    acc.history = [tuple(entry) for entry in history]
    return float(acc.get_epsilon(delta=delta))


def _merged(history: list[HistoryEntry], entry: HistoryEntry) -> list[HistoryEntry]:
    out = list(history)
    sigma, q, steps = entry
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (sigma, q, out[-1][2] + steps)
    else:
        out.append(entry)
    return out


class PrivacyLedger:
    """The privacy spent by one silo in one federation, over every round so far.

    Each round adds the steps of the silo's DP-SGD run (sample-level DP) or one
    step per round in which the silo's update was sampled (client-level DP, see
    :mod:`silotune.privacy.client_dp`); :meth:`epsilon` composes them all.

    Example::

        ledger = PrivacyLedger(silo="hospital-a", federation_id="fed-1")
        if not ledger.would_exceed(target_epsilon=8.0, delta=1e-5,
                                   noise_multiplier=1.1, sample_rate=0.01, steps=500):
            ...  # train, then
            ledger.record(noise_multiplier=1.1, sample_rate=0.01, steps=500)
        store.put(key, ledger.to_json())
    """

    def __init__(self, *, silo: str, federation_id: str, accountant: str = "rdp") -> None:
        ACCOUNTANTS.get(accountant)  # unknown name: RegistryError listing the known ones
        for name, value in (("silo", silo), ("federation_id", federation_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        self.silo = silo
        self.federation_id = federation_id
        self.accountant = accountant
        self._history: list[HistoryEntry] = []

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(silo={self.silo!r}, federation_id={self.federation_id!r}, "
            f"accountant={self.accountant!r}, steps={self.steps})"
        )

    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the (noise multiplier, sample rate, steps) entries, oldest first."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(entry[2] for entry in self._history)

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Compose ``steps`` more steps of the sampled Gaussian mechanism into the ledger.

        Recording zero steps is allowed and changes nothing (a round the silo sat out).
        """
        _check_step_args(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        if steps == 0:
            return
        self._history = _merged(self._history, (float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, delta: float) -> float:
        """ε spent so far at this δ, over the whole history (0.0 before any step)."""
        _check_delta(delta)
        return _epsilon_of(self.accountant, self._history, delta)

    def remaining(self, *, target_epsilon: float, delta: float) -> float:
        """Budget left before ``target_epsilon`` is reached (0.0 once reached or passed)."""
        _check_target(target_epsilon)
        return max(0.0, target_epsilon - self.epsilon(delta))

    def would_exceed(
        self,
        *,
        target_epsilon: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> bool:
        """Whether recording these steps would take ε above ``target_epsilon``.

        Ask before a round: a silo whose next contribution would exceed its budget
        must sit the round out (it cannot take the privacy back afterwards).
        """
        _check_target(target_epsilon)
        _check_delta(delta)
        _check_step_args(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        history = self._history
        if steps:
            history = _merged(history, (float(noise_multiplier), float(sample_rate), int(steps)))
        return _epsilon_of(self.accountant, history, delta) > target_epsilon

    # -- checkpointing ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot; :meth:`load_state_dict` restores it exactly.

        Floats survive ``json.dumps``/``json.loads`` bit for bit (shortest repr),
        so a restored ledger computes the very same ε as an uninterrupted one.
        """
        return {
            "version": STATE_VERSION,
            "silo": self.silo,
            "federation_id": self.federation_id,
            "accountant": self.accountant,
            "history": [[sigma, q, steps] for sigma, q, steps in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this ledger's history with a checkpoint of the same silo, federation, accountant."""
        if not isinstance(state, Mapping):
            raise LedgerStateError(f"ledger state must be a mapping, got {type(state).__name__}")
        problems = []
        if state.get("version") != STATE_VERSION:
            problems.append(f"version {state.get('version')!r} != supported {STATE_VERSION}")
        for key in ("silo", "federation_id", "accountant"):
            if state.get(key) != getattr(self, key):
                problems.append(f"{key} {state.get(key)!r} != this ledger's {getattr(self, key)!r}")
        history: list[HistoryEntry] = []
        raw = state.get("history")
        if not isinstance(raw, list):
            problems.append(f"history must be a list, got {type(raw).__name__}")
        else:
            for i, entry in enumerate(raw):
                try:
                    sigma, q, steps = entry
                    _check_step_args(noise_multiplier=sigma, sample_rate=q, steps=steps)
                except (TypeError, ValueError) as exc:
                    problems.append(f"history[{i}] = {entry!r}: {exc}")
                    continue
                history.append((float(sigma), float(q), int(steps)))
        if problems:
            raise LedgerStateError(
                f"cannot load privacy ledger state for silo {self.silo!r}: " + "; ".join(problems)
            )
        self._history = history

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """Build a ledger from a checkpoint, taking silo, federation and accountant from it."""
        if not isinstance(state, Mapping):
            raise LedgerStateError(f"ledger state must be a mapping, got {type(state).__name__}")
        try:
            ledger = cls(
                silo=state.get("silo"),  # type: ignore[arg-type]
                federation_id=state.get("federation_id"),  # type: ignore[arg-type]
                accountant=state.get("accountant"),  # type: ignore[arg-type]
            )
        except (KeyError, ValueError) as exc:
            raise LedgerStateError(f"malformed privacy ledger state: {exc}") from None
        ledger.load_state_dict(state)
        return ledger

    def to_json(self) -> str:
        """:meth:`state_dict` as a JSON string."""
        return json.dumps(self.state_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PrivacyLedger:
        """Inverse of :meth:`to_json`."""
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LedgerStateError(f"privacy ledger state is not valid JSON: {exc}") from None
        return cls.from_state_dict(state)

    def copy(self) -> PrivacyLedger:
        return copy.deepcopy(self)


def compute_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier σ (to ``epsilon_tolerance``) that keeps ε ≤ ``target_epsilon``.

    For ``steps`` steps of the sampled Gaussian mechanism at ``sample_rate``, at
    this δ. A binary search over σ by Opacus's ``get_noise_multiplier``; the
    returned σ is on the safe side (its ε is at most ``target_epsilon``).

    Calibrate on public facts only (dataset size, batch size, planned steps),
    never by looking at accuracy on private data.
    """
    ACCOUNTANTS.get(accountant)
    _check_target(target_epsilon)
    _check_delta(delta)
    _check_step_args(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)
    if steps == 0:
        raise ValueError("steps must be >= 1 to calibrate a noise multiplier")
    with warnings.catch_warnings():
        # The search probes very large σ, where RDP's best order is the largest
        # default one and Opacus warns; the bound is still valid, only looser.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        try:
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
            )
        except ValueError as exc:
            raise ValueError(
                f"cannot reach epsilon={target_epsilon} at delta={delta} over {steps} steps "
                f"with sample_rate={sample_rate}: {exc}"
            ) from None
    return float(sigma)
