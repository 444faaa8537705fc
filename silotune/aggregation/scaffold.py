"""SCAFFOLD: control variates that correct client drift on non-IID silos.

Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020, Algorithm 1 with option II. Silo ``i`` keeps its variate ``c_i`` in
its private folder; the federation keeps the server variate ``c`` in the store. A round from the
global ``x``, with ``K`` local steps of learning rate ``η``:

- every local step is corrected by ``c - c_i``: ``y <- y - η (g - c_i + c)``;
- ``c_i+ = c_i - c + (x - y_i) / (K η)`` (option II), so ``Δc_i = c_i+ - c_i = -c - Δy_i / (K η)``;
- the silo uploads ``Δy_i = y_i - x`` and ``Δc_i``;
- the server steps ``x`` with the mean ``Δy`` (its optimizer; ``sgd`` with ``lr`` is the paper's
  global learning rate) and sets ``c += (|S| / N) · mean Δc`` over the ``|S|`` included silos of
  ``N``. Both means are those of the configured FedAvg (example-weighted unless ``weighted: false``).

Local training is AdamW, not SGD. The correction is applied after each optimizer step as
``y -= η (c - c_i)``, outside AdamW's moments, as OpenFedLLM's SCAFFOLD does: with plain SGD this is
exactly the corrected-gradient step; fed through AdamW's per-coordinate normaliser instead, a
variate in step units (what ``(x - y) / (K η)`` measures under AdamW) would be rescaled by each
coordinate's gradient scale, and a small gradient would let the correction dominate the step.

Framing: ``Δc_i`` travels in the same update as ``Δy_i``, under ``scaffold.control/<tensor>``,
multiplied by the public ``K η``: then it is the size of a delta (it equals ``-(Δy_i + K η c)``),
so it fits secure aggregation's fixed-point bound like the delta does, and sums stay sums.

Privacy: ``Δc_i = -c - Δy_i / (K η)`` depends only on the released ``Δy_i`` and the public ``c``.
The silo computes it from the delta it releases (after client-DP clipping and noise), so the
variate costs no privacy beyond the delta's, and it can be summed by masking like any delta.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from silotune.aggregation.base import TensorDict

CONTROL_PREFIX = "scaffold.control/"  # update keys that carry K·η·Δc_i


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Variates are kept in at least float32, whatever the adapter's dtype (bf16 would lose them)."""
    return t.detach().to("cpu", torch.promote_types(t.dtype, torch.float32))


def zeros(template: Mapping[str, torch.Tensor]) -> TensorDict:
    """The initial variate (``c = c_i = 0``, as in the paper) over ``template``'s tensors."""
    return {
        k: torch.zeros(v.shape, dtype=torch.promote_types(v.dtype, torch.float32))
        for k, v in template.items()
    }


def correction(server: Mapping[str, torch.Tensor], silo: Mapping[str, torch.Tensor]) -> TensorDict:
    """``c - c_i``: what every local step subtracts (times ``η``) from the trainable tensors."""
    if set(server) != set(silo):
        odd = sorted(set(server) ^ set(silo))
        raise ValueError(f"server and silo control variates cover different tensors: {odd[:5]}")
    return {k: _f32(server[k]) - _f32(silo[k]) for k in server}


