from __future__ import annotations

import pytest
import torch

from silotune.aggregation import ClientUpdate, aggregate, build_aggregator
from silotune.errors import UpdateError


def _u(silo: str, value: float, n: int, **extra) -> ClientUpdate:
    delta = {"a.lora_A.weight": torch.full((2, 3), value), "a.lora_B.weight": torch.full((3, 2), -value)}
    delta.update(extra)
    return ClientUpdate(silo=silo, delta=delta, num_examples=n)


def test_weighted_by_examples_hand_worked() -> None:
    out = aggregate(build_aggregator("fedavg"), [_u("a", 1.0, 1), _u("b", 4.0, 3)])
    assert torch.allclose(out["a.lora_A.weight"], torch.full((2, 3), 3.25))  # (1*1 + 4*3) / 4
    unweighted = aggregate(build_aggregator("fedavg", weighted=False), [_u("a", 1.0, 1), _u("b", 4.0, 3)])
    assert torch.allclose(unweighted["a.lora_A.weight"], torch.full((2, 3), 2.5))


def test_result_does_not_depend_on_arrival_order() -> None:
    gen = torch.Generator().manual_seed(0)
    ups = [ClientUpdate(f"s{i}", {"w": torch.randn(50, generator=gen)}, i + 1) for i in range(5)]
    a = aggregate(build_aggregator("fedavg"), ups)
    b = aggregate(build_aggregator("fedavg"), ups[::-1])
    assert torch.equal(a["w"], b["w"])


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (
            ClientUpdate(
                "evil", {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.ones(3, 3)}, 1
            ),
            "silo 'evil', tensor 'a.lora_B.weight': shape (3, 3)",
        ),
        (
            ClientUpdate(
                "evil",
                {"a.lora_A.weight": torch.ones(2, 3, dtype=torch.int64), "a.lora_B.weight": torch.ones(3, 2)},
                1,
            ),
            "not floating point",
        ),
        (
            ClientUpdate(
                "evil",
                {"a.lora_A.weight": torch.full((2, 3), float("nan")), "a.lora_B.weight": torch.ones(3, 2)},
                1,
            ),
            "6 non-finite",
        ),
        (ClientUpdate("evil", {"a.lora_A.weight": torch.ones(2, 3)}, 1), "missing tensors: a.lora_B.weight"),
        (_u("evil", 1.0, 1, extra=torch.ones(1)), "unexpected tensors: extra"),
        (_u("evil", 1.0, 0), "num_examples must be a positive integer"),
        (
            ClientUpdate(
                "evil",
                {
                    "a.lora_A.weight": torch.ones(2, 3, dtype=torch.float64),
                    "a.lora_B.weight": torch.ones(3, 2),
                },
                1,
            ),
            "dtype torch.float64 differs",
        ),
        (_u("a", 2.0, 1), "more than one update"),
    ],
)
def test_malformed_updates_name_silo_and_tensor(bad: ClientUpdate, needle: str) -> None:
    with pytest.raises(UpdateError) as err:
        aggregate(build_aggregator("fedavg"), [_u("a", 1.0, 1), bad])
    assert needle in str(err.value)


def test_unknown_aggregator_lists_known_ones() -> None:
    with pytest.raises(KeyError, match=r"known: .*fedavg"):
        build_aggregator("average-ish")
    with pytest.raises(TypeError, match="fedavg"):
        build_aggregator("fedavg", momentum=0.9)
