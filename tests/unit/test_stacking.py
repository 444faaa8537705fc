"""FLoRA stacking: the stacked product equals the weighted sum of the silos' products, exactly."""

from __future__ import annotations

import pytest
import torch

from silotune.aggregation.stacking import adapter_rank, dense_updates, lora_modules, stack_lora

MODULES = ("layers.0.q_proj", "layers.0.v_proj")
IN, OUT = 5, 4


def adapter(rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Integer-valued float64 factors: every product and weighted sum below is exact in float64."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODULES:
        out[f"{m}.lora_A.weight"] = torch.randint(-3, 4, (rank, IN), generator=gen).to(torch.float64)
        out[f"{m}.lora_B.weight"] = torch.randint(-3, 4, (OUT, rank), generator=gen).to(torch.float64)
    return out


def test_heterogeneous_ranks_stack_exactly() -> None:
    ranks = (2, 4, 8)
    states = [adapter(r, seed=i) for i, r in enumerate(ranks)]
    weights = [0.5, 0.25, 0.25]  # dyadic: exact in binary
    scalings = [16 / r for r in ranks]  # alpha / r with alpha = 16
    stacked = stack_lora(states, weights, scalings=scalings, target_scaling=2.0)
    assert adapter_rank(stacked) == sum(ranks)
    got = dense_updates(stacked, scaling=2.0)
    for m in MODULES:
        expected = sum(
            w * s * (st[f"{m}.lora_B.weight"] @ st[f"{m}.lora_A.weight"])
            for st, w, s in zip(states, weights, scalings, strict=True)
        )
        assert torch.equal(got[m], expected), m
        assert stacked[f"{m}.lora_A.weight"].shape == (sum(ranks), IN)
        assert stacked[f"{m}.lora_B.weight"].shape == (OUT, sum(ranks))


def test_averaging_factors_is_not_averaging_updates() -> None:
    a, b = adapter(4, seed=1), adapter(4, seed=2)
    m = MODULES[0]
    naive = ((a[f"{m}.lora_B.weight"] + b[f"{m}.lora_B.weight"]) / 2) @ (
        (a[f"{m}.lora_A.weight"] + b[f"{m}.lora_A.weight"]) / 2
    )
    stacked = dense_updates(stack_lora([a, b], [0.5, 0.5], scalings=[1.0, 1.0]), scaling=1.0)[m]
    exact = (
        a[f"{m}.lora_B.weight"] @ a[f"{m}.lora_A.weight"] + b[f"{m}.lora_B.weight"] @ b[f"{m}.lora_A.weight"]
    ) / 2
    assert torch.equal(stacked, exact)
    assert not torch.allclose(naive, exact)


def test_single_adapter_stacks_to_itself_and_keeps_dtype() -> None:
    st = {k: v.to(torch.float32) for k, v in adapter(3, seed=0).items()}
    out = stack_lora([st], [1.0], scalings=[1.0])
    assert all(torch.equal(out[k], st[k]) and out[k].dtype == torch.float32 for k in st)


@pytest.mark.parametrize(
    ("states", "match"),
    [
        ([], "empty"),
        ([{"x.lora_A.weight": torch.zeros(2, 3)}], "unpaired"),
        ([{"x.bias": torch.zeros(2)}], "not LoRA factors"),
        (
            [{"x.lora_A.weight": torch.zeros(2, 3), "x.lora_B.weight": torch.zeros(4, 3)}],
            "rank 2 but lora_B has rank 3",
        ),
    ],
)
def test_malformed_adapters_are_refused(states, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stack_lora(states, [1.0] * len(states), scalings=[1.0] * len(states))


def test_mismatched_modules_shapes_and_counts_are_refused() -> None:
    a, b = adapter(2, 0), adapter(2, 1)
    with pytest.raises(ValueError, match="one each"):
        stack_lora([a, b], [1.0], scalings=[1.0, 1.0])
    other = {k.replace("q_proj", "k_proj"): v for k, v in b.items()}
    with pytest.raises(ValueError, match="different modules"):
        stack_lora([a, other], [0.5, 0.5], scalings=[1.0, 1.0])
    wide = dict(b)
    wide[f"{MODULES[0]}.lora_A.weight"] = torch.zeros(2, IN + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="do not fit"):
        stack_lora([a, wide], [0.5, 0.5], scalings=[1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        stack_lora([a], [float("nan")], scalings=[1.0])
    assert lora_modules(a) == sorted(MODULES)
