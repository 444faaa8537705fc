"""SCAFFOLD (silotune.aggregation.scaffold): the variate math by hand, the corrected step, the config.

Integration through rounds (plaintext, secure aggregation, crash and resume) is in
tests/integration/test_scaffold_rounds.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from silotune.aggregation import scaffold
from silotune.config import parse_config
from silotune.errors import ConfigError


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_option_ii_variate_update_matches_a_hand_computation() -> None:
    # K = 2 steps of η = 0.1: K·η = 0.2.
    c_i = {"w": _t(1.0, -2.0)}
    c = {"w": _t(0.5, 0.5)}
    delta = {"w": _t(-0.2, 0.1)}  # y_i - x
    new, delta_c = scaffold.silo_update(c_i, c, delta, steps=2, lr=0.1)
    # c_i+ = c_i - c + (x - y_i)/(Kη) = [1 - 0.5 + 0.2/0.2, -2 - 0.5 - 0.1/0.2] = [1.5, -3.0]
    assert torch.allclose(new["w"], _t(1.5, -3.0))
    # Δc_i = c_i+ - c_i = [0.5, -1.0], which is also -c - Δy/(Kη): no information beyond Δy and c
    assert torch.allclose(delta_c["w"], _t(0.5, -1.0))
    assert torch.allclose(delta_c["w"], -c["w"] - delta["w"] / 0.2)
    # the server: c + (|S|/N)·mean Δc, one silo of two included
    assert torch.allclose(scaffold.server_update(c, delta_c, included=1, total=2)["w"], _t(0.75, 0.0))
    assert torch.allclose(scaffold.server_update(c, delta_c, included=2, total=2)["w"], _t(1.0, -0.5))
    # the correction every local step subtracts (times η): c - c_i
    assert torch.allclose(scaffold.correction(c, c_i)["w"], _t(-0.5, 2.5))


def test_framing_carries_k_eta_delta_c_and_splits_back() -> None:
    delta = {"a": _t(0.01, -0.02), "b": _t(0.03)}
    delta_c = {"a": _t(0.5, -1.0), "b": _t(2.0)}
    framed = scaffold.frame(delta, delta_c, steps=10, lr=2e-3)
    assert set(framed) == {"a", "b", "scaffold.control/a", "scaffold.control/b"}
    assert torch.allclose(framed["scaffold.control/a"], _t(0.01, -0.02))  # K·η·Δc: delta-sized
    model, control = scaffold.split(framed, steps=10, lr=2e-3)
    assert model.keys() == delta.keys() and all(torch.equal(model[k], delta[k]) for k in delta)
    assert all(torch.allclose(control[k], delta_c[k]) for k in delta_c)
    # A sum of framed updates splits into the sums (what masking and FedAvg compute).
    other = scaffold.frame(delta, {k: -v for k, v in delta_c.items()}, steps=10, lr=2e-3)
    _, summed = scaffold.split({k: framed[k] + other[k] for k in framed}, steps=10, lr=2e-3)
    assert all(float(v.abs().max()) < 1e-6 for v in summed.values())
    with pytest.raises(ValueError, match="different tensors"):
        scaffold.split({"a": _t(1.0), "scaffold.control/b": _t(1.0)}, steps=1, lr=1.0)


def test_corrected_optimizer_steps_are_sgd_on_the_corrected_gradient() -> None:
    """With SGD the post-step hook gives exactly y <- y - η (g - c_i + c), step after step."""
    torch.manual_seed(0)
    target = torch.randn(5)
    c, c_i = {"w": torch.randn(5)}, {"w": torch.randn(5)}
    lr, steps = 0.05, 4
    w = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD([w], lr=lr)
    handle = scaffold.attach_correction(opt, [w], [scaffold.correction(c, c_i)["w"]], lr)
    ref = torch.zeros(5)
    for _ in range(steps):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
        g = 2 * (ref - target)
        ref = ref - lr * (g - c_i["w"] + c["w"])
    handle.remove()
    assert torch.allclose(w.detach(), ref, atol=1e-6)
    # Option II then recovers the mean corrected direction: c_i+ = c_i - c + (x - y)/(Kη).
    new, _ = scaffold.silo_update(c_i, c, {"w": w.detach()}, steps=steps, lr=lr)
    assert torch.allclose(new["w"], c_i["w"] - c["w"] - w.detach() / (steps * lr), atol=1e-6)
    # Removed: a further step is plain SGD.
    before = w.detach().clone()
    opt.zero_grad()
    ((w - target) ** 2).sum().backward()
    opt.step()
    assert torch.allclose(w.detach(), before - lr * 2 * (before - target), atol=1e-6)


def test_variates_are_checked_against_the_exchanged_tensors() -> None:
    ref = {"w": torch.zeros(2, 3)}
    scaffold.check_variate(scaffold.zeros(ref), ref, "c")
    for bad, what in (
        ({"w": torch.zeros(3, 2)}, "shape"),
        ({"v": torch.zeros(2, 3)}, "do not match"),
        ({"w": torch.full((2, 3), float("nan"))}, "non-finite"),
    ):
        with pytest.raises(ValueError, match=what):
            scaffold.check_variate(bad, ref, "c")


def _raw(**sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "federation_id": "sc",
        "model": {"name_or_path": "tiny-llama"},
        "silos": [{"name": "a", "train_path": "a.jsonl"}, {"name": "b", "train_path": "b.jsonl"}],
        "aggregation": {"algorithm": "scaffold"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"aggregation": {"name": "median"}}, "aggregation.algorithm: scaffold updates the server variate"),
        (
            {"security": {"protection": "ckks"}},
            "aggregation.algorithm: scaffold updates the server variate from",
        ),
        ({"method": {"name": "ia3"}}, "corrects LoRA parameters; method(s) ['ia3']"),
        ({"train": {"processes": 2}}, "set train.processes: 1"),
    ],
)
def test_config_refuses_what_scaffold_cannot_run_with(sections: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_raw(**sections))
    assert message in str(err.value)


def test_config_accepts_scaffold_with_secagg_and_dp_and_keeps_old_fingerprints() -> None:
    cfg = parse_config(
        _raw(
            security={"protection": "secagg"},
            privacy={"client_dp": {"clip_norm": 0.1, "noise_multiplier": 0.5, "delta": 1e-3}},
        )
    )
    assert cfg.aggregation.algorithm == "scaffold"
    plain = parse_config({**_raw(), "aggregation": {}})
    explicit = parse_config({**_raw(), "aggregation": {"algorithm": "fedavg"}})
    assert plain.fingerprint() == explicit.fingerprint()  # the default stays out of the hash
    assert parse_config(_raw()).fingerprint() != plain.fingerprint()
