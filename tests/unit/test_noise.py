"""Keyed CSPRNG noise: determinism, key binding, distribution, Opacus integration, speed."""

from __future__ import annotations

import math
import struct
import time

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from silotune.privacy.noise import (
    KeyedNoiseDPOptimizer,
    add_gaussian_noise_keyed,
    derive_noise_key,
    gaussian_noise,
    seed_key,
    standard_normal,
    subkey,
    uniform,
)
from silotune.training import DPSGD, poisson_batches

SECRET = bytes(range(32))
INPUTS = {"global_sha256": "g" * 64, "config_fingerprint": "f" * 16, "data_sha256": "d" * 64}


def _key(**over):
    args = {"purpose": "client-dp", "federation_id": "fed", "round": 3, "silo": "clinic", "inputs": INPUTS}
    args.update(over)
    return derive_noise_key(SECRET, **args)


# -- key derivation --------------------------------------------------------------------------------


def test_noise_key_is_bound_to_every_input() -> None:
    base = _key()
    assert len(base) == 32 and base == _key()
    assert _key(inputs=dict(reversed(list(INPUTS.items())))) == base  # canonical: order does not matter
    variants = [
        _key(purpose="dp-sgd"),
        _key(federation_id="fed2"),
        _key(round=4),
        _key(silo="lab"),
        _key(inputs={**INPUTS, "global_sha256": "h" * 64}),  # the rewound round: another global
        _key(inputs={**INPUTS, "config_fingerprint": "e" * 16}),
        _key(inputs={**INPUTS, "data_sha256": "c" * 64}),
        _key(inputs={}),
        derive_noise_key(
            bytes(32), purpose="client-dp", federation_id="fed", round=3, silo="clinic", inputs=INPUTS
        ),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # no ambiguity from concatenation: moving characters between fields changes the key
    assert _key(federation_id="fe", silo="dclinic") != _key(federation_id="fed", silo="clinic")


def test_noise_key_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        derive_noise_key(b"short", purpose="p", federation_id="f", round=0, silo="s", inputs={})
    with pytest.raises(ValueError) as info:
        derive_noise_key(SECRET, purpose="", federation_id="f", round=-1, silo="s", inputs={"a": 1})  # type: ignore[dict-item]
    msg = str(info.value)
    assert "purpose" in msg and "round" in msg and "inputs" in msg
    with pytest.raises(ValueError, match="32 bytes"):
        gaussian_noise({"a": (2,)}, 1.0, b"x" * 31)
    with pytest.raises(ValueError, match="std"):
        gaussian_noise({"a": (2,)}, -1.0, _key())
    with pytest.raises(ValueError, match="std"):
        gaussian_noise({"a": (2,)}, float("nan"), _key())
    with pytest.raises(ValueError, match="floating point"):
        gaussian_noise({"a": torch.zeros(2, dtype=torch.int64)}, 1.0, _key())


# -- the generator ---------------------------------------------------------------------------------


def test_first_draws_follow_chacha20_and_box_muller_exactly() -> None:
    """An independent re-implementation of the first pair from the raw ChaCha20 keystream."""
    import hashlib
    import hmac

    key = _key()
    tensor_key = hmac.new(key, b"silotune/noise-tensor/v1\x00w", hashlib.sha256).digest()
    n = 6
    raw = Cipher(algorithms.ChaCha20(tensor_key, bytes(16)), mode=None).encryptor().update(bytes(8 * n))
    words = struct.unpack("<6Q", raw)
    u = [((w >> 11) + 0.5) / 2**53 for w in words]
    pairs = n // 2
    expect = [math.sqrt(-2 * math.log(u[i])) * math.cos(2 * math.pi * u[pairs + i]) for i in range(pairs)]
    expect += [math.sqrt(-2 * math.log(u[i])) * math.sin(2 * math.pi * u[pairs + i]) for i in range(pairs)]
    got = standard_normal(key, (n,), name="w")
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expect, rel=1e-12, abs=1e-12)


