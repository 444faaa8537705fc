"""Stateful server optimizers: server momentum, FedAdam and FedYogi.

The combined delta of a round is treated as a pseudo-gradient pointing *uphill*
on the silos' objective (it is ``local - global``), so every rule moves the
global adapter *along* it.

- ``fedavgm``: Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", arXiv:1909.06335, 2019.
  ``v = momentum * v + delta``; ``x = x + lr * v``.
- ``fedadam`` and ``fedyogi``: Reddi, Charles, Zaheer, Garrett, Rush, Konečný,
  Kumar and McMahan, "Adaptive Federated Optimization", ICLR 2021, Algorithm 2.
  ``m = beta1 * m + (1 - beta1) * delta``;
  Adam: ``v = beta2 * v + (1 - beta2) * delta^2``;
  Yogi: ``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)``;
  ``x = x + lr * m / (sqrt(v) + tau)``. As in the paper there is no bias
  correction, ``m`` starts at 0 and ``v`` at ``tau^2`` (the paper asks for
  ``v_{-1} >= tau^2``).

State is kept per tensor in at least float32 (a bf16 adapter gets float32
buffers) and returned by ``state_dict()`` as one flat ``dict[str, Tensor]`` with
prefixed keys (``momentum/<key>``, ``m/<key>``, ``v/<key>``), so it can be
saved with the round's checkpoint; a restored optimizer continues bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from silotune.aggregation.base import TensorDict
from silotune.aggregation.server_opt import SERVER_OPTIMIZERS


def _check_real(
    option: str, value: object, *, low: float, high: float | None = None, low_open: bool
) -> float:
    """Validate ``value`` in ``(low, high)`` / ``[low, high)``; the message names the option and value."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'})"
        raise ValueError(f"{option} must be a finite number in {interval}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Optimizer state precision: the tensor's own dtype, but never below float32."""
    return torch.promote_types(dtype, torch.float32)


def _check_step_inputs(
    global_: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], state_keys: set[str] | None
) -> None:
    missing = sorted(set(global_) - set(delta))
    extra = sorted(set(delta) - set(global_))
    if missing or extra:
        raise ValueError(
            f"delta does not match the global adapter: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for key, g in global_.items():
        if tuple(delta[key].shape) != tuple(g.shape):
            raise ValueError(
                f"delta tensor {key!r} has shape {tuple(delta[key].shape)}, the global has {tuple(g.shape)}"
            )
    if state_keys is not None and state_keys != set(global_):
        missing = sorted(set(global_) - state_keys)
        extra = sorted(state_keys - set(global_))
        raise ValueError(
            f"optimizer state does not match the global adapter: no state for {missing[:5]}, "
            f"state for unknown tensors {extra[:5]} (load_state_dict({{}}) resets the state)"
        )


def _split_state(
    state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], optimizer: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Split a flat ``prefix/key`` state dict into one dict per prefix, validating every entry."""
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    for flat_key, t in state.items():
        prefix, sep, key = flat_key.partition("/")
        if not sep or prefix not in parts or not key:
            expected = ", ".join(f"'{p}/<tensor>'" for p in prefixes)
            raise ValueError(f"{optimizer} state key {flat_key!r} is not of the form {expected}")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{optimizer} state entry {flat_key!r} must be a floating-point tensor")
        parts[prefix][key] = t.detach().clone()
    key_sets = {p: set(d) for p, d in parts.items()}
    first = prefixes[0]
    for p in prefixes[1:]:
        if key_sets[p] != key_sets[first]:
            odd = sorted(key_sets[p] ^ key_sets[first])
            raise ValueError(
                f"{optimizer} state has '{first}/' and '{p}/' entries for different tensors: {odd[:5]}"
            )
        for key in key_sets[p]:
            if parts[p][key].shape != parts[first][key].shape:
                raise ValueError(f"{optimizer} state entries '{first}/{key}' and '{p}/{key}' differ in shape")
    return parts


@SERVER_OPTIMIZERS.register("fedavgm")
class FedAvgM:
    """Server momentum: ``v = momentum * v + delta``; ``x = x + lr * v``.

    With ``momentum=0`` and ``lr=1`` this is exactly FedAvg's update.
    """

    name = "fedavgm"

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.9) -> None:
        self.lr = _check_real("lr", lr, low=0.0, low_open=True)
        self.momentum = _check_real("momentum", momentum, low=0.0, high=1.0, low_open=False)
        self._velocity: dict[str, torch.Tensor] = {}

    def step(self, global_: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> TensorDict:
        _check_step_inputs(global_, delta, set(self._velocity) if self._velocity else None)
        out: TensorDict = {}
        velocity: dict[str, torch.Tensor] = {}
        for key, g in global_.items():
            dtype = _state_dtype(g.dtype)
            d = delta[key].to(device=g.device, dtype=dtype)
            v = self._velocity.get(key)
            # clone: ``d`` may be the caller's own tensor when no conversion was needed.
            v = d.clone() if v is None else self.momentum * v.to(device=g.device, dtype=dtype) + d
            velocity[key] = v
            out[key] = (g.to(dtype) + self.lr * v).to(g.dtype)
        self._velocity = velocity
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"momentum/{k}": v.clone() for k, v in self._velocity.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._velocity = _split_state(state, ("momentum",), self.name)["momentum"]


class _AdaptiveServerOptimizer:
    """Shared state handling of FedAdam and FedYogi; subclasses define the second-moment update."""

    name = "adaptive"

    def __init__(
        self, *, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        self.lr = _check_real("lr", lr, low=0.0, low_open=True)
        self.beta1 = _check_real("beta1", beta1, low=0.0, high=1.0, low_open=False)
        self.beta2 = _check_real("beta2", beta2, low=0.0, high=1.0, low_open=False)
        self.tau = _check_real("tau", tau, low=0.0, low_open=True)
        self._m: dict[str, torch.Tensor] = {}
        self._v: dict[str, torch.Tensor] = {}

    def _second_moment(self, v: torch.Tensor, d_sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, global_: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> TensorDict:
        _check_step_inputs(global_, delta, set(self._m) if self._m else None)
        out: TensorDict = {}
        new_m: dict[str, torch.Tensor] = {}
        new_v: dict[str, torch.Tensor] = {}
        for key, g in global_.items():
            dtype = _state_dtype(g.dtype)
            d = delta[key].to(device=g.device, dtype=dtype)
            if key in self._m:
                m = self._m[key].to(device=g.device, dtype=dtype)
                v = self._v[key].to(device=g.device, dtype=dtype)
            else:
                m = torch.zeros_like(d)
                v = torch.full_like(d, self.tau**2)
            m = self.beta1 * m + (1.0 - self.beta1) * d
            v = self._second_moment(v, d.square())
            new_m[key], new_v[key] = m, v
            out[key] = (g.to(dtype) + self.lr * m / (v.sqrt() + self.tau)).to(g.dtype)
        self._m, self._v = new_m, new_v
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"m/{k}": t.clone() for k, t in self._m.items()}
        state.update({f"v/{k}": t.clone() for k, t in self._v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        parts = _split_state(state, ("m", "v"), self.name)
        self._m, self._v = parts["m"], parts["v"]


@SERVER_OPTIMIZERS.register("fedadam")
class FedAdam(_AdaptiveServerOptimizer):
    """Adam on the server: ``v = beta2 * v + (1 - beta2) * delta^2``."""

    name = "fedadam"

    def _second_moment(self, v: torch.Tensor, d_sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1.0 - self.beta2) * d_sq


@SERVER_OPTIMIZERS.register("fedyogi")
class FedYogi(_AdaptiveServerOptimizer):
    """Yogi on the server: ``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)``.

    Where ``v`` exceeds ``delta^2``, Adam shrinks it by ``(1 - beta2) * (v - delta^2)``
    and Yogi only by ``(1 - beta2) * delta^2``, so the effective step ``lr / sqrt(v)``
    grows more slowly when the pseudo-gradients become small (Zaheer et al.,
    "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018).
    """

    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, d_sq: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.beta2) * d_sq * torch.sign(v - d_sq)
