"""FedProx: the gradient hook equals the proximal term's gradient, and it pulls training towards the global."""

from __future__ import annotations

import pytest
import torch

from silotune.config import TrainSpec
from silotune.fedprox import ProximalTerm, attach_proximal_term, detach_proximal_term


def test_hook_gradient_equals_the_loss_term_gradient() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2))
    x = torch.randn(4, 3)
    term = attach_proximal_term([w], 0.7)
    assert term is not None
    with torch.no_grad():
        w.add_(torch.randn(3, 2))  # move away from the anchor
    (x @ w).square().sum().backward()
    hooked = w.grad.clone()
    detach_proximal_term(term)
    w.grad = None
    anchor = term.anchors[0]
    ((x @ w).square().sum() + 0.35 * (w - anchor).square().sum()).backward()
    torch.testing.assert_close(hooked, w.grad)
    assert term.value([w]) == pytest.approx(0.35 * float((w.detach() - anchor).square().sum()))


def test_mu_zero_attaches_nothing_and_stale_hooks_are_replaced() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    assert attach_proximal_term([w], 0.0) is None
    first = attach_proximal_term([w], 1.0)  # never detached: an interrupted round
    assert first is not None
    with torch.no_grad():
        w.add_(1.0)
    second = attach_proximal_term([w], 2.0)  # re-anchors at w = 1, removes the stale hook
    w.sum().backward()
    assert torch.equal(w.grad, torch.ones(2))  # only the task gradient: p == the new anchor
    detach_proximal_term(second)
    with pytest.raises(ValueError, match="mu must be > 0"):
        ProximalTerm([w], -1.0)


def test_proximal_term_shrinks_the_local_update(tiny_adapter, demo_data) -> None:
    from silotune.data import encode_dataset, read_records
    from silotune.training import train_local

    examples = encode_dataset(read_records(demo_data["bank"]["train"]), tiny_adapter.tokenizer, 128)
    start = tiny_adapter.state()
    spec = {"local_steps": 3, "batch_size": 4, "learning_rate": 5e-2, "max_grad_norm": None}
    _, plain = train_local(tiny_adapter, start, examples, TrainSpec(**spec), seed=0, progress=False)
    _, prox = train_local(
        tiny_adapter, start, examples, TrainSpec(**spec, proximal_mu=50.0), seed=0, progress=False
    )
    assert plain.first_loss == prox.first_loss  # same data, same start: the term only adds a gradient
    assert prox.update_norm < plain.update_norm
    # Hooks are gone after training: a third plain run reproduces the first.
    _, again = train_local(tiny_adapter, start, examples, TrainSpec(**spec), seed=0, progress=False)
    assert again.update_norm == pytest.approx(plain.update_norm, rel=1e-6)
