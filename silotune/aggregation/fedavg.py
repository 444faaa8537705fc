"""Federated averaging (FedAvg).

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017. Each silo's delta is weighted by its number
of training examples: delta = sum_k (n_k / n) * delta_k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from silotune.aggregation.base import AGGREGATORS, ClientUpdate, TensorDict, example_weights


@AGGREGATORS.register("fedavg")
class FedAvg:
    """Example-weighted mean of the silos' deltas.

    Accumulates in float64 so the result does not depend on the order of the
    silos beyond float64 rounding, then casts back to each tensor's dtype.
    """

    name = "fedavg"

    def __init__(self, *, weighted: bool = True) -> None:
        self.weighted = weighted

    def aggregate(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        if self.weighted:
            weights = example_weights(updates)
        else:
            weights = [1.0 / len(updates)] * len(updates)
        out: TensorDict = {}
        for key, ref in updates[0].delta.items():
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for w, u in zip(weights, updates, strict=True):
                acc += w * u.delta[key].to(torch.float64)
            out[key] = acc.to(ref.dtype)
        return out