def test_noise_is_deterministic_per_key_and_name_and_independent_of_dict_order() -> None:
    key = _key()
    refs = {"b": torch.zeros(3, 5), "a": torch.zeros(7, dtype=torch.float64), "c": (4,)}
    one = gaussian_noise(refs, 0.5, key)
    two = gaussian_noise(dict(reversed(list(refs.items()))), 0.5, key)
    assert list(one) == ["b", "a", "c"]
    assert all(torch.equal(one[k], two[k]) for k in refs)
    alone = gaussian_noise({"a": refs["a"]}, 0.5, key)  # a tensor's noise ignores the other tensors
    assert torch.equal(alone["a"], one["a"])
    assert one["b"].shape == (3, 5) and one["b"].dtype == torch.float32
    assert one["a"].dtype == torch.float64 and one["c"].dtype == torch.float32
    # same shape, other name: other noise; other key: other noise
    same_shape = gaussian_noise({"x": (7,), "y": (7,)}, 1.0, key)
    assert not torch.equal(same_shape["x"], same_shape["y"])
    assert not torch.equal(gaussian_noise({"a": (7,)}, 1.0, _key(round=4))["a"], same_shape["x"])
    # std scales exactly (float64), zero std gives zeros
    unit = gaussian_noise({"a": refs["a"]}, 1.0, key)["a"]
    assert torch.allclose(one["a"], 0.5 * unit, rtol=0, atol=1e-15)
    assert torch.equal(gaussian_noise({"a": (3,)}, 0.0, key)["a"], torch.zeros(3))
    assert gaussian_noise({"e": (0,)}, 1.0, key)["e"].shape == (0,)
    # bf16 and odd sizes
    assert gaussian_noise({"h": torch.zeros(5, dtype=torch.bfloat16)}, 1.0, key)["h"].dtype == torch.bfloat16


