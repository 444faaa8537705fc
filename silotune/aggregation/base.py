"""What every aggregator sees and returns.

An aggregator combines the silos' *deltas* (local adapter minus the round's
global adapter) into one delta. It never sees the global adapter itself and
never applies anything: a server optimizer (``server_opt``) turns the combined
delta into the next global adapter. Keeping the two apart lets a robust rule
(median, Krum, ...) be combined with any server optimizer (plain, momentum, Adam).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from silotune.errors import UpdateError
from silotune.registry import Registry

TensorDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One silo's contribution to a round."""

    silo: str
    delta: Mapping[str, torch.Tensor]
    num_examples: int
    metadata: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Aggregator(Protocol):
    """Combines validated client deltas into one delta with the same keys and shapes."""

    name: str
    #: True when the rule must see every silo's update in the clear (it sorts, compares, measures
    #: or selects updates), so it cannot run on encrypted (CKKS) or masked (secure aggregation)
    #: updates; False when it only needs a weighted sum.
    needs_plaintext: bool
    #: One sentence saying why (or why not), quoted by config validation.
    plaintext_reason: str

    def aggregate(self, updates: Sequence[ClientUpdate]) -> TensorDict: ...


AGGREGATORS: Registry[type[Any]] = Registry("aggregator")


def build_aggregator(name: str, **options: Any) -> Aggregator:
    """Instantiate a registered aggregator; unknown options raise a TypeError naming them."""
    cls = AGGREGATORS.get(name)
    try:
        return cls(**options)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise TypeError(f"aggregator {name!r}: {exc}") from None


def plaintext_requirement(name: str) -> str | None:
    """Why aggregator ``name`` cannot run on encrypted or masked updates, or None if it can.

    Read from the class (``needs_plaintext``, ``plaintext_reason``), so a config
    validator can refuse "median + encryption" without building anything. A
    registered aggregator that does not declare ``needs_plaintext`` is treated
    as needing plaintext: failing closed is the safe default.
    """
    cls = AGGREGATORS.get(name)
    if not getattr(cls, "needs_plaintext", True):
        return None
    reason = getattr(cls, "plaintext_reason", "it does not declare that it works on sums alone")
    return f"aggregator {name!r} needs every silo's update in plaintext: {reason}"


def check_update(update: ClientUpdate, reference: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`UpdateError` unless ``update`` matches ``reference`` key for key.

    Checked: same key set, floating-point dtype, same shape, all values finite,
    a positive example count.
    """
    silo = update.silo
    if not isinstance(update.num_examples, int) or update.num_examples <= 0:
        raise UpdateError(silo, f"num_examples must be a positive integer, got {update.num_examples!r}")
    missing = sorted(set(reference) - set(update.delta))
    extra = sorted(set(update.delta) - set(reference))
    if missing:
        raise UpdateError(
            silo, f"missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    if extra:
        raise UpdateError(
            silo, f"unexpected tensors: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")
        )
    for key, ref in reference.items():
        t = update.delta[key]
        if not isinstance(t, torch.Tensor):
            raise UpdateError(silo, f"expected a tensor, got {type(t).__name__}", tensor=key)
        if not t.is_floating_point():
            raise UpdateError(silo, f"dtype {t.dtype} is not floating point", tensor=key)
        if tuple(t.shape) != tuple(ref.shape):
            raise UpdateError(silo, f"shape {tuple(t.shape)} != expected {tuple(ref.shape)}", tensor=key)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UpdateError(silo, f"{bad} non-finite value(s) (NaN/Inf)", tensor=key)


def check_updates(updates: Sequence[ClientUpdate]) -> None:
    """Validate a non-empty batch of updates against the first one's layout."""
    if not updates:
        raise ValueError("cannot aggregate an empty list of updates")
    seen: set[str] = set()
    for u in updates:
        if u.silo in seen:
            raise UpdateError(u.silo, "more than one update from this silo in one round")
        seen.add(u.silo)
    reference = updates[0].delta
    if not reference:
        raise UpdateError(updates[0].silo, "the update holds no tensors")
    for u in updates:
        check_update(u, reference)
        for key, ref in reference.items():
            if u.delta[key].dtype != ref.dtype:
                raise UpdateError(u.silo, f"dtype {u.delta[key].dtype} differs from {ref.dtype}", tensor=key)


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """Normalised FedAvg weights n_k / sum(n)."""
    total = math.fsum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def aggregate(aggregator: Aggregator, updates: Sequence[ClientUpdate]) -> TensorDict:
    """Validate ``updates`` and combine them with ``aggregator``."""
    check_updates(updates)
    out = aggregator.aggregate(updates)
    ref = updates[0].delta
    if set(out) != set(ref):
        raise RuntimeError(f"aggregator {aggregator.name!r} changed the key set")
    return out
