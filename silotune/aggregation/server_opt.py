"""Server optimizers: turn the round's combined delta into the next global adapter.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, frame the combined
delta as a pseudo-gradient; plain FedAvg is the server step ``global += lr * delta``
with ``lr = 1``. Stateful optimizers expose ``state_dict``/``load_state_dict`` so
their state is checkpointed with the round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from silotune.aggregation.base import TensorDict
from silotune.registry import Registry


@runtime_checkable
class ServerOptimizer(Protocol):
    name: str

    def step(self, global_: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> TensorDict: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


SERVER_OPTIMIZERS: Registry[type[Any]] = Registry("server optimizer")


def build_server_optimizer(name: str, **options: Any) -> ServerOptimizer:
    cls = SERVER_OPTIMIZERS.get(name)
    try:
        return cls(**options)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise TypeError(f"server optimizer {name!r}: {exc}") from None


@SERVER_OPTIMIZERS.register("sgd")
class ServerSGD:
    """``global + lr * delta``; with ``lr=1`` this is exactly FedAvg's update."""

    name = "sgd"

    def __init__(self, *, lr: float = 1.0) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = lr

    def step(self, global_: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> TensorDict:
        return {k: (global_[k] + self.lr * delta[k].to(global_[k].dtype)) for k in global_}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        return None
