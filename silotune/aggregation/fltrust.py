"""FLTrust: trust bootstrapped from a small server-side root data set.

Cao, Fang, Liu and Gong, "FLTrust: Byzantine-robust Federated Learning via
Trust Bootstrapping", NDSS 2021. Each round the server computes its own *root
update* ``g0`` on a small clean data set. Each silo's delta ``g_k`` gets the
trust score ``TS_k = ReLU(cos(g_k, g0))``, is rescaled to the root's norm, and
the combined delta is the trust-weighted mean::

    g = sum_k TS_k * (||g0|| / ||g_k||) * g_k / sum_k TS_k

A zero delta (or a zero root) has no direction and gets trust 0; when every
trust score is 0 the combined delta is zero. Example counts are not used, as in
the paper.

The root update is data of the round, not configuration: call
:meth:`FLTrust.set_root_update` before each :func:`~silotune.aggregation.aggregate`.
It is consumed by the aggregation, so a stale root is never reused silently in
the next round; aggregating without one raises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from silotune.aggregation.base import AGGREGATORS, ClientUpdate, TensorDict


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Inner product of two deltas over all tensors, in float64 and sorted key order."""
    return math.fsum(
        float((a[k].to(torch.float64) * b[k].to(device=a[k].device, dtype=torch.float64)).sum())
        for k in sorted(a)
    )


def trust_scores(
    updates: Sequence[Mapping[str, torch.Tensor]], root: Mapping[str, torch.Tensor]
) -> tuple[list[float], list[float], float]:
    """``(trust scores, update norms, root norm)``; trust is ReLU of the cosine with the root."""
    root_norm = math.sqrt(_dot(root, root))
    scores: list[float] = []
    norms: list[float] = []
    for delta in updates:
        norm = math.sqrt(_dot(delta, delta))
        norms.append(norm)
        if norm == 0.0 or root_norm == 0.0:
            scores.append(0.0)
            continue
        cosine = _dot(delta, root) / (norm * root_norm)
        scores.append(max(0.0, min(1.0, cosine)))
    return scores, norms, root_norm


@AGGREGATORS.register("fltrust")
class FLTrust:
    """Trust-weighted mean of norm-equalised deltas; needs :meth:`set_root_update` every round."""

    name = "fltrust"
    needs_plaintext: ClassVar[bool] = True
    plaintext_reason: ClassVar[str] = (
        "FLTrust takes each update's cosine with the root update and rescales it, so it must see "
        "each update in the clear"
    )

    def __init__(self) -> None:
        self._root: dict[str, torch.Tensor] | None = None

    @property
    def has_root_update(self) -> bool:
        return self._root is not None

    def set_root_update(self, delta: Mapping[str, torch.Tensor]) -> None:
        """Set the server's root update for the next aggregation (a float64 copy is kept)."""
        root: dict[str, torch.Tensor] = {}
        for key, t in delta.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"root update tensor {key!r} must be a floating-point tensor")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"root update tensor {key!r} has non-finite values (NaN/Inf)")
            root[key] = t.detach().to(torch.float64, copy=True)
        self._root = root

    def aggregate(self, updates: Sequence[ClientUpdate]) -> TensorDict:
        if self._root is None:
            raise RuntimeError(
                "FLTrust needs the server's root update for this round: call set_root_update(delta) "
                "before aggregating (it is consumed by each aggregation)"
            )
        root, self._root = self._root, None
        reference = updates[0].delta
        _check_root_layout(root, reference)
        # A fixed (silo-name) order makes the float64 sums independent of arrival order.
        ordered = sorted(updates, key=lambda u: u.silo)
        scores, norms, root_norm = trust_scores([u.delta for u in ordered], root)
        total = math.fsum(scores)
        out: TensorDict = {}
        for key, ref in reference.items():
            acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            if total > 0.0:
                for score, norm, u in zip(scores, norms, ordered, strict=True):
                    if score > 0.0:
                        coeff = (score / total) * (root_norm / norm)
                        acc += coeff * u.delta[key].to(device=ref.device, dtype=torch.float64)
            out[key] = acc.to(ref.dtype)
        return out


def _check_root_layout(root: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(reference) - set(root))
    extra = sorted(set(root) - set(reference))
    if missing or extra:
        raise ValueError(
            f"root update does not match the silos' tensors: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for key, ref in reference.items():
        if tuple(root[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"root update tensor {key!r} has shape {tuple(root[key].shape)}, "
                f"the silos' has {tuple(ref.shape)}"
            )
