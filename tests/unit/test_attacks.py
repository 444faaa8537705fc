"""Model-poisoning transforms: pure, shape- and dtype-preserving, reproducible."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from silotune.aggregation import ClientUpdate, aggregate, build_aggregator
from silotune.attacks import ATTACKS, apply_attack, free_rider, gaussian, nan, scale, sign_flip
from silotune.errors import RegistryError, UpdateError

DTYPES = {"a": torch.float32, "b": torch.bfloat16, "c": torch.float64}
SHAPES = {"a": (2, 3), "b": (4,), "c": (1, 2, 2)}


def honest(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(SHAPES[k], generator=gen).to(DTYPES[k]) for k in SHAPES}


def default_options(name: str) -> dict[str, Any]:
    options: dict[str, dict[str, Any]] = {
        "sign_flip": {"scale": 2.0},
        "scale": {"factor": 10.0},
        "gaussian": {"std": 1.0, "generator": torch.Generator().manual_seed(0)},
    }
    return options.get(name, {})


def test_registry_lists_every_attack() -> None:
    assert ATTACKS.names() == ["free_rider", "gaussian", "nan", "scale", "sign_flip"]


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attacks_preserve_layout_and_leave_the_input_alone(name: str) -> None:
    delta = honest()
    before = {k: t.clone() for k, t in delta.items()}
    out = apply_attack(name, delta, **default_options(name))
    assert list(out) == list(delta)
    for k, t in delta.items():
        assert out[k].shape == t.shape and out[k].dtype == t.dtype, k
        assert out[k].data_ptr() != t.data_ptr(), k
        assert torch.equal(t, before[k]), k


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, width=32), min_size=6, max_size=6),
    factor=st.floats(-1e3, 1e3),
)
def test_sign_flip_and_scale(values: list[float], factor: float) -> None:
    delta = {"w": torch.tensor(values).reshape(2, 3)}
    expected = (delta["w"].double() * factor).float()
    assert torch.equal(scale(delta, factor)["w"], expected)
    assert torch.equal(sign_flip(delta, -factor)["w"], expected)
    assert torch.equal(sign_flip(delta)["w"], -delta["w"])


def test_gaussian_is_reproducible_and_ignores_the_honest_values() -> None:
    a = gaussian(honest(0), 0.5, generator=torch.Generator().manual_seed(7))
    b = gaussian(honest(1), 0.5, generator=torch.Generator().manual_seed(7))
    c = gaussian(honest(0), 0.5, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)
    assert not all(torch.equal(a[k], c[k]) for k in SHAPES)
    # Key order of the dict does not change which noise each tensor gets.
    reordered = {k: honest(0)[k] for k in reversed(SHAPES)}
    d = gaussian(reordered, 0.5, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], d[k]) for k in SHAPES)
    assert all(not torch.equal(a[k], torch.zeros_like(a[k])) for k in SHAPES)


def test_gaussian_has_the_requested_spread() -> None:
    out = gaussian({"w": torch.zeros(20_000)}, 3.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(out["w"].mean())) < 0.1
    assert float(out["w"].std()) == pytest.approx(3.0, rel=0.03)
    zero = gaussian({"w": torch.ones(5)}, 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(zero["w"], torch.zeros(5))


def test_nan_and_free_rider() -> None:
    delta = honest()
    assert all(bool(torch.isnan(t).all()) for t in nan(delta).values())
    assert all(torch.equal(t, torch.zeros_like(t)) for t in free_rider(delta).values())


def test_nan_attack_is_rejected_by_aggregation() -> None:
    delta = honest()
    updates = [
        ClientUpdate(silo="honest", delta=delta, num_examples=10),
        ClientUpdate(silo="mallory", delta=apply_attack("nan", delta), num_examples=10),
    ]
    with pytest.raises(UpdateError, match="silo 'mallory'") as info:
        aggregate(build_aggregator("median"), updates)
    assert info.value.silo == "mallory"


def test_unknown_attack_lists_the_known_ones() -> None:
    with pytest.raises(RegistryError, match=r"unknown attack 'backdoor'; known: free_rider, gaussian"):
        apply_attack("backdoor", honest())


def test_unknown_option_is_a_type_error_naming_the_attack() -> None:
    with pytest.raises(TypeError, match=r"attack 'scale'.*fator"):
        apply_attack("scale", honest(), fator=2.0)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("scale", {"factor": math.inf}, r"factor must be a finite number, got inf"),
        ("sign_flip", {"scale": math.nan}, r"scale must be a finite number, got nan"),
        (
            "gaussian",
            {"std": -1.0, "generator": torch.Generator()},
            r"std must be a finite number >= 0, got -1.0",
        ),
        ("gaussian", {"std": 1.0, "generator": 0}, r"generator must be a torch.Generator, got int"),
    ],
)
def test_bad_options_are_rejected(name: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_attack(name, honest(), **options)
