"""Heterogeneous LoRA ranks in one federation (zero-padding with coverage-weighted averaging).

A silo with a small budget may train a rank-``r_k`` slice of the federation's
rank-``r`` adapter (HetLoRA, Cho et al. 2024): it loads the first ``r_k`` rows of
every A and the first ``r_k`` columns of every B, trains a rank-``r_k`` LoRA whose
``alpha`` is scaled to ``alpha · r_k / r`` (so ``alpha / rank``, and therefore the
function of the shared components, is unchanged), and uploads its delta
zero-padded back to rank ``r``.

Plain FedAvg of padded deltas would be wrong: a rank component that only the
large silos train would be averaged with the small silos' zeros and shrink by
their share of the examples. :func:`rescale_by_coverage` undoes that on the
aggregate: component ``j`` is divided by the weight share of the silos that
cover it, which turns the weighted sum into the weighted mean over exactly those
silos. That needs the per-silo updates in plaintext and a linear aggregator, so
config validation allows heterogeneous ranks only with FedAvg, no protection and
no client-level DP (whose noise would fill the padding).

Like FedAvg of same-rank LoRA, this averages the factors A and B separately, so
the new global's B·A is not exactly the mean of the silos' B_k·A_k; FLoRA
stacking (``aggregation.lora_merge: stack``, :mod:`silotune.methods.stacked`) is
exact, at the price of a dense global and plaintext factors at the coordinator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

TensorDict = dict[str, torch.Tensor]


def _is_a(key: str) -> bool:
    return "lora_A" in key or "lora_embedding_A" in key


def _is_b(key: str) -> bool:
    return "lora_B" in key or "lora_embedding_B" in key


def truncate(state: Mapping[str, torch.Tensor], rank: int) -> TensorDict:
    """The rank-``rank`` slice of a LoRA state: A[:rank, :], B[:, :rank]; other tensors unchanged.

    At full rank (or without LoRA tensors) the state itself is returned, untouched.
    """
    if all(v.shape[0] <= rank for k, v in state.items() if _is_a(k)):
        return dict(state)
    out: TensorDict = {}
    for k, v in state.items():
        if _is_a(k):
            out[k] = v[:rank].clone().contiguous()
        elif _is_b(k):
            out[k] = v[:, :rank].clone().contiguous()
        else:
            out[k] = v
    return out


def pad(state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> TensorDict:
    """Zero-pad a low-rank LoRA state (or delta) to the shapes of ``like``."""
    out: TensorDict = {}
    for k, ref in like.items():
        v = state[k]
        if tuple(v.shape) == tuple(ref.shape):
            out[k] = v
            continue
        t = torch.zeros_like(ref)
        if _is_a(k):
            t[: v.shape[0]] = v
        elif _is_b(k):
            t[:, : v.shape[1]] = v
        else:
            raise ValueError(f"cannot pad non-LoRA tensor {k} from {tuple(v.shape)} to {tuple(ref.shape)}")
        out[k] = t
    return out


def rescale_by_coverage(
    combined: Mapping[str, torch.Tensor], ranks: Sequence[int], weights: Sequence[float]
) -> TensorDict:
    """A weighted sum of zero-padded deltas → the weighted mean over the silos covering each component.

    ``ranks[i]`` and ``weights[i]`` are the rank and aggregation weight of included silo ``i``
    (weights summing to one, as FedAvg's do). Component ``j`` of every A row and B column is
    divided by the total weight of the silos with ``rank > j``.
    """
    if len(ranks) != len(weights) or not ranks:
        raise ValueError("ranks and weights must be non-empty and of equal length")
    total = float(sum(weights))
    out: TensorDict = {}
    for k, v in combined.items():
        if not (_is_a(k) or _is_b(k)):
            out[k] = v
            continue
        r = v.shape[0] if _is_a(k) else v.shape[1]
        cover = torch.tensor(
            [sum(w for rk, w in zip(ranks, weights, strict=True) if rk > j) / total for j in range(r)],
            dtype=v.dtype,
        )
        # A component nobody trained has a zero sum; leave it (division by a zero share is avoided).
        scale = torch.where(cover > 0, 1.0 / cover.clamp_min(1e-12), torch.zeros_like(cover))
        out[k] = (v * scale[:, None]) if _is_a(k) else (v * scale[None, :])
    return out
