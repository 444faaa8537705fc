"""Coordinate-wise trimmed mean.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018. For every coordinate, the
``floor(trim_ratio * n)`` largest and as many smallest values over the ``n``
silos are dropped and the rest are averaged. ``trim_ratio`` is the paper's
beta and must lie in [0, 0.5), so at least one value always remains; it should
be at least the fraction of Byzantine silos.

Example counts are ignored on purpose: a Byzantine silo can claim any
``num_examples``, and weighting by it would let that silo dominate the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from silotune.aggregation.base import AGGREGATORS, ClientUpdate, TensorDict

# trim_ratio * n is computed in binary floating point: 0.29 * 100 is 28.999999999999996.
# The slack makes the trim count what a reader of the config expects (29), and is far
# smaller than 1 / n for any realistic number of silos.
_TRIM_SLACK = 1e-9


def trim_count(trim_ratio: float, n: int) -> int:
    """Number of values dropped from *each* end of every coordinate for ``n`` silos."""
    return math.floor(trim_ratio * n + _TRIM_SLACK)


def coordinate_trimmed_mean(values: torch.Tensor, trim: int) -> torch.Tensor:
    """Mean over dim 0 of ``values`` after dropping the ``trim`` largest and ``trim`` smallest."""
    n = values.shape[0]
    if 2 * trim >= n:
        raise ValueError(f"trimming {trim} from each end of {n} values leaves nothing to average")
    ordered = values.sort(dim=0).values
    return ordered[trim : n - trim].sum(dim=0) / (n - 2 * trim)


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean:
    """Coordinate-wise trimmed mean of the silos' deltas (unweighted), computed in float64."""

    name = "trimmed_mean"
    needs_plaintext: ClassVar[bool] = True
    plaintext_reason: ClassVar[str] = (
        "the trimmed mean sorts every coordinate across silos to drop the extremes, so it must see "
        "each update in the clear"
    )

    def __init__(self, *, trim_ratio: float = 0.1) -> None:
        if isinstance(trim_ratio, bool) or not isinstance(trim_ratio, int | float):
            raise ValueError(f"trim_ratio must be a number in [0, 0.5), got {trim_ratio!r}")
        if not 0.0 <= trim_ratio < 0.5:
            raise ValueError(
                f"trim_ratio must be in [0, 0.5) (it is trimmed from each end, so 0.5 would "
                f"trim everything), got {trim_ratio!r}"
            )
        self.trim_ratio = float(trim_ratio)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        trim = trim_count(self.trim_ratio, len(updates))
        out: TensorDict = {}
        for key, ref in updates[0].delta.items():
            stacked = torch.stack([u.delta[key].to(device=ref.device, dtype=torch.float64) for u in updates])
            out[key] = coordinate_trimmed_mean(stacked, trim).to(ref.dtype)
        return out
