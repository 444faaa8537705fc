"""Client-level DP: clipping, noise, calibration and the DP config models."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from silotune.config import parse_config
from silotune.errors import ConfigError, UpdateError
from silotune.privacy import (
    ClientDPConfig,
    ClientNoise,
    PrivacyLedger,
    SampleDPConfig,
    add_gaussian_noise,
    calibrate_client_noise,
    clip_update,
    global_l2_norm,
    per_client_noise_std,
    privatize_update,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _naive_norm(delta: dict[str, torch.Tensor]) -> float:
    """Obviously-correct reference: math.hypot over one flat list (it neither overflows nor underflows)."""
    return math.hypot(*(x for t in delta.values() for x in t.to(torch.float64).flatten().tolist()))


@st.composite
def updates(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    dtype = draw(st.sampled_from(DTYPES))
    n_tensors = draw(st.integers(0, 4))
    # tiny to huge, within what each dtype can hold after scaling
    max_exp = {torch.float16: 3, torch.bfloat16: 30, torch.float32: 30, torch.float64: 200}[dtype]
    exponent = draw(st.integers(-max_exp, max_exp))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n_tensors):
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
        kind = draw(st.sampled_from(["randn", "zeros", "ones"]))
        if kind == "zeros":
            t = torch.zeros(shape, dtype=torch.float64)
        elif kind == "ones":
            t = torch.ones(shape, dtype=torch.float64)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float64)
        out[f"layer{i}.lora_A"] = (t * 10.0**exponent).to(dtype)
    return out


@settings(max_examples=150, deadline=None)
@given(delta=updates(), max_norm=st.floats(1e-3, 1e3))
def test_clipping_never_exceeds_the_bound(delta: dict[str, torch.Tensor], max_norm: float) -> None:
    clipped, norm, scale = clip_update(delta, max_norm)
    assert set(clipped) == set(delta)
    for key, t in delta.items():
        assert clipped[key].dtype == t.dtype
        assert clipped[key].shape == t.shape
    assert _naive_norm(clipped) <= max_norm
    assert norm == pytest.approx(_naive_norm(delta), rel=1e-9)
    assert 0.0 < scale <= 1.0
    if norm > max_norm:  # clipped to the bound, up to rounding to the dtype (bfloat16 has 8 bits)
        eps = max(torch.finfo(t.dtype).eps for t in delta.values())
        assert _naive_norm(clipped) == pytest.approx(max_norm, rel=3 * eps + 2**-29)


@settings(max_examples=50, deadline=None)
@given(delta=updates())
def test_clipping_is_identity_under_the_bound(delta: dict[str, torch.Tensor]) -> None:
    norm = _naive_norm(delta)
    clipped, reported, scale = clip_update(delta, max(norm, 1e-3) * 1.01 if math.isfinite(norm) else 1.0)
    if not math.isfinite(norm):
        return
    assert scale == 1.0
    assert reported == pytest.approx(norm, rel=1e-9)
    for key, t in delta.items():
        assert torch.equal(clipped[key], t)
        assert clipped[key] is not t  # a copy, never the caller's tensor


def test_zero_update_does_not_divide_by_zero() -> None:
    zero = {"a": torch.zeros(3, 4), "b": torch.zeros(0)}
    clipped, norm, scale = clip_update(zero, 1.0)
    assert norm == 0.0
    assert scale == 1.0
    assert all(torch.equal(clipped[k], zero[k]) for k in zero)
    assert clip_update({}, 1.0) == ({}, 0.0, 1.0)


def test_clip_scales_a_known_update_and_uses_the_global_norm() -> None:
    delta = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # global norm 5
    clipped, norm, scale = clip_update(delta, 1.0)
    assert norm == pytest.approx(5.0)
    assert scale == pytest.approx(0.2)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([[0.8]]))
    assert global_l2_norm(delta) == pytest.approx(5.0)


def test_clip_rejects_what_it_cannot_bound() -> None:
    with pytest.raises(UpdateError, match=r"silo 'hospital-a', tensor 'w': 1 non-finite"):
        clip_update({"w": torch.tensor([1.0, float("nan")])}, 1.0, silo="hospital-a")
    with pytest.raises(UpdateError, match="not floating point"):
        clip_update({"w": torch.tensor([1, 2])}, 1.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            clip_update({"w": torch.ones(2)}, bad)


def test_noise_has_the_requested_std_and_is_reproducible_with_a_seed() -> None:
    delta = {"a": torch.zeros(200_000), "b": torch.full((100, 100), 3.0, dtype=torch.float64)}
    noised = add_gaussian_noise(delta, 0.5, torch.Generator().manual_seed(0))
    assert list(noised) == list(delta)
    assert noised["b"].dtype == torch.float64
    a = noised["a"].to(torch.float64)
    assert float(a.std()) == pytest.approx(0.5, rel=0.01)
    assert abs(float(a.mean())) < 0.01
    assert float((noised["b"] - 3.0).std()) == pytest.approx(0.5, rel=0.03)
    again = add_gaussian_noise(dict(reversed(delta.items())), 0.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(noised[k], again[k]) for k in delta)  # independent of dict order
    assert torch.equal(delta["a"], torch.zeros(200_000))  # input untouched


def test_noise_without_generator_is_not_the_global_torch_seed() -> None:
    delta = {"a": torch.zeros(8)}
    torch.manual_seed(0)
    first = add_gaussian_noise(delta, 1.0)
    torch.manual_seed(0)
    second = add_gaussian_noise(delta, 1.0)
    assert not torch.equal(first["a"], second["a"])
    assert torch.equal(add_gaussian_noise(delta, 0.0)["a"], delta["a"])
    with pytest.raises(ValueError, match="std"):
        add_gaussian_noise(delta, -1.0)


def test_privatize_clips_then_noises_and_fails_closed() -> None:
    delta = {"a": torch.full((10_000,), 1.0)}  # norm 100
    private, norm = privatize_update(
        delta, clip_norm=1.0, noise_std=0.01, generator=torch.Generator().manual_seed(1)
    )
    assert norm == pytest.approx(100.0)
    assert float(private["a"].mean()) == pytest.approx(0.01, abs=1e-3)  # 1/sqrt(10_000) per coordinate
    with pytest.raises(ValueError, match="noise_std"):
        privatize_update(delta, clip_norm=1.0, noise_std=0.0)


def test_per_client_noise_survives_one_colluding_peer() -> None:
    z, c, m = 1.2, 0.5, 9
    std = per_client_noise_std(noise_multiplier=z, clip_norm=c, cohort_size=m)
    assert std == pytest.approx(z * c / math.sqrt(8))
    gen = torch.Generator().manual_seed(2)
    shares = [add_gaussian_noise({"a": torch.zeros(100_000)}, std, gen)["a"] for _ in range(m)]
    # a colluder subtracts its own share: the other m - 1 shares still carry z·C
    assert float(torch.stack(shares[1:]).sum(0).std()) == pytest.approx(z * c, rel=0.02)
    assert float(torch.stack(shares).sum(0).std()) == pytest.approx(z * c * math.sqrt(m / (m - 1)), rel=0.02)
    noise = ClientNoise(z, c, m)
    assert noise.guaranteed_std == pytest.approx(z * c)
    assert noise.aggregate_std == pytest.approx(z * c * 3 / math.sqrt(8))
    assert noise.per_client_std == pytest.approx(std)
    # two silos: the other one knows its own update, so each adds the full noise; alone: the full noise too
    assert ClientNoise(z, c, 2).per_client_std == pytest.approx(z * c)
    assert ClientNoise(z, c, 1).per_client_std == pytest.approx(z * c)
    assert ClientNoise(z, c, 1).aggregate_std == pytest.approx(z * c)
    with pytest.raises(ValueError, match="cohort_size must be an integer >= 1, got 0"):
        ClientNoise(z, c, 0)


def test_calibration_meets_the_client_level_budget() -> None:
    noise = calibrate_client_noise(
        clip_norm=0.5, target_epsilon=2.0, delta=1e-5, rounds=50, client_sample_rate=0.1, cohort_size=4
    )
    ledger = PrivacyLedger(silo="any", federation_id="fed")
    for _ in range(50):
        ledger.record(noise_multiplier=noise.noise_multiplier, sample_rate=0.1, steps=1)
    assert 2.0 - 0.01 <= ledger.epsilon(1e-5) <= 2.0
    assert noise.per_client_std == pytest.approx(noise.noise_multiplier * 0.5 / math.sqrt(3))
    # Without client sampling there is no amplification: far more noise for the same ε.
    everyone = calibrate_client_noise(
        clip_norm=0.5, target_epsilon=2.0, delta=1e-5, rounds=50, client_sample_rate=1.0, cohort_size=4
    )
    assert everyone.noise_multiplier > 5 * noise.noise_multiplier


def test_sample_dp_config_lists_every_problem_at_once() -> None:
    with pytest.raises(ValidationError) as info:
        SampleDPConfig(noise_multiplier=-1.0, max_grad_norm=0.0, delta=2.0, accountant="gauss")
    msg = str(info.value)
    assert "4 problem(s)" in msg
    for fragment in (
        "noise_multiplier=-1.0",
        "max_grad_norm=0.0",
        "delta=2.0",
        "accountant='gauss': unknown; known: prv, rdp",
    ):
        assert fragment in msg
    with pytest.raises(ValidationError, match="set exactly one of them"):
        SampleDPConfig()
    with pytest.raises(ValidationError, match="set exactly one of them"):
        SampleDPConfig(noise_multiplier=1.0, target_epsilon=8.0)
    with pytest.raises(ValidationError, match="target_epsilon=inf"):
        SampleDPConfig(target_epsilon=float("inf"))
    with pytest.raises(ValidationError, match="Extra inputs"):
        SampleDPConfig(noise_multiplier=1.0, sigma=1.0)  # type: ignore[call-arg]


def test_sample_dp_poisson_sampling_false_is_refused_naming_the_field() -> None:
    assert SampleDPConfig(noise_multiplier=1.0, poisson_sampling=True).poisson_sampling is True
    # Configs written before the field was fixed still load (and keep their fingerprint).
    base = {"federation_id": "f", "silos": [{"name": "a", "train_path": "a.jsonl"}]}
    dp = {"noise_multiplier": 1.0, "poisson_sampling": True}
    cfg = parse_config({**base, "privacy": {"sample_dp": dp}})
    assert cfg.model_dump(mode="json")["privacy"]["sample_dp"]["poisson_sampling"] is True
    with pytest.raises(ConfigError, match=r"privacy.sample_dp.poisson_sampling: false is not supported"):
        parse_config({**base, "privacy": {"sample_dp": {**dp, "poisson_sampling": False}}})


def test_client_dp_config_lists_every_problem_at_once() -> None:
    with pytest.raises(ValidationError) as info:
        ClientDPConfig(clip_norm=float("nan"), delta=0.0)
    msg = str(info.value)
    assert "3 problem(s)" in msg
    assert "clip_norm=nan" in msg
    assert "delta=0.0" in msg
    assert "set exactly one" in msg


def test_configs_round_trip_and_check_against_the_data() -> None:
    cfg = SampleDPConfig(target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0)
    assert SampleDPConfig.model_validate_json(cfg.model_dump_json()) == cfg
    cfg.check_against_dataset(50_000)
    with pytest.raises(ConfigError, match=r"delta=1e-05 must be < 1/200000"):
        cfg.check_against_dataset(200_000)
    sigma = cfg.resolve_noise_multiplier(sample_rate=0.04, steps=2250)
    assert 1.3 < sigma < 1.5  # 1.5 gives ε ≈ 7.33 < 8, so a bit less noise suffices

    client = ClientDPConfig(clip_norm=0.5, noise_multiplier=1.0)
    assert ClientDPConfig.model_validate_json(client.model_dump_json()) == client
    client.check_against_population(10)
    with pytest.raises(ConfigError, match="number of clients"):
        client.check_against_population(0)
    noise = client.resolve(rounds=10, client_sample_rate=1.0, cohort_size=4)
    assert noise.per_client_std == pytest.approx(0.5 / math.sqrt(3))
