"""Stacking aggregation of LoRA adapters with different ranks (FLoRA).

Wang, Shen, Zhou, Cui, Tan, Li, Yang and Chen, "FLoRA: Federated Fine-Tuning
Large Language Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024.

Averaging LoRA factors is not averaging updates: ``mean(B) @ mean(A)`` differs
from ``mean(B @ A)`` (the cross terms ``B_i A_j`` are noise), and factors of
different ranks cannot be averaged at all. Stacking is exact instead: for silos
``k`` with factors ``A_k`` (``r_k × in``), ``B_k`` (``out × r_k``), LoRA scaling
``s_k = alpha_k / r_k`` and aggregation weight ``p_k``,

    A = [A_1; A_2; ...]                          (sum r_k) × in
    B = [p_1 s_1 B_1, p_2 s_2 B_2, ...] / s      out × (sum r_k)
    s · B @ A = sum_k p_k · s_k · B_k @ A_k

so the stacked adapter of rank ``sum r_k`` (with scaling ``s``) applies exactly
the weighted sum of the silos' updates, whatever their ranks. In FLoRA the
server sends the stacked factors back; each silo adds ``s · B @ A`` to its frozen
base weights and starts the next round from a fresh LoRA of its own rank.

This is not one of the delta aggregators of the registry (those keep every
tensor's shape, which stacking changes by design); it works on whole adapter
states, keyed by PEFT's names (``...<module>.lora_A.weight`` / ``lora_B.weight``).
Federations use it with ``aggregation.lora_merge: stack``: each round's
:func:`stacked_update` is merged into a dense global (:mod:`silotune.methods.stacked`,
``silotune.protection.none.aggregate_stacked``).

When to use it rather than FFA-LoRA (Sun et al., "Improving LoRA in
Privacy-preserving Federated Learning", ICLR 2024, which freezes every ``A`` at
a shared random init and trains and averages only ``B``, so plain FedAvg is
exact): stacking when silos need different ranks (different hardware or data
sizes) or full-expressivity factors, at the price of a global adapter whose rank
grows with the number of silos and a per-round merge into the base weights;
FFA-LoRA when every silo can use the same rank and the update must stay a plain
sum, the case of secure aggregation, homomorphic encryption and DP (stacking
reveals each silo's factors, as a concatenation, to whoever aggregates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

TensorDict = dict[str, torch.Tensor]

_A = ".lora_A.weight"
_B = ".lora_B.weight"


def lora_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Sorted module prefixes that have both a ``lora_A`` and a ``lora_B`` factor.

    Raises ``ValueError`` for a key that is not a LoRA factor, an unpaired factor,
    or factors whose ranks disagree.
    """
    a = {k.removesuffix(_A) for k in state if k.endswith(_A)}
    b = {k.removesuffix(_B) for k in state if k.endswith(_B)}
    other = sorted(k for k in state if not (k.endswith(_A) or k.endswith(_B)))
    if other:
        raise ValueError(f"not LoRA factors (stacking handles lora_A/lora_B only): {other[:3]}")
    if a != b:
        raise ValueError(f"unpaired LoRA factors for modules {sorted(a ^ b)[:3]}")
    for m in a:
        ra, rb = state[m + _A].shape[0], state[m + _B].shape[1]
        if ra != rb:
            raise ValueError(f"module {m!r}: lora_A has rank {ra} but lora_B has rank {rb}")
    return sorted(a)


def adapter_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The rank of an adapter (every module must have the same one)."""
    ranks = {state[m + _A].shape[0] for m in lora_modules(state)}
    if len(ranks) != 1:
        raise ValueError(f"modules of one adapter have different ranks: {sorted(ranks)}")
    return ranks.pop()


def stack_lora(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    scalings: Sequence[float],
    target_scaling: float = 1.0,
) -> TensorDict:
    """Stack the silos' LoRA factors so that ``target_scaling · B @ A = sum_k w_k · s_k · B_k @ A_k``.

    ``states[k]`` is silo ``k``'s whole adapter (not a delta: products of deltas
    are not deltas of products), ``weights`` the aggregation weights (e.g. example
    shares, summing to 1), ``scalings[k]`` silo ``k``'s LoRA scaling
    ``alpha_k / r_k``. The result has rank ``sum_k r_k`` in every module, in the
    order of ``states``; computed in float64 and cast to the first state's dtypes.
    """
    if not states:
        raise ValueError("cannot stack an empty list of adapters")
    if not (len(states) == len(weights) == len(scalings)):
        raise ValueError(
            f"got {len(states)} adapters, {len(weights)} weights and {len(scalings)} scalings; one each"
        )
    for name, values in (("weights", weights), ("scalings", scalings)):
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{name} must be finite, got {bad}")
    if not (math.isfinite(target_scaling) and target_scaling > 0):
        raise ValueError(f"target_scaling must be a finite number > 0, got {target_scaling!r}")
    modules = lora_modules(states[0])
    for k, st in enumerate(states[1:], start=1):
        other = lora_modules(st)
        if other != modules:
            raise ValueError(
                f"adapter {k} adapts different modules than adapter 0: "
                f"{sorted(set(other) ^ set(modules))[:3]}"
            )
    out: TensorDict = {}
    for m in modules:
        ref_a, ref_b = states[0][m + _A], states[0][m + _B]
        for k, st in enumerate(states):
            if st[m + _A].shape[1] != ref_a.shape[1] or st[m + _B].shape[0] != ref_b.shape[0]:
                raise ValueError(
                    f"adapter {k}, module {m!r}: factors {tuple(st[m + _B].shape)} @ "
                    f"{tuple(st[m + _A].shape)} "
                    f"do not fit the module's {ref_b.shape[0]} × {ref_a.shape[1]} weight"
                )
            for key in (m + _A, m + _B):
                if not st[key].is_floating_point() or not bool(torch.isfinite(st[key]).all()):
                    raise ValueError(f"adapter {k}, tensor {key!r}: must be floating point and finite")
        a = torch.cat([st[m + _A].to(torch.float64) for st in states], dim=0)
        b = torch.cat(
            [
                st[m + _B].to(torch.float64) * (w * s / target_scaling)
                for st, w, s in zip(states, weights, scalings, strict=True)
            ],
            dim=1,
        )
        out[m + _A] = a.to(ref_a.dtype)
        out[m + _B] = b.to(ref_b.dtype)
    return out


def dense_updates(state: Mapping[str, torch.Tensor], *, scaling: float) -> TensorDict:
    """``scaling · B @ A`` per module (float64): the change each adapted weight matrix receives."""
    return {
        m: scaling * (state[m + _B].to(torch.float64) @ state[m + _A].to(torch.float64))
        for m in lora_modules(state)
    }


def stacked_update(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *, scalings: Sequence[float]
) -> TensorDict:
    """``sum_k w_k · s_k · B_k @ A_k`` per module prefix (float64), through the stacked factors.

    What a stacked round merges into the global (:mod:`silotune.methods.stacked`): the product of
    :func:`stack_lora`'s factors, computed in float64 so that the merge is exact up to rounding.
    """
    wide = [{k: v.to(torch.float64) for k, v in st.items()} for st in states]
    return dense_updates(stack_lora(wide, weights, scalings=scalings, target_scaling=1.0), scaling=1.0)
