"""Norm-bounded averaging (norm clipping before FedAvg).

Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated
Learning?", arXiv:1911.07963, 2019. Every delta is scaled down so that its
global L2 norm (over all tensors together) is at most a bound ``M``:
``delta_k * min(1, M / ||delta_k||)``; the clipped deltas are then averaged,
weighted by example count. With ``max_norm=None`` the bound is the median of the
round's update norms, so an honest majority sets it.

A zero delta is left as it is (no division by its zero norm). Clipping caps how
far one silo can move the mean, whatever example count it claims: by at most the
bound. It does not remove a Byzantine update, so the combined delta is only
*close* to the honest mean, not equal to it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from silotune.aggregation.base import AGGREGATORS, ClientUpdate, TensorDict, example_weights


def global_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors of ``delta`` flattened and concatenated, computed in float64.

    Keys are visited in sorted order so the value does not depend on the dict's insertion order.
    """
    total = math.fsum(float(delta[k].to(torch.float64).square().sum()) for k in sorted(delta))
    return math.sqrt(total)


def clip_factor(norm: float, bound: float) -> float:
    """``min(1, bound / norm)``; 1 for a zero norm, which needs no clipping."""
    if norm <= bound:
        return 1.0
    return bound / norm


@AGGREGATORS.register("norm_bounded")
class NormBounded:
    """Clip each delta's global L2 norm to ``max_norm`` (default: the median norm), then FedAvg."""

    name = "norm_bounded"
    needs_plaintext: ClassVar[bool] = True
    plaintext_reason: ClassVar[str] = (
        "norm-bounded averaging measures each update's norm at the coordinator; under encryption "
        "clip at the silo instead (client-side clipping)"
    )

    def __init__(self, *, max_norm: float | None = None) -> None:
        if max_norm is not None and (
            isinstance(max_norm, bool)
            or not isinstance(max_norm, int | float)
            or not math.isfinite(max_norm)
            or max_norm <= 0
        ):
            raise ValueError(f"max_norm must be a finite number > 0 or None (median norm), got {max_norm!r}")
        self.max_norm = None if max_norm is None else float(max_norm)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        reference = updates[0]
        # A fixed (silo-name) order makes the float64 sum independent of arrival order.
        ordered = sorted(updates, key=lambda u: u.silo)
        norms = [global_norm(u.delta) for u in ordered]
        bound = statistics.median(norms) if self.max_norm is None else self.max_norm
        weights = example_weights(ordered)
        factors = [w * clip_factor(norm, bound) for w, norm in zip(weights, norms, strict=True)]
        out: TensorDict = {}
        for key, ref in reference.delta.items():
            acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            for factor, u in zip(factors, ordered, strict=True):
                acc += factor * u.delta[key].to(device=ref.device, dtype=torch.float64)
            out[key] = acc.to(ref.dtype)
        return out
