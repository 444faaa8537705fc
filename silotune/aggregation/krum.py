"""Krum and multi-Krum.

Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017. With ``n`` updates of which
at most ``f`` are Byzantine, each update is scored by the sum of squared L2
distances to its ``n - f - 2`` nearest other updates; Krum returns the update
with the lowest score, multi-Krum the example-weighted mean of the ``m`` lowest.
The guarantee needs ``n >= 2f + 3`` (so that the ``n - f - 2`` neighbours of an
honest update include at least one more honest update than there are Byzantine
ones), and updates with fewer silos are refused.

Distances are taken over the flattened concatenation of all tensors, i.e. the
squared distances of the individual tensors are summed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from silotune.aggregation.base import AGGREGATORS, ClientUpdate, TensorDict, example_weights


def _check_count(option: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")
    return value


def pairwise_sq_distances(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """``(n, n)`` float64 matrix of squared L2 distances between the concatenated deltas.

    Accumulated tensor by tensor (in sorted key order, so the result does not
    depend on the dicts' insertion order) instead of over one concatenated
    vector: only one tensor's worth of float64 copies is alive at a time. The
    difference form ``|a - b|^2`` is used rather than ``|a|^2 + |b|^2 - 2ab``,
    which cancels catastrophically for nearby updates.
    """
    n = len(updates)
    device = next((t.device for t in updates[0].delta.values()), torch.device("cpu"))
    dist = torch.zeros((n, n), dtype=torch.float64, device=device)
    for key in sorted(updates[0].delta):
        rows = torch.stack([u.delta[key].to(device=device, dtype=torch.float64).reshape(-1) for u in updates])
        for i in range(n):
            dist[i] += (rows - rows[i]).square().sum(dim=1)
    return dist


def krum_scores(dist: torch.Tensor, num_byzantine: int) -> list[float]:
    """Krum score of every update: sum of squared distances to its ``n - f - 2`` nearest others."""
    n = dist.shape[0]
    neighbours = n - num_byzantine - 2
    scores = []
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]]).sort().values[:neighbours]
        # fsum over the sorted distances: the score does not depend on the silos' order.
        scores.append(math.fsum(others.tolist()))
    return scores


def krum_select(updates: Sequence[ClientUpdate], *, num_byzantine: int, num_selected: int) -> list[int]:
    """Indices of the ``num_selected`` updates with the lowest Krum scores, best first.

    The scores are computed over the updates sorted by silo name and ties are
    broken by silo name, so the selection does not depend, not even in the last
    bit of a score, on the order in which the updates arrived.
    """
    n = len(updates)
    if n < 2 * num_byzantine + 3:
        raise ValueError(
            f"Krum with num_byzantine={num_byzantine} needs at least 2*f+3 = {2 * num_byzantine + 3} "
            f"updates (each update is scored on its n-f-2 nearest neighbours, which must outnumber "
            f"the f Byzantine ones), got {n}"
        )
    if num_selected > n - num_byzantine:
        raise ValueError(
            f"num_selected={num_selected} exceeds n - num_byzantine = {n - num_byzantine} for {n} updates; "
            "selecting more would include a Byzantine update whenever f of them are present"
        )
    canonical = sorted(range(n), key=lambda i: updates[i].silo)
    scores = krum_scores(pairwise_sq_distances([updates[i] for i in canonical]), num_byzantine)
    best = sorted(range(n), key=lambda c: (scores[c], updates[canonical[c]].silo))
    return [canonical[c] for c in best[:num_selected]]


def weighted_mean(updates: Sequence[ClientUpdate], like: ClientUpdate) -> TensorDict:
    """Example-weighted mean in float64, cast to the dtypes of ``like``'s tensors."""
    weights = example_weights(updates)
    out: TensorDict = {}
    for key, ref in like.delta.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for w, u in zip(weights, updates, strict=True):
            acc += w * u.delta[key].to(device=ref.device, dtype=torch.float64)
        out[key] = acc.to(ref.dtype)
    return out


@AGGREGATORS.register("krum")
class Krum:
    """Krum (``num_selected=1``) or multi-Krum (``num_selected=m``).

    ``num_byzantine`` (f) has no default: the rule's guarantee is stated for a
    given f, and f also sets the minimum number of silos (2f + 3).
    """

    name = "krum"
    needs_plaintext: ClassVar[bool] = True
    plaintext_reason: ClassVar[str] = (
        "Krum scores each update by its distances to the others, so it must see each update in the clear"
    )

    def __init__(self, *, num_byzantine: int, num_selected: int = 1) -> None:
        self.num_byzantine = _check_count("num_byzantine", num_byzantine, minimum=0)
        self.num_selected = _check_count("num_selected", num_selected, minimum=1)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        chosen = krum_select(updates, num_byzantine=self.num_byzantine, num_selected=self.num_selected)
        return weighted_mean([updates[i] for i in chosen], like=updates[0])


@AGGREGATORS.register("multi_krum")
class MultiKrum:
    """Multi-Krum: example-weighted mean of the ``num_selected`` best-scored updates.

    ``num_selected=None`` selects ``n - num_byzantine`` updates, the most that
    can be selected while leaving room for every Byzantine update to be dropped.
    """

    name = "multi_krum"
    needs_plaintext: ClassVar[bool] = True
    plaintext_reason: ClassVar[str] = (
        "multi-Krum scores each update by its distances to the others, so it must see each update "
        "in the clear"
    )

    def __init__(self, *, num_byzantine: int, num_selected: int | None = None) -> None:
        self.num_byzantine = _check_count("num_byzantine", num_byzantine, minimum=0)
        self.num_selected = (
            None if num_selected is None else _check_count("num_selected", num_selected, minimum=1)
        )

    def aggregate(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        m = len(updates) - self.num_byzantine if self.num_selected is None else self.num_selected
        chosen = krum_select(updates, num_byzantine=self.num_byzantine, num_selected=max(m, 1))
        return weighted_mean([updates[i] for i in chosen], like=updates[0])
