"""Coordinate-wise median.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018. Every coordinate of the combined
delta is the median of that coordinate over the silos; for an even number of
silos it is the mean of the two middle values.

Example counts are ignored on purpose: a Byzantine silo can claim any
``num_examples``, and weighting by it would let that silo move the median.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from silotune.aggregation.base import AGGREGATORS, ClientUpdate, TensorDict


def coordinate_median(values: torch.Tensor) -> torch.Tensor:
    """Median over dim 0 of ``values``; the two middle values are averaged when dim 0 is even.

    ``torch.median`` returns the lower of the two middle values, which biases
    the result towards the smaller one, so the median is taken from a sort.
    """
    n = values.shape[0]
    ordered = values.sort(dim=0).values
    if n % 2 == 1:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@AGGREGATORS.register("median")
class CoordinateMedian:
    """Coordinate-wise median of the silos' deltas (unweighted), computed in float64."""

    name = "median"
    needs_plaintext: ClassVar[bool] = True
    plaintext_reason: ClassVar[str] = (
        "the coordinate-wise median sorts every coordinate across silos, so it must see each update"
        " in the clear"
    )

    def __init__(self) -> None:
        pass

    def aggregate(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        out: TensorDict = {}
        for key, ref in updates[0].delta.items():
            stacked = torch.stack([u.delta[key].to(device=ref.device, dtype=torch.float64) for u in updates])
            out[key] = coordinate_median(stacked).to(ref.dtype)
        return out
