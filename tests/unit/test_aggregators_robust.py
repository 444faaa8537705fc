"""Contract, hand-worked and robustness tests for every registered aggregator."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from silotune.aggregation import (
    AGGREGATORS,
    Aggregator,
    ClientUpdate,
    TensorDict,
    aggregate,
    build_aggregator,
)
from silotune.aggregation.fltrust import FLTrust
from silotune.aggregation.krum import krum_select, pairwise_sq_distances
from silotune.aggregation.trimmed_mean import trim_count
from silotune.attacks import apply_attack
from silotune.errors import UpdateError

# --------------------------------------------------------------------------- helpers

LAYOUT: dict[str, tuple[int, ...]] = {"lora_A": (2, 3), "lora_B": (3, 2), "bias": (4,)}
MIXED_DTYPES: dict[str, torch.dtype] = {
    "lora_A": torch.float32,
    "lora_B": torch.bfloat16,
    "bias": torch.float64,
}

ELEMENTS = st.floats(
    min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32
)
PROPERTY_SETTINGS = settings(max_examples=20, deadline=None)


@dataclass(frozen=True)
class Case:
    """How the contract table builds an aggregator, and the fewest silos it accepts."""

    options: dict[str, Any] = field(default_factory=dict)
    min_silos: int = 1


# Every registered aggregator runs the contract; a new one without an entry runs with its defaults.
CASES: dict[str, Case] = {
    "fedavg": Case(),
    "median": Case(),
    "trimmed_mean": Case({"trim_ratio": 0.2}),
    "krum": Case({"num_byzantine": 1}, min_silos=5),
    "multi_krum": Case({"num_byzantine": 1, "num_selected": 3}, min_silos=5),
    "norm_bounded": Case(),
    "fltrust": Case(),
}
NAMES = AGGREGATORS.names()


def make_updates(
    deltas: Sequence[Mapping[str, torch.Tensor]], num_examples: Sequence[int] | None = None
) -> list[ClientUpdate]:
    counts = list(num_examples) if num_examples is not None else [1] * len(deltas)
    return [
        ClientUpdate(silo=f"silo-{i:02d}", delta=dict(d), num_examples=n)
        for i, (d, n) in enumerate(zip(deltas, counts, strict=True))
    ]


def unweighted_mean(deltas: Sequence[Mapping[str, torch.Tensor]]) -> TensorDict:
    return {
        k: torch.stack([d[k].to(torch.float64) for d in deltas]).mean(dim=0).to(deltas[0][k].dtype)
        for k in deltas[0]
    }


def build(name: str, updates: Sequence[ClientUpdate]) -> Aggregator:
    """Build ``name`` from the table; FLTrust's root update is the silos' plain mean."""
    agg = build_aggregator(name, **CASES.get(name, Case()).options)
    if hasattr(agg, "set_root_update"):
        agg.set_root_update(unweighted_mean([u.delta for u in updates]))
    return agg


def scalar_updates(values: Sequence[float], num_examples: Sequence[int] | None = None) -> list[ClientUpdate]:
    return make_updates([{"w": torch.tensor([v], dtype=torch.float64)} for v in values], num_examples)


def flat(delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([delta[k].to(torch.float64).reshape(-1) for k in sorted(delta)])


def assert_same(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, k
        try:
            torch.testing.assert_close(actual[k], expected[k])
        except AssertionError as exc:
            raise AssertionError(f"tensor {k!r}: {exc}") from None


@st.composite
def deltas_strategy(draw: st.DrawFn, layout: Mapping[str, tuple[int, ...]] = LAYOUT) -> TensorDict:
    out: TensorDict = {}
    for key, shape in layout.items():
        numel = math.prod(shape)
        values = draw(st.lists(ELEMENTS, min_size=numel, max_size=numel))
        out[key] = torch.tensor(values, dtype=torch.float32).reshape(shape)
    return out


@st.composite
def updates_strategy(draw: st.DrawFn, min_n: int, max_n: int) -> list[ClientUpdate]:
    n = draw(st.integers(min_n, max_n))
    deltas = [draw(deltas_strategy()) for _ in range(n)]
    counts = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    return make_updates(deltas, counts)


# --------------------------------------------------------------------------- contract table


@pytest.mark.parametrize("name", NAMES)
def test_registered_under_its_name(name: str) -> None:
    agg = build_aggregator(name, **CASES.get(name, Case()).options)
    assert agg.name == name
    assert isinstance(agg, Aggregator)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_permutation_invariance(name: str, data: st.DataObject) -> None:
    min_n = CASES.get(name, Case()).min_silos
    updates = data.draw(updates_strategy(min_n, min_n + 3))
    perm = data.draw(st.permutations(range(len(updates))))
    shuffled = [updates[i] for i in perm]
    expected = aggregate(build(name, updates), updates)
    actual = aggregate(build(name, updates), shuffled)
    assert_same(actual, expected)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(delta=deltas_strategy(), n_extra=st.integers(0, 3), data=st.data())
def test_identical_inputs_give_that_input(
    name: str, delta: TensorDict, n_extra: int, data: st.DataObject
) -> None:
    n = CASES.get(name, Case()).min_silos + n_extra
    counts = data.draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    updates = make_updates([delta] * n, counts)
    assert_same(aggregate(build(name, updates), updates), delta)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(delta=deltas_strategy(), num_examples=st.integers(1, 1000))
def test_single_silo_gives_itself(name: str, delta: TensorDict, num_examples: int) -> None:
    updates = make_updates([delta], [num_examples])
    if CASES.get(name, Case()).min_silos > 1:
        with pytest.raises(ValueError, match=r"2\*f\+3"):
            aggregate(build(name, updates), updates)
    else:
        assert_same(aggregate(build(name, updates), updates), delta)


@pytest.mark.parametrize("name", [n for n in NAMES if CASES.get(n, Case()).min_silos > 1])
def test_minimum_silo_count(name: str) -> None:
    minimum = CASES[name].min_silos
    deltas = [{k: torch.full(s, float(i)) for k, s in LAYOUT.items()} for i in range(minimum)]
    updates = make_updates(deltas)
    out = aggregate(build(name, updates), updates)
    assert set(out) == set(LAYOUT)
    with pytest.raises(ValueError, match=rf"at least 2\*f\+3 = {minimum} updates.*got {minimum - 1}"):
        aggregate(build(name, updates[:-1]), updates[:-1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("extra", [0, 3])
def test_zero_updates_give_zero(name: str, extra: int) -> None:
    n = CASES.get(name, Case()).min_silos + extra
    zero = {k: torch.zeros(s) for k, s in LAYOUT.items()}
    updates = make_updates([zero] * n, list(range(1, n + 1)))
    out = aggregate(build(name, updates), updates)
    for k, s in LAYOUT.items():
        assert out[k].shape == s and out[k].dtype == torch.float32
        assert torch.equal(out[k], torch.zeros(s)), k


@pytest.mark.parametrize("name", NAMES)
def test_empty_input_raises(name: str) -> None:
    agg = build_aggregator(name, **CASES.get(name, Case()).options)
    with pytest.raises(ValueError, match="empty"):
        aggregate(agg, [])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_update_rejected(name: str, bad: float) -> None:
    n = CASES.get(name, Case()).min_silos + 1
    deltas = [{k: torch.ones(s) for k, s in LAYOUT.items()} for _ in range(n)]
    deltas[-1]["lora_B"][1, 0] = bad
    updates = make_updates(deltas)
    with pytest.raises(UpdateError) as info:
        aggregate(build(name, updates[:-1]), updates)
    assert info.value.silo == updates[-1].silo
    assert info.value.tensor == "lora_B"


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_keys_shapes_dtypes_preserved_and_inputs_untouched(name: str, data: st.DataObject) -> None:
    n = CASES.get(name, Case()).min_silos + data.draw(st.integers(0, 2))
    deltas = [{k: t.to(MIXED_DTYPES[k]) for k, t in data.draw(deltas_strategy()).items()} for _ in range(n)]
    before = [{k: t.clone() for k, t in d.items()} for d in deltas]
    updates = make_updates(deltas)
    out = aggregate(build(name, updates), updates)
    assert set(out) == set(LAYOUT)
    for k, shape in LAYOUT.items():
        assert out[k].shape == shape and out[k].dtype == MIXED_DTYPES[k], k
        assert bool(torch.isfinite(out[k]).all()), k
    for d, b in zip(deltas, before, strict=True):
        assert all(torch.equal(d[k], b[k]) for k in d)


# --------------------------------------------------------------------------- robustness


def honest_and_byzantine(
    attack: str, n_honest: int = 10, n_byzantine: int = 2
) -> tuple[list[ClientUpdate], TensorDict]:
    gen = torch.Generator().manual_seed(1234)
    base = {k: torch.randn(s, generator=gen) + 1.0 for k, s in LAYOUT.items()}
    honest = [
        {k: t + 0.1 * torch.randn(t.shape, generator=gen) for k, t in base.items()} for _ in range(n_honest)
    ]
    if attack == "constant":
        byzantine = [{k: torch.full(s, 1e6) for k, s in LAYOUT.items()} for _ in range(n_byzantine)]
    elif attack == "sign_flip":
        byzantine = [apply_attack("sign_flip", honest[0], scale=1e6) for _ in range(n_byzantine)]
    else:
        byzantine = [apply_attack("scale", honest[0], factor=1e6) for _ in range(n_byzantine)]
    return make_updates(honest + byzantine, [100] * (n_honest + n_byzantine)), unweighted_mean(honest)


ROBUST: dict[str, dict[str, Any]] = {
    "median": {},
    "trimmed_mean": {"trim_ratio": 0.2},
    "krum": {"num_byzantine": 2},
    "multi_krum": {"num_byzantine": 2},
    "norm_bounded": {},
    "fltrust": {},
}


@pytest.mark.parametrize("attack", ["constant", "sign_flip", "scale"])
@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_rules_resist_huge_byzantine_updates(name: str, attack: str) -> None:
    updates, honest_mean = honest_and_byzantine(attack)
    agg = build_aggregator(name, **ROBUST[name])
    if isinstance(agg, FLTrust):
        agg.set_root_update({k: t + 0.05 for k, t in honest_mean.items()})  # a root data set is not exact
    out = aggregate(agg, updates)
    error = float((flat(out) - flat(honest_mean)).norm())
    if name == "norm_bounded":
        # Clipping keeps the Byzantine deltas in the (equally weighted) mean but caps each at the median
        # norm B: error <= (f/n) * (B + |honest mean|) + (n_h/n) * max_h (|h| - B)+, about 1.9 here.
        norms = [float(flat(u.delta).norm()) for u in updates]
        b, n, f = statistics.median(norms), len(updates), 2
        tolerance = f / n * (b + float(flat(honest_mean).norm())) + (n - f) / n * max(
            max(x - b, 0.0) for x in norms[: n - f]
        )
    else:
        # These drop the Byzantine deltas: what is left is the honest deltas' own spread around their
        # mean, 0.1 * sqrt(22) ~ 0.47 per delta.
        tolerance = 0.5
    assert error < tolerance, (error, tolerance)


@pytest.mark.parametrize("attack", ["constant", "sign_flip", "scale"])
def test_fedavg_is_not_robust(attack: str) -> None:
    updates, honest_mean = honest_and_byzantine(attack)
    out = aggregate(build_aggregator("fedavg"), updates)
    assert float((flat(out) - flat(honest_mean)).norm()) > 1e4


# --------------------------------------------------------------------------- median


def test_median_odd_and_even() -> None:
    assert aggregate(build_aggregator("median"), scalar_updates([1.0, 100.0, 2.0]))["w"].item() == 2.0
    assert aggregate(build_aggregator("median"), scalar_updates([3.0, 1.0, 100.0, 2.0]))["w"].item() == 2.5


def test_median_is_coordinate_wise_and_ignores_example_counts() -> None:
    deltas = [
        {"w": torch.tensor([[1.0, 9.0], [5.0, -1.0]])},
        {"w": torch.tensor([[2.0, 8.0], [4.0, -2.0]])},
        {"w": torch.tensor([[3.0, 7.0], [6.0, -3.0]])},
    ]
    out = aggregate(build_aggregator("median"), make_updates(deltas, [1, 1, 10_000]))
    assert torch.equal(out["w"], torch.tensor([[2.0, 8.0], [5.0, -2.0]]))


# --------------------------------------------------------------------------- trimmed mean


def test_trimmed_mean_hand_worked() -> None:
    values = [4.0, 100.0, 1.0, 3.0, 2.0]
    assert (
        aggregate(build_aggregator("trimmed_mean", trim_ratio=0.2), scalar_updates(values))["w"].item() == 3.0
    )
    assert (
        aggregate(build_aggregator("trimmed_mean", trim_ratio=0.0), scalar_updates(values))["w"].item()
        == 22.0
    )
    # 0.19 * 5 < 1: nothing trimmed, plain mean.
    assert (
        aggregate(build_aggregator("trimmed_mean", trim_ratio=0.19), scalar_updates(values))["w"].item()
        == 22.0
    )


@pytest.mark.parametrize(
    ("ratio", "n", "expected"), [(0.29, 100, 29), (0.1, 10, 1), (0.2, 4, 0), (0.49, 3, 1)]
)
def test_trim_count_is_what_the_config_says(ratio: float, n: int, expected: int) -> None:
    assert trim_count(ratio, n) == expected


@pytest.mark.parametrize("bad", [0.5, 0.7, -0.1, math.nan, math.inf, "0.1", True, None])
def test_trimmed_mean_rejects_bad_ratio(bad: Any) -> None:
    with pytest.raises(ValueError, match="trim_ratio") as info:
        build_aggregator("trimmed_mean", trim_ratio=bad)
    assert f"got {bad!r}" in str(info.value)


# --------------------------------------------------------------------------- Krum


def test_krum_hand_worked() -> None:
    # f=1, n=5: each score sums the n-f-2 = 2 smallest squared distances to the others.
    # 0: 1 + 6.25 = 7.25;  1: 1 + 2.25 = 3.25;  2.5: 0.25 + 2.25 = 2.5;  3: 0.25 + 4 = 4.25;  100: huge.
    updates = scalar_updates([0.0, 1.0, 2.5, 3.0, 100.0], num_examples=[1, 1, 2, 1, 1000])
    assert aggregate(build_aggregator("krum", num_byzantine=1), updates)["w"].item() == 2.5
    assert krum_select(updates, num_byzantine=1, num_selected=3) == [2, 1, 3]
    # multi-Krum, m=3: (2 * 2.5 + 1 * 1 + 1 * 3) / 4, weighted by example counts.
    multi = build_aggregator("multi_krum", num_byzantine=1, num_selected=3)
    assert aggregate(multi, updates)["w"].item() == 2.25
    # m = n - f by default: everything but the outlier, (0 + 1 + 5 + 3) / 5.
    assert aggregate(build_aggregator("multi_krum", num_byzantine=1), updates)["w"].item() == 1.8


def test_krum_distances_span_all_tensors() -> None:
    # On "a" alone silo-00 looks like the outlier; over the concatenation silo-03 is far from everyone.
    deltas = [
        {"a": torch.tensor([0.0]), "b": torch.tensor([0.0, 0.0])},
        {"a": torch.tensor([0.1]), "b": torch.tensor([0.0, 0.0])},
        {"a": torch.tensor([0.2]), "b": torch.tensor([0.0, 0.1])},
        {"a": torch.tensor([0.1]), "b": torch.tensor([50.0, 0.0])},
    ]
    updates = make_updates(deltas)
    assert krum_select(updates, num_byzantine=0, num_selected=4)[-1] == 3
    expected = (
        torch.cdist(torch.stack([flat(d) for d in deltas]), torch.stack([flat(d) for d in deltas])) ** 2
    )
    torch.testing.assert_close(pairwise_sq_distances(updates), expected)


def naive_krum_scores(updates: Sequence[ClientUpdate], f: int) -> dict[str, float]:
    """Obviously-correct reference: Python loops over the concatenated vectors."""
    vectors = [flat(u.delta).tolist() for u in updates]
    scores = {}
    for i, x in enumerate(vectors):
        dists = sorted(
            math.fsum((a - b) ** 2 for a, b in zip(x, y, strict=True))
            for j, y in enumerate(vectors)
            if j != i
        )
        scores[updates[i].silo] = math.fsum(dists[: len(updates) - f - 2])
    return scores


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_krum_selection_matches_naive_reference(data: st.DataObject) -> None:
    f = data.draw(st.integers(0, 2))
    updates = data.draw(updates_strategy(2 * f + 3, 2 * f + 5))
    m = data.draw(st.integers(1, len(updates) - f))
    chosen = [updates[i].silo for i in krum_select(updates, num_byzantine=f, num_selected=m)]
    scores = naive_krum_scores(updates, f)
    assert len(set(chosen)) == m
    # Every selected update scores no worse than every rejected one (up to float64 rounding of
    # scores that tie in exact arithmetic), and the selection comes best first.
    worst_chosen = max(scores[s] for s in chosen)
    for silo, score in scores.items():
        if silo not in chosen:
            assert worst_chosen <= score * (1 + 1e-9) + 1e-9, (chosen, scores)
    chosen_scores = [scores[s] for s in chosen]
    assert all(a <= b * (1 + 1e-9) + 1e-9 for a, b in itertools.pairwise(chosen_scores))


def test_krum_ties_are_broken_by_silo_name() -> None:
    # n=3, f=0: one neighbour each; every score is 1, so the lexicographically first silo wins.
    deltas = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([-1.0])}, {"w": torch.tensor([0.0])}]
    updates = make_updates(deltas)
    for perm in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        out = aggregate(build_aggregator("krum", num_byzantine=0), [updates[i] for i in perm])
        assert out["w"].item() == 1.0


def test_krum_refuses_too_few_silos_and_too_many_selected() -> None:
    updates = scalar_updates([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(ValueError, match=r"num_byzantine=2 needs at least 2\*f\+3 = 7 updates .*got 6"):
        aggregate(build_aggregator("krum", num_byzantine=2), updates)
    with pytest.raises(ValueError, match=r"num_selected=6 exceeds n - num_byzantine = 5"):
        aggregate(build_aggregator("multi_krum", num_byzantine=1, num_selected=6), updates)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("krum", {"num_byzantine": -1}, r"num_byzantine must be an integer >= 0, got -1"),
        ("krum", {"num_byzantine": 1.5}, r"num_byzantine must be an integer >= 0, got 1.5"),
        ("krum", {"num_byzantine": True}, r"num_byzantine .* got True"),
        ("krum", {"num_byzantine": 1, "num_selected": 0}, r"num_selected must be an integer >= 1, got 0"),
        ("multi_krum", {"num_byzantine": 1, "num_selected": -2}, r"num_selected .* got -2"),
    ],
)
def test_krum_rejects_bad_options(name: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_aggregator(name, **options)


def test_krum_requires_num_byzantine() -> None:
    with pytest.raises(TypeError, match="num_byzantine"):
        build_aggregator("krum")


# --------------------------------------------------------------------------- norm-bounded


def test_norm_bounded_hand_worked() -> None:
    deltas = [
        {"w": torch.tensor([3.0, 4.0])},
        {"w": torch.tensor([0.0, 0.0])},
        {"w": torch.tensor([6.0, 8.0])},
    ]
    updates = make_updates(deltas, [1, 1, 2])
    # norms 5, 0, 10; bound 5 (explicit, and the median): [6, 8] -> [3, 4]; ([3,4] + 0 + 2*[3,4]) / 4.
    for agg in (build_aggregator("norm_bounded", max_norm=5.0), build_aggregator("norm_bounded")):
        torch.testing.assert_close(aggregate(agg, updates)["w"], torch.tensor([2.25, 3.0]))
    # A large bound clips nothing: plain FedAvg.
    out = aggregate(build_aggregator("norm_bounded", max_norm=100), updates)
    torch.testing.assert_close(out["w"], torch.tensor([3.75, 5.0]))


def test_norm_bounded_uses_the_global_norm_over_all_tensors() -> None:
    # norm over both tensors is 13 (5, 12); clipped to 6.5 both halve.
    updates = make_updates([{"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([12.0])}])
    out = aggregate(build_aggregator("norm_bounded", max_norm=6.5), updates)
    torch.testing.assert_close(out["a"], torch.tensor([1.5, 2.0]))
    torch.testing.assert_close(out["b"], torch.tensor([6.0]))


def test_norm_bounded_zero_norms_do_not_divide_by_zero() -> None:
    # median norm 0: the non-zero update is clipped to 0, the zero ones stay 0; no NaN anywhere.
    deltas = [{"w": torch.zeros(3)}, {"w": torch.zeros(3)}, {"w": torch.tensor([1.0, 2.0, 3.0])}]
    out = aggregate(build_aggregator("norm_bounded"), make_updates(deltas))
    assert torch.equal(out["w"], torch.zeros(3))
    out = aggregate(build_aggregator("norm_bounded", max_norm=1e-3), make_updates(deltas[:2]))
    assert torch.equal(out["w"], torch.zeros(3))


@PROPERTY_SETTINGS
@given(updates=updates_strategy(1, 5), max_norm=st.floats(1e-3, 1e3))
def test_norm_bounded_output_norm_is_at_most_the_bound(updates: list[ClientUpdate], max_norm: float) -> None:
    out = aggregate(build_aggregator("norm_bounded", max_norm=max_norm), updates)
    assert float(flat(out).norm()) <= max_norm * (1 + 1e-5)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "1", True])
def test_norm_bounded_rejects_bad_max_norm(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"max_norm must be"):
        build_aggregator("norm_bounded", max_norm=bad)


# --------------------------------------------------------------------------- FLTrust


def fltrust() -> FLTrust:
    agg = build_aggregator("fltrust")
    assert isinstance(agg, FLTrust)
    return agg


def test_fltrust_hand_worked() -> None:
    deltas = [
        {"w": torch.tensor([2.0, 0.0])},  # cos 1: trust 1, rescaled to [1, 0]
        {"w": torch.tensor([0.0, 3.0])},  # cos 0: trust 0
        {"w": torch.tensor([-1.0, 0.0])},  # cos -1: trust 0
        {"w": torch.tensor([1.0, 1.0])},  # cos 1/sqrt2: rescaled to [1/sqrt2, 1/sqrt2]
    ]
    agg = fltrust()
    agg.set_root_update({"w": torch.tensor([1.0, 0.0])})
    out = aggregate(agg, make_updates(deltas, [1, 1000, 1000, 1]))
    r = 1 / math.sqrt(2)
    expected = torch.tensor([(1.0 + r * r) / (1.0 + r), (r * r) / (1.0 + r)])
    torch.testing.assert_close(out["w"], expected)


def test_fltrust_output_has_the_root_norm_and_ignores_example_counts() -> None:
    deltas = [{"w": torch.tensor([10.0, 0.0])}, {"w": torch.tensor([0.0, 0.5])}]
    agg = fltrust()
    agg.set_root_update({"w": torch.tensor([2.0, 2.0])})
    out = aggregate(agg, make_updates(deltas, [1, 10_000]))
    # equal trust (cos = 1/sqrt2 each), both rescaled to norm sqrt(8): mean of [sqrt8, 0] and [0, sqrt8].
    torch.testing.assert_close(out["w"], torch.tensor([math.sqrt(2), math.sqrt(2)]))


def test_fltrust_all_distrusted_gives_zero() -> None:
    deltas = [{"w": torch.tensor([-1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}]
    agg = fltrust()
    agg.set_root_update({"w": torch.tensor([1.0, 0.0])})
    assert torch.equal(aggregate(agg, make_updates(deltas))["w"], torch.zeros(2))
    agg.set_root_update({"w": torch.zeros(2)})  # a zero root trusts nobody
    assert torch.equal(aggregate(agg, make_updates(deltas))["w"], torch.zeros(2))


def test_fltrust_requires_a_fresh_root_update_every_round() -> None:
    updates = scalar_updates([1.0, 2.0])
    agg = fltrust()
    with pytest.raises(RuntimeError, match="set_root_update"):
        aggregate(agg, updates)
    agg.set_root_update({"w": torch.tensor([1.0])})
    torch.testing.assert_close(aggregate(agg, updates)["w"], torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="set_root_update"):
        aggregate(agg, updates)


def test_fltrust_rejects_bad_root_updates() -> None:
    agg = fltrust()
    with pytest.raises(ValueError, match="'w' has non-finite"):
        agg.set_root_update({"w": torch.tensor([math.nan])})
    with pytest.raises(ValueError, match="'w' must be a floating-point tensor"):
        agg.set_root_update({"w": torch.tensor([1])})
    agg.set_root_update({"v": torch.tensor([1.0])})
    with pytest.raises(ValueError, match=r"missing \['w'\], unexpected \['v'\]"):
        aggregate(agg, scalar_updates([1.0]))
    agg.set_root_update({"w": torch.tensor([1.0, 2.0])})
    with pytest.raises(ValueError, match=r"'w' has shape \(2,\)"):
        aggregate(agg, scalar_updates([1.0]))


def test_fltrust_constructor_takes_no_data() -> None:
    with pytest.raises(TypeError):
        build_aggregator("fltrust", root_update={"w": torch.zeros(1)})
