"""Client sampling: the seeded draw, its config checks and client-level DP at the sampled rate."""

from __future__ import annotations

from typing import Any

import pytest

from silotune.aggregation.sampling import sample_rate, silos_of_round
from silotune.config import parse_config
from silotune.errors import ConfigError
from silotune.privacy.filters import client_epsilon, client_noise


def _config(silos: int = 10, **aggregation: Any) -> Any:
    return parse_config(
        {
            "federation_id": "sampling",
            "seed": 7,
            "model": {"name_or_path": "tiny-llama"},
            "silos": [{"name": f"s{i:02d}", "train_path": "x.jsonl"} for i in range(silos)],
            "aggregation": aggregation,
            "tracking": {"kind": "none"},
        }
    )


def test_draw_is_seeded_sized_and_varies_by_round() -> None:
    cfg = _config(silos_per_round=3)
    draws = [silos_of_round(cfg, r) for r in range(20)]
    assert all(len(d) == 3 and d == sorted(set(d)) for d in draws)
    assert draws == [silos_of_round(cfg, r) for r in range(20)]  # the same config redraws the same
    assert len({tuple(d) for d in draws}) > 5  # rounds differ
    every = {s for d in draws for s in d}
    assert len(every) >= 8  # the draw reaches (almost) every silo over 20 rounds
    # The draw depends on the silos, not on the order the config lists them in.
    shuffled = cfg.model_copy(update={"silos": list(reversed(cfg.silos))})
    assert [silos_of_round(shuffled, r) for r in range(20)] == draws
    # Another seed or federation id draws otherwise.
    assert [silos_of_round(cfg.model_copy(update={"seed": 8}), r) for r in range(20)] != draws


def test_fraction_count_and_none() -> None:
    assert len(silos_of_round(_config(silos_per_round=0.25), 0)) == 2  # round(2.5) → 2
    assert len(silos_of_round(_config(silos_per_round=1.0), 0)) == 10
    assert silos_of_round(_config(), 4) == [f"s{i:02d}" for i in range(10)]
    assert sample_rate(_config(silos_per_round=4)) == pytest.approx(0.4)
    assert sample_rate(_config()) == 1.0


@pytest.mark.parametrize(
    ("aggregation", "message"),
    [
        ({"silos_per_round": 11}, "silos_per_round: 11 exceeds the 10 configured"),
        ({"silos_per_round": 0}, "a count of silos must be >= 1"),
        ({"silos_per_round": 1.5}, r"a fraction of silos must be in \(0, 1\]"),
        ({"silos_per_round": 2, "min_silos": 3}, "draws 2 silo.* below the quorum"),
    ],
)
def test_config_refuses_impossible_samples(aggregation: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**aggregation)


def test_unset_sampling_keeps_the_fingerprint() -> None:
    """A federation started before sampling existed resumes: the unset field is not hashed."""
    cfg = _config()
    assert cfg.fingerprint() != _config(silos_per_round=5).fingerprint()
    payload = cfg.model_dump(mode="json")
    payload["aggregation"].pop("silos_per_round")
    assert parse_config(payload).fingerprint() == cfg.fingerprint()


def test_client_dp_is_amplified_by_sampling() -> None:
    """The federation's client-level ε uses the accountant at q = m/n; calibration does too."""
    dp = {"clip_norm": 0.1, "noise_multiplier": 1.0, "delta": 1e-3}
    agg = {"options": {"weighted": False}, "min_silos": 2}
    full = parse_config(
        {**_config(silos=100).model_dump(mode="json"), "aggregation": agg, "privacy": {"client_dp": dp}}
    )
    sampled = parse_config({**full.model_dump(mode="json"), "aggregation": {**agg, "silos_per_round": 10}})
    eps_full = client_epsilon(full, [1.0] * 20)
    eps_sampled = client_epsilon(sampled, [1.0] * 20)
    assert eps_sampled < eps_full / 3
    # with a target ε, the noise calibrated for sampled rounds is smaller
    target = {"clip_norm": 0.1, "target_epsilon": 2.0, "delta": 1e-3}
    full_t = parse_config({**full.model_dump(mode="json"), "privacy": {"client_dp": target}})
    sampled_t = parse_config({**sampled.model_dump(mode="json"), "privacy": {"client_dp": target}})
    z_full, z_sampled = client_noise(full_t).noise_multiplier, client_noise(sampled_t).noise_multiplier
    assert z_sampled < z_full
    assert client_epsilon(sampled_t, [z_sampled] * sampled_t.rounds) == pytest.approx(2.0, rel=0.05)