def silo_update(
    silo: Mapping[str, torch.Tensor],
    server: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    *,
    steps: int,
    lr: float,
) -> tuple[TensorDict, TensorDict]:
    """Option II: ``(c_i+, Δc_i)`` with ``c_i+ = c_i - c + (x - y_i) / (K η)``, ``Δc_i = c_i+ - c_i``.

    ``delta`` is ``y_i - x`` (the update the silo releases).
    """
    if not (steps >= 1 and lr > 0):
        raise ValueError(f"SCAFFOLD needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if not (set(silo) == set(server) == set(delta)):
        odd = sorted((set(silo) | set(server) | set(delta)) - (set(silo) & set(server) & set(delta)))
        raise ValueError(f"variates and delta cover different tensors: {odd[:5]}")
    scale = 1.0 / (steps * lr)
    new = {k: _f32(silo[k]) - _f32(server[k]) - scale * _f32(delta[k]) for k in delta}
    return new, {k: new[k] - _f32(silo[k]) for k in delta}


def frame(
    delta: Mapping[str, torch.Tensor], delta_c: Mapping[str, torch.Tensor], *, steps: int, lr: float
) -> TensorDict:
    """The uploaded update: ``Δy`` under its own keys and ``K η Δc`` under ``scaffold.control/``."""
    out = dict(delta)
    for k, v in delta_c.items():
        out[CONTROL_PREFIX + k] = (steps * lr * v).to(delta[k].dtype).contiguous()
    return out


def split(update: Mapping[str, torch.Tensor], *, steps: int, lr: float) -> tuple[TensorDict, TensorDict]:
    """A (combined) update back into ``(Δy, Δc)``; the inverse of :func:`frame` (up to rounding)."""
    model = {k: v for k, v in update.items() if not k.startswith(CONTROL_PREFIX)}
    control = {
        k.removeprefix(CONTROL_PREFIX): _f32(v) / (steps * lr)
        for k, v in update.items()
        if k.startswith(CONTROL_PREFIX)
    }
    if set(control) != set(model):
        odd = sorted(set(control) ^ set(model))
        raise ValueError(f"an update's control variate and delta cover different tensors: {odd[:5]}")
    return model, control


def template(exchanged: Mapping[str, torch.Tensor]) -> TensorDict:
    """What a SCAFFOLD update holds, for shape checks: the exchanged tensors and their control keys."""
    return {**exchanged, **{CONTROL_PREFIX + k: v for k, v in exchanged.items()}}


def server_update(
    server: Mapping[str, torch.Tensor], mean_delta_c: Mapping[str, torch.Tensor], *, included: int, total: int
) -> TensorDict:
    """``c + (|S| / N) · mean Δc``: ``|S|`` silos went into the round, of ``N`` in the federation."""
    if not 1 <= included <= total:
        raise ValueError(f"SCAFFOLD: {included} included silo(s) of {total}")
    if set(server) != set(mean_delta_c):
        odd = sorted(set(server) ^ set(mean_delta_c))
        raise ValueError(f"server control variate and mean Δc cover different tensors: {odd[:5]}")
    return {k: _f32(server[k]) + (included / total) * _f32(mean_delta_c[k]) for k in server}


def check_variate(
    variate: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise ValueError unless ``variate`` has ``reference``'s tensors and shapes, all finite floats."""
    if set(variate) != set(reference):
        odd = sorted(set(variate) ^ set(reference))
        raise ValueError(f"{what}: tensors do not match the adapter's exchanged tensors ({odd[:5]})")
    for k, ref in reference.items():
        t = variate[k]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{what}: tensor {k!r} is not a float tensor of shape {tuple(ref.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: tensor {k!r} has non-finite values")


def parameters_by_key(model: torch.nn.Module, keys: Sequence[str]) -> list[torch.nn.Parameter]:
    """The model's parameters that hold the exchanged tensors ``keys`` (PEFT state-dict names)."""
    by_key = {name.replace(".default.", "."): p for name, p in model.named_parameters()}
    missing = sorted(set(keys) - set(by_key))
    if missing:
        raise ValueError(f"SCAFFOLD: exchanged tensors without a model parameter: {missing[:3]}")
    return [by_key[k] for k in keys]


def attach_correction(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    corrections: Sequence[torch.Tensor],
    lr: float,
) -> Any:
    """After every step of ``optimizer``: ``p -= lr * (c - c_i)``; returns the hook's handle.

    A post-step hook, so it follows every step whatever loop takes it (SFT, DPO, DP-SGD's wrapped
    optimizer) and none is missed or doubled; ``remove()`` the handle when the round ends.
    """
    pairs = [
        (p, (lr * c).to(device=p.device, dtype=p.dtype)) for p, c in zip(params, corrections, strict=True)
    ]

    def corrected(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for p, step in pairs:
                p.sub_(step)

    hook: Callable[..., None] = corrected
    return optimizer.register_step_post_hook(hook)
