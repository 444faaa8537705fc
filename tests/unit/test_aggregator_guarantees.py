"""Registry-wide declarations and exact Byzantine guarantees of the robust rules.

The contract table (permutation invariance, identity, single silo, zero, empty,
NaN) lives in ``test_aggregators_robust.py``; this module adds what every
registered aggregator must *declare* (can it run on encrypted or masked
updates?) and the exact recovery guarantees of median, trimmed mean and Krum.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from silotune.aggregation import AGGREGATORS, ClientUpdate, aggregate, build_aggregator, plaintext_requirement
from silotune.config import AggregationSpec, plaintext_aggregation_problem

SUMS_ONLY = {"fedavg"}


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_aggregator_declares_whether_it_needs_plaintext(name: str) -> None:
    cls = AGGREGATORS.get(name)
    assert isinstance(cls.needs_plaintext, bool), name
    assert isinstance(cls.plaintext_reason, str) and len(cls.plaintext_reason) > 20, name
    assert cls.needs_plaintext == (name not in SUMS_ONLY), name


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_plaintext_requirement_and_config_problem(name: str) -> None:
    problem = plaintext_aggregation_problem(AggregationSpec(name=name), protection="CKKS encryption")
    if name in SUMS_ONLY:
        assert plaintext_requirement(name) is None and problem is None
    else:
        reason = plaintext_requirement(name)
        assert reason is not None and repr(name) in reason
        assert problem is not None
        assert problem.startswith("aggregation.name:") and "CKKS encryption" in problem
        assert AGGREGATORS.get(name).plaintext_reason in problem


def test_an_undeclared_aggregator_is_treated_as_needing_plaintext() -> None:
    @AGGREGATORS.register("_test_undeclared")
    class Undeclared:
        name = "_test_undeclared"

        def aggregate(self, updates):  # pragma: no cover - never called
            raise AssertionError

    try:
        reason = plaintext_requirement("_test_undeclared")
        assert reason is not None and "does not declare" in reason
    finally:
        AGGREGATORS._items.pop("_test_undeclared")


# --------------------------------------------------------------------------- exact recovery

VALUES = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
BYZ_VALUES = st.floats(-(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32)


def _updates(honest: torch.Tensor, n_honest: int, byzantine: list[torch.Tensor]) -> list[ClientUpdate]:
    deltas = [honest.clone() for _ in range(n_honest)] + byzantine
    return [ClientUpdate(silo=f"s{i:02d}", delta={"w": d}, num_examples=1 + i) for i, d in enumerate(deltas)]


@st.composite
def byzantine_batch(
    draw: st.DrawFn, *, max_f: int, min_honest
) -> tuple[torch.Tensor, list[ClientUpdate], int]:
    f = draw(st.integers(0, max_f))
    n_honest = min_honest(f) + draw(st.integers(0, 2))
    honest = torch.tensor(draw(st.lists(VALUES, min_size=3, max_size=3)), dtype=torch.float32)
    byz = [
        torch.tensor(draw(st.lists(BYZ_VALUES, min_size=3, max_size=3)), dtype=torch.float32)
        for _ in range(f)
    ]
    updates = _updates(honest, n_honest, byz)
    order = draw(st.permutations(range(len(updates))))
    return honest, [updates[i] for i in order], f


@settings(max_examples=40, deadline=None)
@given(batch=byzantine_batch(max_f=3, min_honest=lambda f: f + 1))
def test_median_recovers_the_honest_value_with_an_honest_majority(batch) -> None:
    honest, updates, _ = batch
    assert torch.equal(aggregate(build_aggregator("median"), updates)["w"], honest)


@settings(max_examples=40, deadline=None)
@given(batch=byzantine_batch(max_f=2, min_honest=lambda f: f + 1))
def test_trimmed_mean_recovers_the_honest_value_when_it_trims_at_least_f(batch) -> None:
    honest, updates, f = batch
    n = len(updates)
    ratio = f / n + 1e-6 if f else 0.0  # trims exactly f from each end
    if ratio >= 0.5:
        return
    out = aggregate(build_aggregator("trimmed_mean", trim_ratio=ratio), updates)["w"]
    torch.testing.assert_close(out, honest, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(batch=byzantine_batch(max_f=2, min_honest=lambda f: f + 3))
def test_krum_and_multi_krum_recover_the_honest_value_below_the_tolerated_count(batch) -> None:
    """n >= 2f + 3 and at most f Byzantine: the honest updates (identical) score 0 and are chosen."""
    honest, updates, f = batch
    byz_values = [u.delta["w"] for u in updates if not torch.equal(u.delta["w"], honest)]
    if any(torch.equal(b, honest) for b in byz_values):
        return
    n_honest = len(updates) - f
    # Declaring the f actually present, or any larger f the silo count allows, keeps the guarantee.
    for declared in range(f, (len(updates) - 3) // 2 + 1):
        krum = aggregate(build_aggregator("krum", num_byzantine=declared), updates)["w"]
        assert torch.equal(krum, honest), declared
        m = min(n_honest, len(updates) - declared)
        multi = aggregate(build_aggregator("multi_krum", num_byzantine=declared, num_selected=m), updates)[
            "w"
        ]
        torch.testing.assert_close(multi, honest, rtol=0, atol=1e-6 * (1 + float(honest.abs().max())))


def test_fedavg_does_not_recover_the_honest_value() -> None:
    honest = torch.tensor([1.0, 2.0, 3.0])
    updates = _updates(honest, 4, [torch.tensor([1e6, 1e6, 1e6])])
    assert not torch.allclose(aggregate(build_aggregator("fedavg"), updates)["w"], honest)
