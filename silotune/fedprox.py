"""FedProx's proximal term for local training.

Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020. Each silo minimises
``loss(w) + (mu / 2) * ||w - w_global||^2`` over its trainable (adapter)
parameters, which keeps a silo with very different data, or more local steps,
from drifting far from the broadcast global adapter.

The term's gradient, ``mu * (w - w_global)``, is added by a gradient hook on each
trainable parameter: the same gradient as adding the term to the loss, without
touching the training step, and the reported training loss stays the task loss
(comparable with and without FedProx). Gradient clipping sees the sum, as it
would with the term in the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The parameter remembers its hook, so a term left attached by a failed round (an exception
# between attach and detach) is removed by the next attach instead of being applied twice.
_HANDLE_ATTR = "_silotune_proximal_hook"


class ProximalTerm:
    """Adds ``mu * (p - anchor)`` to each parameter's gradient until :meth:`remove` is called.

    The anchors are copies of the parameters' values when the term is attached,
    i.e. the global adapter a round starts from.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], mu: float) -> None:
        if not mu > 0:
            raise ValueError(f"proximal mu must be > 0, got {mu!r}")
        self.mu = float(mu)
        self._params = list(params)
        self.anchors = [p.detach().clone() for p in params]
        self._handles = []
        for p, a in zip(params, self.anchors, strict=True):
            handle = p.register_hook(self._hook(p, a))
            setattr(p, _HANDLE_ATTR, handle)
            self._handles.append(handle)

    def _hook(self, p: torch.nn.Parameter, anchor: torch.Tensor):  # type: ignore[no-untyped-def]
        mu = self.mu

        def add_proximal_grad(grad: torch.Tensor) -> torch.Tensor:
            return grad + mu * (p.detach() - anchor)

        return add_proximal_grad

    def value(self, params: Sequence[torch.nn.Parameter]) -> float:
        """``(mu / 2) * sum ||p - anchor||^2``, for reporting and tests."""
        total = sum(
            float((p.detach() - a).double().square().sum()) for p, a in zip(params, self.anchors, strict=True)
        )
        return 0.5 * self.mu * total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for p in self._params:
            if getattr(p, _HANDLE_ATTR, None) is not None:
                delattr(p, _HANDLE_ATTR)


def attach_proximal_term(params: Sequence[torch.nn.Parameter], mu: float) -> ProximalTerm | None:
    """The FedProx term on ``params`` anchored at their current values; None (nothing attached) if mu == 0.

    Any term still attached to these parameters from an earlier, interrupted round is removed first.
    """
    for p in params:
        stale = getattr(p, _HANDLE_ATTR, None)
        if stale is not None:
            stale.remove()
            delattr(p, _HANDLE_ATTR)
    return ProximalTerm(params, mu) if mu > 0 else None


def detach_proximal_term(term: ProximalTerm | None) -> None:
    if term is not None:
        term.remove()
