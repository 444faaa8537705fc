"""The DP filters a silo applies to what leaves it: DP-SGD's budget, client-level clip and noise.

Silo side only: they read and write the silo's ledger in its private folder
(:class:`~silotune.privacy.ledger.SiloLedger`). Every entry and every noise key is bound to the
round's inputs: the global adapter's sha256, the config's fingerprint and the training data's
sha256. A coordinator that asks for a round again with another global gets a refusal
(:class:`~silotune.privacy.ledger.LedgerConflict`), never a second release with the same noise; a
retry with identical inputs releases the identical update and is counted once. ε composes over
what was recorded (not what the current config would give), per federation and, for the silo's
lifetime budget, over every federation that trained on the same data.
"""

from __future__ import annotations

from collections.abc import Mapping

from silotune.adapters import TensorDict
from silotune.aggregation.sampling import sample_rate
from silotune.config import FederationConfig
from silotune.keys import SiloVault
from silotune.privacy.accountant import PrivacyLedger
from silotune.privacy.client_dp import ClientNoise, clip_update
from silotune.privacy.ledger import LedgerEntry, PrivacyBudgetExhausted, SiloLedger
from silotune.privacy.noise import add_gaussian_noise_keyed, derive_noise_key

__all__ = [
    "PrivacyBudgetExhausted",
    "apply_client_dp",
    "client_epsilon",
    "client_noise",
    "noise_key",
    "record_sample_dp",
    "sample_dp_plan",
]


def _ledger(config: FederationConfig, silo: str) -> SiloLedger:
    return SiloLedger(SiloVault.for_silo(config.silo(silo)).root, silo)


def _checked_entry(
    config: FederationConfig,
    silo: str,
    *,
    kind: str,
    round_: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    delta: float,
    target_epsilon: float | None,
    inputs: Mapping[str, str],
    lifetime_epsilon: float | None,
) -> tuple[LedgerEntry, SiloLedger]:
    """This round's ledger entry, after the federation and lifetime budgets allow it (else the silo stops)."""
    entry = LedgerEntry(
        kind=kind,  # type: ignore[arg-type]
        federation_id=config.federation_id,
        round=round_,
        silo=silo,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
        inputs=dict(inputs),
        data_sha256=inputs.get("data_sha256"),
    )
    ledger = _ledger(config, silo)
    try:
        ledger.check_budget(
            entry, delta=delta, max_federation_epsilon=target_epsilon, max_lifetime_epsilon=lifetime_epsilon
        )
    except PrivacyBudgetExhausted as exc:
        raise PrivacyBudgetExhausted(f"silo {silo!r}: {exc}; the silo stops contributing") from None
    return entry, ledger


def noise_key(
    config: FederationConfig, silo: str, round_: int, purpose: str, inputs: Mapping[str, str]
) -> bytes:
    """The round's noise key: the silo's secret, bound to the federation, round and inputs."""
    vault = SiloVault.for_silo(config.silo(silo))
    return derive_noise_key(
        vault.noise_secret(),
        purpose=purpose,
        federation_id=config.federation_id,
        round=round_,
        silo=silo,
        inputs=dict(inputs),
    )


def sample_dp_plan(
    config: FederationConfig,
    silo: str,
    round_: int,
    num_examples: int,
    inputs: Mapping[str, str] | None = None,
    *,
    lifetime_epsilon: float | None = None,
) -> LedgerEntry:
    """This silo's DP-SGD round (σ, q, steps) as a ledger entry, after checking its budgets.

    Raises :class:`PrivacyBudgetExhausted` when this round would take ε past the federation's
    ``target_epsilon`` or the silo's ``lifetime_epsilon`` on this dataset (the silo sits the round
    out and says so), and ``LedgerConflict`` when the round was already released with other inputs.
    """
    dp = config.privacy.sample_dp
    assert dp is not None
    dp.check_against_dataset(num_examples)
    q = min(1.0, config.train.batch_size / num_examples)
    steps = config.train.local_steps
    sigma = dp.resolve_noise_multiplier(sample_rate=q, steps=steps * config.rounds)
    entry, _ = _checked_entry(
        config,
        silo,
        kind="sample_dp",
        round_=round_,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        accountant=dp.accountant,
        delta=dp.delta,
        target_epsilon=dp.target_epsilon,
        inputs=inputs or {},
        lifetime_epsilon=lifetime_epsilon,
    )
    return entry