def test_a_million_draws_are_standard_normal() -> None:
    n = 1_000_000
    z = standard_normal(_key(), (n,), name="stat").numpy()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.std() - 1.0) < 5 * se / math.sqrt(2)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # tails as a normal's: P(|z| > 3) = 0.0026998
    tail = float((np.abs(z) > 3).mean())
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    # neighbouring draws and the two halves of each Box-Muller pair are uncorrelated
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 * se
    assert abs(np.corrcoef(z[: n // 2], z[n // 2 :])[0, 1]) < 5 * math.sqrt(2 / n)


def test_two_keys_give_independent_noise() -> None:
    n = 1_000_000
    a = standard_normal(_key(), (n,), name="w").numpy()
    b = standard_normal(_key(inputs={**INPUTS, "global_sha256": "h" * 64}), (n,), name="w").numpy()
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(n)
    assert abs((a - b).std() - math.sqrt(2)) < 0.01  # nothing cancels in their difference


def test_uniforms_are_open_interval_and_uniform() -> None:
    u = uniform(_key(), 200_000).numpy()
    assert u.min() > 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4


def test_keyed_noise_adds_in_float64_and_keeps_dtype() -> None:
    key = _key()
    delta = {"a": torch.linspace(-1, 1, 11, dtype=torch.float64), "b": torch.ones(4, 4)}
    out = add_gaussian_noise_keyed(delta, 0.1, key)
    noise = gaussian_noise({k: (v.shape) for k, v in delta.items()}, 0.1, key, dtype=torch.float64)
    assert torch.equal(out["a"], delta["a"] + noise["a"])
    assert out["b"].dtype == torch.float32
    assert torch.equal(out["b"], (delta["b"].double() + noise["b"]).float())
    with pytest.raises(ValueError, match="floating-point"):
        add_gaussian_noise_keyed({"i": torch.ones(2, dtype=torch.int32)}, 0.1, key)


def test_noise_for_a_2_4m_value_adapter_is_fast() -> None:
    # 2.4M values, as a LoRA adapter's tensors (e.g. 2×60 projections of 8×5000)
    shapes = {f"layers.{i}.lora_{ab}": (8, 2500) for i in range(60) for ab in "AB"}
    assert sum(a * b for a, b in shapes.values()) == 2_400_000
    gaussian_noise({"warm": (1000,)}, 1.0, _key())
    start = time.perf_counter()
    gaussian_noise(shapes, 1.0, _key())
    seconds = time.perf_counter() - start
    print(f"keyed Gaussian noise for 2.4M values: {seconds:.3f} s")
    assert seconds < 5.0


# -- Opacus and DP-SGD -----------------------------------------------------------------------------


def _opacus_step(key: bytes, *, zero_grads: bool = False, steps: int = 2) -> list[torch.Tensor]:
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    gsm = GradSampleModule(model)
    base = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = KeyedNoiseDPOptimizer(
        base,
        noise_key=key,
        noise_multiplier=2.0,
        max_grad_norm=0.5,
        expected_batch_size=4,
        loss_reduction="sum",
    )
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        if zero_grads:
            for p in model.parameters():
                p.grad_sample = torch.zeros((0, *p.shape))
        else:
            gsm(torch.ones(4, 4)).sum().backward()
        opt.step()
        grads.append(torch.cat([p.grad.flatten().clone() for p in model.parameters()]))
    gsm.to_standard_module()
    return grads


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_keyed_dp_optimizer_draws_opacus_noise_from_the_key() -> None:
    key = _key(purpose="dp-sgd")
    g1, g2 = _opacus_step(key), _opacus_step(key)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))  # a retry releases the same
    g3 = _opacus_step(_key(purpose="dp-sgd", round=9))
    assert not torch.equal(g1[0], g3[0])
    assert not torch.equal(g1[0], g1[1])  # each step its own subkey
    # an empty batch releases exactly the keyed noise: std = noise_multiplier * max_grad_norm = 1.0
    noise_only = _opacus_step(key, zero_grads=True, steps=1)[0]
    expect = gaussian_noise({"param/0": (3, 4), "param/1": (3,)}, 1.0, subkey(key, "dp-sgd-step/0"))
    assert torch.equal(noise_only, torch.cat([expect["param/0"].flatten(), expect["param/1"]]))
    with pytest.raises(ValueError, match="generator"):
        KeyedNoiseDPOptimizer(
            torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0),
            noise_key=key,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=1,
            generator=torch.Generator(),
        )


def test_dpsgd_takes_a_key_or_a_seed_and_hides_the_key() -> None:
    key = _key(purpose="dp-sgd")
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, noise_key=key)
    assert dp.key == key and key.hex() not in repr(dp) and "noise_key" not in repr(dp)
    legacy = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, noise_seed=7)
    assert legacy.key == seed_key(7) != seed_key(8)
    with pytest.raises(ValueError, match="exactly one of noise_key and noise_seed"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="exactly one of noise_key and noise_seed"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, noise_seed=1, noise_key=key)
    with pytest.raises(ValueError, match="32 bytes"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, noise_key=b"k")


def test_poisson_sampling_from_the_key() -> None:
    examples = list(range(2000))
    key = subkey(_key(purpose="dp-sgd"), "dp-sgd/poisson")
    a = list(poisson_batches(examples, 0.1, steps=5, key=key))  # type: ignore[arg-type]
    b = list(poisson_batches(examples, 0.1, steps=5, key=key))  # type: ignore[arg-type]
    assert a == b and a[0] != a[1]
    sizes = [len(x) for x in a]
    assert all(abs(s - 200) < 5 * math.sqrt(2000 * 0.1 * 0.9) for s in sizes)
    with pytest.raises(ValueError, match="exactly one of generator and key"):
        next(poisson_batches(examples, 0.1, steps=1))  # type: ignore[arg-type]
