"""The DP filters a silo applies to what leaves it: DP-SGD's budget, client-level clip and noise.

Silo side only: they read and write the silo's ledger in its private folder. Each silo keeps its
own books; the coordinator never computes a silo's ε for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from silotune.adapters import TensorDict
from silotune.config import FederationConfig
from silotune.errors import SilotuneError
from silotune.keys import SiloVault
from silotune.privacy.accountant import PrivacyLedger
from silotune.privacy.client_dp import ClientNoise, privatize_update


class PrivacyBudgetExhausted(SilotuneError):
    """The silo's next contribution would take its ε past the configured budget."""


def _ledger_of(rounds: Mapping[str, Any], silo: str, fid: str, accountant: str, before: int) -> PrivacyLedger:
    ledger = PrivacyLedger(silo=silo, federation_id=fid, accountant=accountant)
    for key in sorted(rounds, key=int):
        if int(key) < before:
            entry = rounds[key]
            ledger.record(noise_multiplier=entry["sigma"], sample_rate=entry["q"], steps=entry["steps"])
    return ledger


def sample_dp_plan(config: FederationConfig, silo: str, round_: int, num_examples: int) -> dict[str, Any]:
    """σ, q and steps of this silo's DP-SGD round, after checking its budget.

    Raises :class:`PrivacyBudgetExhausted` when this round would take ε past
    ``target_epsilon``: the silo sits the round out and says so.
    """
    dp = config.privacy.sample_dp
    assert dp is not None
    dp.check_against_dataset(num_examples)
    q = min(1.0, config.train.batch_size / num_examples)
    steps = config.train.local_steps
    sigma = dp.resolve_noise_multiplier(sample_rate=q, steps=steps * config.rounds)
    vault = SiloVault.for_silo(config.silo(silo))
    doc = vault.read_ledger(config.federation_id)
    ledger = _ledger_of(doc["rounds"], silo, config.federation_id, dp.accountant, round_)
    if dp.target_epsilon is not None and ledger.would_exceed(
        target_epsilon=dp.target_epsilon, delta=dp.delta, noise_multiplier=sigma, sample_rate=q, steps=steps
    ):
        raise PrivacyBudgetExhausted(
            f"silo {silo!r}: privacy budget spent: ε={ledger.epsilon(dp.delta):.3f} after {round_} round(s); "
            f"round {round_ + 1} would exceed target_epsilon={dp.target_epsilon} (δ={dp.delta}); "
            "the silo stops contributing"
        )
    return {"sigma": sigma, "q": q, "steps": steps}


def record_sample_dp(
    config: FederationConfig, silo: str, round_: int, plan: Mapping[str, Any]
) -> dict[str, float]:
    """Write this round into the silo's ledger (replacing an earlier try of the same round).

    A retried round re-releases the same update (its noise is seeded by the silo's
    secret), so it is counted once. Returns what the silo reports: ε so far and the settings.
    """
    dp = config.privacy.sample_dp
    assert dp is not None
    vault = SiloVault.for_silo(config.silo(silo))
    doc = vault.read_ledger(config.federation_id)
    rounds = {k: v for k, v in doc["rounds"].items() if int(k) < round_}
    rounds[str(round_)] = {"sigma": plan["sigma"], "q": plan["q"], "steps": plan["steps"]}
    doc["rounds"] = rounds
    doc["accountant"] = dp.accountant
    vault.write_ledger(config.federation_id, doc)
    eps = _ledger_of(rounds, silo, config.federation_id, dp.accountant, round_ + 1).epsilon(dp.delta)
    return {
        "dp.epsilon": eps,
        "dp.delta": dp.delta,
        "dp.noise_multiplier": float(plan["sigma"]),
        "dp.sample_rate": float(plan["q"]),
        "dp.max_grad_norm": dp.max_grad_norm,
        "dp.steps_total": float(sum(r["steps"] for r in rounds.values())),
    }


def client_noise(config: FederationConfig) -> ClientNoise:
    dp = config.privacy.client_dp
    assert dp is not None
    return dp.resolve(rounds=config.rounds, client_sample_rate=1.0, cohort_size=config.client_noise_cohort())


def client_epsilon(config: FederationConfig, rounds_done: int) -> float:
    """Client-level ε after ``rounds_done`` rounds (every silo takes part in every round)."""
    dp = config.privacy.client_dp
    assert dp is not None
    ledger = PrivacyLedger(silo="(all silos)", federation_id=config.federation_id, accountant=dp.accountant)
    ledger.record(noise_multiplier=client_noise(config).noise_multiplier, sample_rate=1.0, steps=rounds_done)
    return ledger.epsilon(dp.delta)


def apply_client_dp(
    config: FederationConfig, silo: str, round_: int, d: TensorDict
) -> tuple[TensorDict, dict[str, float]]:
    """Clip ``d`` to the configured norm and add this silo's share of the noise."""
    dp = config.privacy.client_dp
    assert dp is not None
    noise = client_noise(config)
    vault = SiloVault.for_silo(config.silo(silo))
    gen = torch.Generator().manual_seed(vault.noise_seed(config.federation_id, round_, "client-dp"))
    private, norm = privatize_update(
        d, clip_norm=noise.clip_norm, noise_std=noise.per_client_std, generator=gen, silo=silo
    )
    return private, {
        "client_dp.norm_before_clip": norm,
        "client_dp.clip_norm": noise.clip_norm,
        "client_dp.noise_multiplier": noise.noise_multiplier,
        "client_dp.noise_std": noise.per_client_std,
        "client_dp.cohort": float(noise.cohort_size),
    }