def record_sample_dp(config: FederationConfig, silo: str, round_: int, plan: LedgerEntry) -> dict[str, float]:
    """Append this round to the silo's ledger (a retry with identical inputs is counted once).

    Returns what the silo may report: ε so far in this federation and the public settings.
    """
    dp = config.privacy.sample_dp
    assert dp is not None
    ledger = _ledger(config, silo)
    ledger.record(plan)
    eps = ledger.epsilon(kind="sample_dp", delta=dp.delta, federation_id=config.federation_id)
    steps = sum(
        e.steps for e in ledger.entries() if e.kind == "sample_dp" and e.federation_id == plan.federation_id
    )
    return {
        "dp.epsilon": eps,
        "dp.delta": dp.delta,
        "dp.noise_multiplier": float(plan.noise_multiplier),
        "dp.sample_rate": float(plan.sample_rate),
        "dp.max_grad_norm": dp.max_grad_norm,
        "dp.steps_total": float(steps),
    }


def client_noise(config: FederationConfig) -> ClientNoise:
    """The round's client-DP noise; with client sampling, calibrated at the sampled rate ``m / n``."""
    dp = config.privacy.client_dp
    assert dp is not None
    return dp.resolve(
        rounds=config.rounds, client_sample_rate=sample_rate(config), cohort_size=config.client_noise_cohort()
    )


def client_epsilon(config: FederationConfig, noise_multipliers: list[float]) -> float:
    """Client-level ε of the released globals over the rounds whose noise multipliers are given.

    With client sampling each round is accounted at the sampled rate ``q = m / n`` (amplification by
    sampling; the accountant's Poisson analysis, applied to a draw of exactly ``m`` silos). That is
    the guarantee towards whoever sees the released globals but not the draw. The coordinator knows
    the draw: towards it, a silo's bound is its own ledger (``apply_client_dp``), which composes only
    the rounds the silo took part in, each at rate 1.
    """
    dp = config.privacy.client_dp
    assert dp is not None
    ledger = PrivacyLedger(silo="(all silos)", federation_id=config.federation_id, accountant=dp.accountant)
    for z in noise_multipliers:
        ledger.record(noise_multiplier=z, sample_rate=sample_rate(config), steps=1)
    return ledger.epsilon(dp.delta)


def apply_client_dp(
    config: FederationConfig,
    silo: str,
    round_: int,
    d: TensorDict,
    inputs: Mapping[str, str] | None = None,
    *,
    lifetime_epsilon: float | None = None,
) -> tuple[TensorDict, dict[str, float]]:
    """Clip ``d`` to the configured norm and add this silo's share of the noise, on the ledger.

    The round is a client-DP entry in the silo's ledger; with ``target_epsilon`` set, a round that
    would exceed it raises :class:`PrivacyBudgetExhausted` before anything is released.
    """
    dp = config.privacy.client_dp
    assert dp is not None
    noise = client_noise(config)
    inputs = dict(inputs or {})
    entry, ledger = _checked_entry(
        config,
        silo,
        kind="client_dp",
        round_=round_,
        noise_multiplier=noise.noise_multiplier,
        sample_rate=1.0,
        steps=1,
        accountant=dp.accountant,
        delta=dp.delta,
        target_epsilon=dp.target_epsilon,
        inputs=inputs,
        lifetime_epsilon=lifetime_epsilon,
    )
    clipped, norm, _ = clip_update(d, noise.clip_norm, silo=silo)
    private = add_gaussian_noise_keyed(
        clipped, noise.per_client_std, noise_key(config, silo, round_, "client-dp", inputs)
    )
    ledger.record(entry)
    return private, {
        "client_dp.epsilon": ledger.epsilon(
            kind="client_dp", delta=dp.delta, federation_id=config.federation_id
        ),
        "client_dp.norm_before_clip": norm,
        "client_dp.clip_norm": noise.clip_norm,
        "client_dp.noise_multiplier": noise.noise_multiplier,
        "client_dp.noise_std": noise.per_client_std,
        "client_dp.cohort": float(noise.cohort_size),
    }
