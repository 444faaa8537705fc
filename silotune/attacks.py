"""Model-poisoning transforms: a malicious delta made from an honest one.

For evaluating robust aggregation only (a simulated Byzantine silo applies one
of these to its honest delta before upload). Every function is pure: it returns
new tensors with the input's keys, shapes and dtypes and never modifies the input.

- ``sign_flip``: ``-scale * delta`` (e.g. Damaskinos et al., "Asynchronous
  Byzantine Machine Learning", ICML 2018; Fang et al., USENIX Security 2020).
- ``scale``: ``factor * delta``, the model-replacement boost of Bagdasaryan et
  al., "How To Backdoor Federated Learning", AISTATS 2020.
- ``gaussian``: the delta is replaced by N(0, std^2) noise (the Gaussian
  Byzantine workers of Blanchard et al., NeurIPS 2017).
- ``nan``: all NaN, a crashed or hostile silo; validation must reject it.
- ``free_rider``: all zeros, a silo that contributes nothing but claims examples
  (Lin et al., "Free-riders in Federated Learning", 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from silotune.registry import Registry

TensorDict = dict[str, torch.Tensor]
Attack = Callable[..., TensorDict]

ATTACKS: Registry[Attack] = Registry("attack")


def _check_finite(option: str, value: object, *, non_negative: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok and non_negative:
        ok = float(value) >= 0  # type: ignore[arg-type]
    if not ok:
        what = "a finite number >= 0" if non_negative else "a finite number"
        raise ValueError(f"{option} must be {what}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


@ATTACKS.register("sign_flip")
def sign_flip(delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> TensorDict:
    """``-scale * delta``: push the global adapter away from where the honest silos move it."""
    s = _check_finite("scale", scale)
    return {k: (t.to(torch.float64) * -s).to(t.dtype) for k, t in delta.items()}


@ATTACKS.register("scale")
def scale(delta: Mapping[str, torch.Tensor], factor: float) -> TensorDict:
    """``factor * delta``: boost an update so it survives averaging (model replacement)."""
    f = _check_finite("factor", factor)
    return {k: (t.to(torch.float64) * f).to(t.dtype) for k, t in delta.items()}


@ATTACKS.register("gaussian")
def gaussian(delta: Mapping[str, torch.Tensor], std: float, *, generator: torch.Generator) -> TensorDict:
    """Replace every tensor by N(0, std^2) noise of its shape, drawn from ``generator``.

    The noise is drawn in float32 on the generator's device, in sorted key order,
    so the result depends only on the generator's state, the keys and the shapes
    (not on the dict's order, the tensors' dtype or their device).
    """
    s = _check_finite("std", std, non_negative=True)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    out: TensorDict = {}
    for key in sorted(delta):
        t = delta[key]
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32, device=generator.device)
        out[key] = (noise * s).to(device=t.device, dtype=t.dtype)
    return {k: out[k] for k in delta}


@ATTACKS.register("nan")
def nan(delta: Mapping[str, torch.Tensor]) -> TensorDict:
    """All-NaN tensors; aggregation must reject them, never average them in."""
    return {k: torch.full_like(t, math.nan) for k, t in delta.items()}


@ATTACKS.register("free_rider")
def free_rider(delta: Mapping[str, torch.Tensor]) -> TensorDict:
    """All-zero tensors: contributes nothing while still claiming its example count."""
    return {k: torch.zeros_like(t) for k, t in delta.items()}


def apply_attack(name: str, delta: Mapping[str, torch.Tensor], **options: Any) -> TensorDict:
    """Apply the attack registered as ``name``; unknown names list the known ones."""
    attack = ATTACKS.get(name)
    try:
        return attack(delta, **options)
    except TypeError as exc:
        raise TypeError(f"attack {name!r}: {exc}") from None
