"""Server optimizers: hand-worked steps, state round trips and option validation."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from silotune.aggregation import SERVER_OPTIMIZERS, ServerOptimizer, build_server_optimizer

LAYOUT: dict[str, tuple[int, ...]] = {"lora_A": (2, 3), "lora_B": (3,)}
ADAPTIVE = ["fedavgm", "fedadam", "fedyogi"]
OPTIONS: dict[str, dict[str, Any]] = {
    "fedavgm": {"lr": 0.5, "momentum": 0.9},
    "fedadam": {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
}
ELEMENTS = st.floats(-10, 10, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)


def tensors(values: list[float], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


@st.composite
def delta_strategy(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    return {
        k: tensors(draw(st.lists(ELEMENTS, min_size=math.prod(s), max_size=math.prod(s))), s)
        for k, s in LAYOUT.items()
    }


def scalar(x: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([x], dtype=torch.float64)}


@pytest.mark.parametrize("name", ADAPTIVE)
def test_registered_and_satisfies_the_protocol(name: str) -> None:
    assert name in SERVER_OPTIMIZERS
    opt = build_server_optimizer(name)
    assert opt.name == name
    assert isinstance(opt, ServerOptimizer)
    assert opt.state_dict() == {}


def test_fedavgm_without_momentum_is_fedavg() -> None:
    gen = torch.Generator().manual_seed(0)
    global_ = {k: torch.randn(s, generator=gen) for k, s in LAYOUT.items()}
    sgd, avgm = build_server_optimizer("sgd"), build_server_optimizer("fedavgm", lr=1.0, momentum=0.0)
    for _ in range(3):
        delta = {k: torch.randn(s, generator=gen) for k, s in LAYOUT.items()}
        expected, actual = sgd.step(global_, delta), avgm.step(global_, delta)
        for k in LAYOUT:
            assert torch.equal(actual[k], expected[k])
        global_ = actual


def test_fedavgm_hand_worked() -> None:
    opt = build_server_optimizer("fedavgm", lr=0.5, momentum=0.9)
    x = opt.step(scalar(1.0), scalar(2.0))  # v = 2; x = 1 + 0.5 * 2
    assert x["w"].item() == 2.0
    x = opt.step(x, scalar(-1.0))  # v = 0.9 * 2 - 1 = 0.8; x = 2 + 0.4
    assert x["w"].item() == pytest.approx(2.4, abs=1e-15)
    assert opt.state_dict()["momentum/w"].item() == pytest.approx(0.8, abs=1e-15)


def test_fedadam_hand_worked() -> None:
    opt = build_server_optimizer("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = opt.step(scalar(1.0), scalar(2.0))
    m, v = 0.1 * 2.0, 0.99 * 1e-6 + 0.01 * 4.0
    assert x["w"].item() == pytest.approx(1.0 + 0.1 * m / (math.sqrt(v) + 1e-3), rel=1e-14)
    x2 = opt.step(x, scalar(-1.0))
    m2, v2 = 0.9 * m + 0.1 * -1.0, 0.99 * v + 0.01 * 1.0
    assert x2["w"].item() == pytest.approx(x["w"].item() + 0.1 * m2 / (math.sqrt(v2) + 1e-3), rel=1e-14)
    state = opt.state_dict()
    assert state["m/w"].item() == pytest.approx(m2, rel=1e-14)
    assert state["v/w"].item() == pytest.approx(v2, rel=1e-14)


def test_fedyogi_hand_worked() -> None:
    opt = build_server_optimizer("fedyogi", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = opt.step(scalar(1.0), scalar(2.0))
    # v starts at tau^2 < delta^2 = 4, so it grows by (1 - beta2) * 4.
    m, v = 0.1 * 2.0, 1e-6 + 0.01 * 4.0
    assert x["w"].item() == pytest.approx(1.0 + 0.1 * m / (math.sqrt(v) + 1e-3), rel=1e-14)
    opt.step(x, scalar(0.1))
    # now v = 0.040001 > delta^2 = 0.01: it shrinks by (1 - beta2) * 0.01 only (Adam: by 0.01 * (v - 0.01)).
    assert opt.state_dict()["v/w"].item() == pytest.approx(v - 0.01 * 0.01, rel=1e-14)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
@settings(max_examples=25, deadline=None)
@given(global_=delta_strategy(), delta=delta_strategy())
def test_first_adaptive_step_moves_along_the_delta(
    name: str, global_: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]
) -> None:
    opt = build_server_optimizer(name, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    new = opt.step({k: t.double() for k, t in global_.items()}, delta)
    step = build_server_optimizer(name, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3).step(
        {k: torch.zeros(s, dtype=torch.float64) for k, s in LAYOUT.items()}, delta
    )
    for k in LAYOUT:
        # From zero the step itself is visible; added to a non-zero global it may round away entirely.
        assert torch.equal(torch.sign(step[k]), torch.sign(delta[k].double())), k
        moved = new[k] - global_[k].double()
        assert bool((moved * torch.sign(delta[k].double()) >= 0).all()), k
        # |m / (sqrt(v) + tau)| <= (1 - beta1) / sqrt(1 - beta2) on the first step.
        assert float(moved.abs().max()) <= 0.1 * 0.1 / math.sqrt(0.01) + 1e-12


@pytest.mark.parametrize("name", [*ADAPTIVE, "sgd"])
@settings(max_examples=15, deadline=None)
@given(global_=delta_strategy())
def test_zero_delta_on_the_first_step_leaves_the_global_unchanged(
    name: str, global_: dict[str, torch.Tensor]
) -> None:
    opt = build_server_optimizer(name)
    new = opt.step(global_, {k: torch.zeros_like(t) for k, t in global_.items()})
    for k in LAYOUT:
        assert torch.equal(new[k], global_[k])


def _roundtrip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, torch.Tensor] = torch.load(buffer, weights_only=True)
    return loaded


@pytest.mark.parametrize("name", ADAPTIVE)
@settings(max_examples=15, deadline=None)
@given(
    global_=delta_strategy(), deltas=st.lists(delta_strategy(), min_size=2, max_size=4), cut=st.integers(1, 3)
)
def test_restored_optimizer_continues_bit_identically(
    name: str, global_: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]], cut: int
) -> None:
    cut = min(cut, len(deltas) - 1)
    original = build_server_optimizer(name, **OPTIONS[name])
    x = global_
    for d in deltas[:cut]:
        x = original.step(x, d)
    state = original.state_dict()
    assert set(state) == {f"{p}/{k}" for p in _prefixes(name) for k in LAYOUT}
    restored = build_server_optimizer(name, **OPTIONS[name])
    restored.load_state_dict(_roundtrip(state))
    y = {k: t.clone() for k, t in x.items()}
    for d in deltas[cut:]:
        x, y = original.step(x, d), restored.step(y, d)
        for k in LAYOUT:
            assert torch.equal(x[k], y[k]), k
    final_original, final_restored = original.state_dict(), restored.state_dict()
    assert all(torch.equal(final_original[k], final_restored[k]) for k in final_original)


def _prefixes(name: str) -> tuple[str, ...]:
    return ("momentum",) if name == "fedavgm" else ("m", "v")


@pytest.mark.parametrize("name", ADAPTIVE)
def test_state_dict_is_a_copy_and_load_resets(name: str) -> None:
    opt = build_server_optimizer(name)
    x = {k: torch.ones(s) for k, s in LAYOUT.items()}
    opt.step(x, {k: torch.ones(s) for k, s in LAYOUT.items()})
    state = opt.state_dict()
    before = {k: t.clone() for k, t in state.items()}
    for t in state.values():
        t.fill_(123.0)
    assert all(torch.equal(opt.state_dict()[k], before[k]) for k in before)
    opt.load_state_dict({})
    assert opt.state_dict() == {}


def test_fedavgm_state_does_not_alias_the_callers_delta() -> None:
    opt = build_server_optimizer("fedavgm")
    delta = {"w": torch.tensor([1.0])}
    opt.step({"w": torch.tensor([0.0])}, delta)
    delta["w"].fill_(99.0)
    assert opt.state_dict()["momentum/w"].item() == 1.0


@pytest.mark.parametrize("name", ADAPTIVE)
def test_low_precision_globals_keep_float32_state(name: str) -> None:
    opt = build_server_optimizer(name)
    global_ = {"w": torch.ones(3, dtype=torch.bfloat16)}
    out = opt.step(global_, {"w": torch.full((3,), 0.5, dtype=torch.bfloat16)})
    assert out["w"].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in opt.state_dict().values())


@pytest.mark.parametrize(
    ("name", "state", "match"),
    [
        ("fedavgm", {"w": torch.zeros(1)}, r"state key 'w' is not of the form 'momentum/<tensor>'"),
        ("fedadam", {"m/w": torch.zeros(1)}, r"'m/' and 'v/' entries for different tensors: \['w'\]"),
        ("fedyogi", {"m/w": torch.zeros(1), "v/w": torch.zeros(2)}, r"'m/w' and 'v/w' differ in shape"),
        (
            "fedadam",
            {"m/w": torch.zeros(1, dtype=torch.int64), "v/w": torch.zeros(1)},
            r"'m/w' must be a floating",
        ),
        ("fedadam", {"x/w": torch.zeros(1)}, r"'x/w' is not of the form 'm/<tensor>', 'v/<tensor>'"),
    ],
)
def test_load_state_dict_rejects_malformed_state(
    name: str, state: dict[str, torch.Tensor], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build_server_optimizer(name).load_state_dict(state)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_step_rejects_mismatched_delta_and_state(name: str) -> None:
    opt = build_server_optimizer(name)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        opt.step({"a": torch.zeros(2), "b": torch.zeros(2)}, {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"delta tensor 'a' has shape \(3,\)"):
        opt.step({"a": torch.zeros(2)}, {"a": torch.zeros(3)})
    opt.step({"a": torch.zeros(2)}, {"a": torch.ones(2)})
    with pytest.raises(ValueError, match=r"no state for \['b'\]"):
        opt.step({"a": torch.zeros(2), "b": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.zeros(2)})


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("fedavgm", {"lr": 0.0}, r"lr must be a finite number in \(0, inf\), got 0.0"),
        ("fedavgm", {"momentum": 1.0}, r"momentum must be a finite number in \[0, 1\), got 1.0"),
        ("fedavgm", {"momentum": -0.1}, r"momentum .* got -0.1"),
        ("fedadam", {"lr": math.nan}, r"lr .* got nan"),
        ("fedadam", {"beta1": 1.0}, r"beta1 .* got 1.0"),
        ("fedadam", {"beta2": 1.5}, r"beta2 .* got 1.5"),
        ("fedyogi", {"tau": 0.0}, r"tau must be a finite number in \(0, inf\), got 0.0"),
        ("fedyogi", {"lr": "0.1"}, r"lr .* got '0.1'"),
        ("fedyogi", {"beta1": True}, r"beta1 .* got True"),
    ],
)
def test_rejects_bad_options(name: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_server_optimizer(name, **options)


def test_unknown_option_is_a_type_error_naming_the_optimizer() -> None:
    with pytest.raises(TypeError, match=r"server optimizer 'fedadam'.*eps"):
        build_server_optimizer("fedadam", eps=1e-8)


def _server_job(tmp_path: Any, name: str, round_: int) -> Any:
    from silotune.config import parse_config
    from silotune.protection.base import AggregationJob
    from silotune.records import ObjectRef
    from silotune.store import LocalStore

    config = parse_config(
        {
            "federation_id": "opt-state",
            "model": {"name_or_path": "tiny-llama"},
            "silos": [{"name": "a", "train_path": "x.jsonl"}],
            "aggregation": {"server_optimizer": name},
            "store": {"root": str(tmp_path)},
        }
    )
    ref = ObjectRef(key="unused", sha256="0" * 64)
    return AggregationJob(config, LocalStore(tmp_path), round_, ref, {}, {}, {}, 0.0)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_server_state_comes_from_the_committed_manifest(tmp_path: Any, name: str) -> None:
    """The state round r+1 continues from is the one round r's manifest names; missing or changed fails."""
    from silotune.errors import StoreError
    from silotune.protection.none import step_server
    from silotune.store import put_json

    g = {"w": torch.ones(3)}
    job = _server_job(tmp_path, name, 0)
    first = step_server(job, g, {"w": torch.full((3,), 0.5)}, ["a"])
    assert first.server_state is not None and first.server_state.key == job.layout.server_state(0)
    later = _server_job(tmp_path, name, 1)
    # No manifest and no state: a stateful optimizer refuses to start over silently.
    job.store.delete(first.server_state.key)
    with pytest.raises(StoreError, match="server optimizer state of round 1"):
        step_server(later, g, {"w": torch.full((3,), 0.5)}, ["a"])
    # A state that differs from the manifest's checksum (storage tampered with it) is refused.
    first = step_server(job, g, {"w": torch.full((3,), 0.5)}, ["a"])
    put_json(
        job.store, job.layout.manifest(0), {"objects": {"server_state": first.server_state.model_dump()}}
    )
    job.store.put(first.server_state.key, job.store.get(first.server_state.key)[:-1] + b" ")
    with pytest.raises(StoreError, match="sha256"):
        step_server(later, g, {"w": torch.full((3,), 0.5)}, ["a"])
