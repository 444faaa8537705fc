"""Federated averaging (FedAvg).

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017. Each silo's delta is weighted by its number
of training examples: delta = sum_k (n_k / n) * delta_k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from silotune.aggregation.base import AGGREGATORS, ClientUpdate, TensorDict, example_weights


@AGGREGATORS.register("fedavg")
class FedAvg:
    """Example-weighted mean of the silos' deltas.

    Accumulates in float64 so the result does not depend on the order of the
    silos beyond float64 rounding, then casts back to each tensor's dtype.
    """

    name = "fedavg"
    needs_plaintext: ClassVar[bool] = False
    plaintext_reason: ClassVar[str] = (
        "a weighted sum, which additively homomorphic encryption and secure-aggregation masking "
        "compute without revealing any single update"
    )

    def __init__(self, *, weighted: bool = True) -> None:
        self.weighted = weighted

    def aggregate(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        weights = example_weights(updates) if self.weighted else [1.0 / len(updates)] * len(updates)
        # A fixed summation order (by silo id) makes the result independent of arrival order.
        order = sorted(range(len(updates)), key=lambda i: updates[i].silo)
        out: TensorDict = {}
        for key, ref in updates[0].delta.items():
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for i in order:
                acc += weights[i] * updates[i].delta[key].to(torch.float64)
            out[key] = acc.to(ref.dtype)
        return out
