"""Client-level differential privacy for silo updates (DP-FedAvg), and the DP config models.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018. The privacy unit is a whole silo: each silo clips
its delta to a global L2 norm ``C``, Gaussian noise calibrated to ``C`` hides
whether any one silo took part, and composition runs over rounds, with client
sampling (each silo takes part in a round with probability ``q``) amplifying
privacy the way minibatch sampling does in DP-SGD. The accountant is Opacus's
RDP accountant with a client as the "sample" and a round as the "step".

Where the noise is added. DP-FedAvg adds noise ``N(0, (z·C)²)`` once, at the
server, to the sum of clipped deltas. Here the server may only ever see masked or
encrypted updates, so the noise is *distributed*, and calibrated against a
colluding peer: each silo knows its own noise share, so a coalition of the
coordinator and one silo can subtract that silo's share from the sum. The shares
of the other ``m − 1`` silos alone must therefore carry ``z·C``: with a cohort of
``m ≥ 2`` silos each adds ``N(0, (z·C/√(m−1))²)`` to its own clipped delta before
it leaves the silo (the full sum carries ``z·C·√(m/(m−1))``); with ``m = 1`` (the
coordinator sees each update) the silo adds the full ``N(0, (z·C)²)`` itself.
Consequences, all of which the caller must respect:

- ``m`` is the number of silos whose noise is guaranteed to reach the sum. Use
  the round's quorum, not the invited cohort: if only ``m' < m`` updates arrive,
  the honest shares carry ``z·C·√((m'−1)/(m−1))`` and ε is larger than calibrated,
  so aggregate no fewer than ``m`` noised updates.
- The calibration tolerates one colluding silo. With ``t`` colluders the remaining
  shares carry ``z·C·√((m−t)/(m−1))``. ``m = 2`` means each silo adds the full
  noise: the other silo knows its own update and noise exactly.
- Each individual update carries only ``1/√(m−1)`` of the noise. The (ε, δ)
  guarantee is for what the server releases (the aggregate); individual updates
  must stay hidden from the coordinator (secure aggregation or CKKS), otherwise a
  silo is protected only at noise multiplier ``z/√(m−1)``.
- The sensitivity argument is for a *sum* (or a mean with a fixed denominator).
  Weighting silos by example count (weighted FedAvg) multiplies silo ``k``'s
  contribution, clip bound and noise by ``w_k``; use unweighted aggregation with
  client DP, or cap the weights as McMahan et al. do and scale ``C`` accordingly.
- Draw the noise from :func:`silotune.privacy.noise.add_gaussian_noise_keyed` with
  a key bound to the round's inputs (:func:`~silotune.privacy.noise.derive_noise_key`),
  and record each round in the silo's :class:`~silotune.privacy.ledger.SiloLedger`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from silotune.errors import ConfigError, UpdateError
from silotune.privacy.accountant import ACCOUNTANTS, compute_noise_multiplier, is_finite_positive

TensorDict = dict[str, torch.Tensor]

# Clipping aims a relative 2^-30 below the bound, so that any reasonable float64
# norm computation (which may differ from ours by a few ulps) agrees the result is
# within it. When rounding to a low-precision dtype still lands above, the scale
# shrinks by one epsilon of that dtype per pass; one pass is nearly always enough.
_CLIP_MARGIN = 2.0**-30
_MAX_SHRINK_PASSES = 16


# -- clipping and noise ------------------------------------------------------------------


def _check_tensors(delta: Mapping[str, torch.Tensor], silo: str) -> None:
    for key, t in delta.items():
        if not isinstance(t, torch.Tensor):
            raise UpdateError(silo, f"expected a tensor, got {type(t).__name__}", tensor=key)
        if not t.is_floating_point():
            raise UpdateError(silo, f"dtype {t.dtype} is not floating point", tensor=key)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UpdateError(silo, f"{bad} non-finite value(s) (NaN/Inf) before clipping", tensor=key)


def _norm_parts(delta: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """(amax, s) with global L2 norm = amax·√s; scaling by amax avoids overflow and underflow."""
    amax = 0.0
    for t in delta.values():
        if t.numel():
            amax = max(amax, float(t.detach().abs().max()))
    if amax == 0.0:
        return 0.0, 0.0
    s = math.fsum(float(((t.detach().to(torch.float64) / amax) ** 2).sum()) for t in delta.values())
    return amax, s


def global_l2_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors of ``delta`` taken together, as if flattened into one vector."""
    amax, s = _norm_parts(delta)
    return amax * math.sqrt(s)


def clip_update(
    delta: Mapping[str, torch.Tensor], max_norm: float, *, silo: str = "local"
) -> tuple[TensorDict, float, float]:
    """Scale ``delta`` so its global L2 norm is at most ``max_norm``.

    Returns ``(clipped, norm, scale)``: new tensors (same keys, dtypes, devices),
    the norm before clipping and the factor applied (1.0 when the update is
    already within the bound, including the all-zero update, which is returned
    unchanged rather than divided by its zero norm).

    The bound holds after rounding to each tensor's dtype, measured in float64:
    the target is ``max_norm·(1 − 2⁻³⁰)``, and if a low-precision cast still
    lands above it the scale shrinks by one epsilon of the dtype until it does
    not. NaN/Inf or non-float tensors raise :class:`~silotune.errors.UpdateError`
    naming ``silo`` and the tensor (a NaN norm would otherwise slip through the
    comparison unclipped).
    """
    if not is_finite_positive(max_norm):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    _check_tensors(delta, silo)
    amax, s = _norm_parts(delta)
    norm = amax * math.sqrt(s)
    if norm <= max_norm:
        return {k: t.detach().clone() for k, t in delta.items()}, norm, 1.0
    target = max_norm * (1.0 - _CLIP_MARGIN)
    # (target / amax) / √s rather than target / norm: norm itself may overflow.
    scale = (target / amax) / math.sqrt(s)
    eps = max(_CLIP_MARGIN, *(torch.finfo(t.dtype).eps for t in delta.values()))
    for _ in range(_MAX_SHRINK_PASSES):
        clipped = {k: (t.detach().to(torch.float64) * scale).to(t.dtype) for k, t in delta.items()}
        if global_l2_norm(clipped) <= target:
            return clipped, norm, scale
        scale *= 1.0 - eps
    raise RuntimeError(f"silo {silo!r}: could not clip norm {norm} to {max_norm}")  # pragma: no cover


def _secure_generator() -> torch.Generator:
    # Not torch's default generator: training code often seeds it for
    # reproducibility, which would make the privacy noise predictable.
    return torch.Generator().manual_seed(secrets.randbits(63))


def add_gaussian_noise(
    delta: Mapping[str, torch.Tensor], std: float, generator: torch.Generator | None = None
) -> TensorDict:
    """``delta`` plus i.i.d. ``N(0, std²)`` noise on every coordinate, as new tensors.

    Noise is drawn in float32 (float64 for float64 tensors) on the generator's
    device, in sorted key order so a seeded generator is reproducible whatever
    the dict order, then added and cast back to each tensor's dtype. With
    ``generator=None`` a fresh generator seeded from the OS's entropy is used.
    Pass a seeded generator only in tests.
    """
    if not (is_finite_positive(std) or (isinstance(std, int | float) and std == 0)):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    gen = generator if generator is not None else _secure_generator()
    out: TensorDict = {}
    for key in sorted(delta):
        t = delta[key].detach()
        work = torch.float64 if t.dtype == torch.float64 else torch.float32
        noise = torch.randn(t.shape, generator=gen, dtype=work, device=gen.device).to(t.device)
        out[key] = (t.to(work) + std * noise).to(t.dtype)
    return {key: out[key] for key in delta}


def privatize_update(
    delta: Mapping[str, torch.Tensor],
    *,
    clip_norm: float,
    noise_std: float,
    generator: torch.Generator | None = None,
    silo: str = "local",
) -> tuple[TensorDict, float]:
    """Clip then noise a silo's delta; returns ``(private delta, norm before clipping)``.

    Fails closed: ``noise_std`` must be > 0, so this never returns an update
    that is clipped but not noised.
    """
    if not is_finite_positive(noise_std):
        raise ValueError(f"noise_std must be a finite number > 0 for a private update, got {noise_std!r}")
    clipped, norm, _ = clip_update(delta, clip_norm, silo=silo)
    return add_gaussian_noise(clipped, noise_std, generator), norm


# -- calibration ---------------------------------------------------------------------------


def per_client_noise_std(*, noise_multiplier: float, clip_norm: float, cohort_size: int) -> float:
    """Noise std each silo adds: ``z·C/√(m−1)`` for a cohort of ``m ≥ 2`` silos, ``z·C`` for ``m = 1``.

    Calibrated against a colluding peer: any ``m − 1`` of the ``m`` shares together
    carry ``z·C``, so the noise survives one silo subtracting its own share.
    """
    problems = []
    if not is_finite_positive(noise_multiplier):
        problems.append(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not is_finite_positive(clip_norm):
        problems.append(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
        problems.append(f"cohort_size must be an integer >= 1, got {cohort_size!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return noise_multiplier * clip_norm / math.sqrt(max(1, cohort_size - 1))


@dataclass(frozen=True)
class ClientNoise:
    """Per-round client-DP noise: multiplier ``z``, clip norm ``C``, silos per sum ``m``."""

    noise_multiplier: float
    clip_norm: float
    cohort_size: int

    def __post_init__(self) -> None:
        per_client_noise_std(
            noise_multiplier=self.noise_multiplier, clip_norm=self.clip_norm, cohort_size=self.cohort_size
        )

    @property
    def guaranteed_std(self) -> float:
        """Std of the noise the sum keeps when one silo subtracts its own share: ``z·C``."""
        return self.noise_multiplier * self.clip_norm

    @property
    def aggregate_std(self) -> float:
        """Std of the noise in the sum of all ``m`` updates: ``z·C·√(m/(m−1))`` (``z·C`` for ``m = 1``)."""
        return self.per_client_std * math.sqrt(self.cohort_size)

    @property
    def per_client_std(self) -> float:
        """Std each silo adds to its own clipped update: ``z·C/√(m−1)`` (``z·C`` for ``m = 1``)."""
        return per_client_noise_std(
            noise_multiplier=self.noise_multiplier, clip_norm=self.clip_norm, cohort_size=self.cohort_size
        )


def calibrate_client_noise(
    *,
    clip_norm: float,
    target_epsilon: float,
    delta: float,
    rounds: int,
    client_sample_rate: float,
    cohort_size: int,
    accountant: str = "rdp",
) -> ClientNoise:
    """Noise for client-level (ε, δ)-DP over ``rounds`` rounds of DP-FedAvg.

    ``client_sample_rate`` is the probability that a silo is sampled into a
    round (1.0 when every silo takes part every round: no amplification);
    ``cohort_size`` is the number of silos whose noise reaches each sum (see the
    module docstring: use the quorum). Record one step per round,
    ``ledger.record(noise_multiplier=z, sample_rate=q, steps=1)``, to track it.
    """
    per_client_noise_std(noise_multiplier=1.0, clip_norm=clip_norm, cohort_size=cohort_size)  # validates
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    z = compute_noise_multiplier(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=client_sample_rate,
        steps=rounds,
        accountant=accountant,
    )
    return ClientNoise(noise_multiplier=z, clip_norm=float(clip_norm), cohort_size=cohort_size)


# -- config models -------------------------------------------------------------------------


def _positive(problems: list[str], name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None:
        if not allow_none:
            problems.append(f"{name}=None: required")
        return
    if not (math.isfinite(value) and value > 0):
        problems.append(f"{name}={value!r}: must be a finite number > 0")


def _common_problems(model: Any, scale_field: str) -> list[str]:
    problems: list[str] = []
    _positive(problems, "noise_multiplier", model.noise_multiplier, allow_none=True)
    _positive(problems, "target_epsilon", model.target_epsilon, allow_none=True)
    if (model.noise_multiplier is None) == (model.target_epsilon is None):
        problems.append(
            f"noise_multiplier={model.noise_multiplier!r}, target_epsilon={model.target_epsilon!r}: "
            "set exactly one of them"
        )
    _positive(problems, scale_field, getattr(model, scale_field))
    if not (0.0 < model.delta < 1.0):
        problems.append(f"delta={model.delta!r}: must be in (0, 1)")
    if model.accountant not in ACCOUNTANTS:
        problems.append(f"accountant={model.accountant!r}: unknown; known: {', '.join(ACCOUNTANTS.names())}")
    return problems


def _raise(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in {what}: " + "; ".join(problems))


def _delta_vs_count(config: Any, n: int, unit: str, units: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{type(config).__name__}: number of {units} must be an integer >= 1, got {n!r}")
    if not config.delta < 1.0 / n:
        raise ConfigError(
            f"{type(config).__name__}: delta={config.delta!r} must be < 1/{n} = {1.0 / n:.3g} "
            f"(1 / number of {units}); otherwise publishing one {unit} outright would satisfy the guarantee"
        )


class SampleDPConfig(BaseModel):
    """Sample-level DP for a silo's local training (DP-SGD via Opacus; Abadi et al., CCS 2016).

    The privacy unit is one training example of the silo; ε composes over every
    step of every round in the silo's :class:`~silotune.privacy.PrivacyLedger`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float | None = Field(
        default=None, description="σ: noise std relative to max_grad_norm. Or set target_epsilon."
    )
    target_epsilon: float | None = Field(
        default=None, description="Budget ε over the whole federation; σ is derived. Or set noise_multiplier."
    )
    max_grad_norm: float = Field(default=1.0, description="Per-example gradient clipping norm C.")
    delta: float = Field(default=1e-5, description="δ of (ε, δ)-DP; must be < 1/(examples in the silo).")
    accountant: str = Field(default="rdp", description="Privacy accountant: 'rdp' or 'prv'.")
    poisson_sampling: Literal[True] = Field(
        default=True,
        description=(
            "Always true: DP-SGD Poisson-samples every batch, as the accountants assume. Kept so configs "
            "that spell it out still load; false is refused."
        ),
    )

    @field_validator("poisson_sampling", mode="before")
    @classmethod
    def _always_poisson(cls, v: Any) -> Any:
        if v is False:
            raise ValueError(
                "false is not supported: DP-SGD always Poisson-samples its batches, because the RDP/PRV "
                "accountants assume it (fixed-size shuffled batches would make the reported ε wrong); "
                "remove the field or set it to true"
            )
        return v

    @model_validator(mode="after")
    def _validate(self) -> SampleDPConfig:
        _raise(_common_problems(self, "max_grad_norm"), "SampleDPConfig")
        return self

    def check_against_dataset(self, n: int) -> None:
        """Raise :class:`~silotune.errors.ConfigError` unless ``delta < 1/n`` for a silo of ``n`` examples."""
        _delta_vs_count(self, n, "example", "examples")

    def resolve_noise_multiplier(self, *, sample_rate: float, steps: int) -> float:
        """σ: the configured one, or the one reaching ``target_epsilon`` over ``steps`` at ``sample_rate``."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        assert self.target_epsilon is not None  # the validator guarantees one of the two
        return compute_noise_multiplier(
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=self.accountant,
        )


class ClientDPConfig(BaseModel):
    """Client-level DP for silo updates (DP-FedAvg with per-silo distributed noise, see module docs).

    The privacy unit is a whole silo; ε composes over rounds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_norm: float = Field(description="Global L2 bound C on each silo's delta (all tensors together).")
    noise_multiplier: float | None = Field(
        default=None,
        description=(
            "z: the round's sum carries noise std z·C even without one silo's share (each silo adds "
            "z·C/√(m−1), m = the silos per sum). Or set target_epsilon."
        ),
    )
    target_epsilon: float | None = Field(
        default=None, description="Client-level ε over all rounds; z is derived. Or set noise_multiplier."
    )
    delta: float = Field(
        default=1e-5, description="δ of client-level (ε, δ)-DP; must be < 1/(number of silos)."
    )
    accountant: str = Field(default="rdp", description="Privacy accountant: 'rdp' or 'prv'.")

    @model_validator(mode="after")
    def _validate(self) -> ClientDPConfig:
        _raise(_common_problems(self, "clip_norm"), "ClientDPConfig")
        return self

    def check_against_population(self, num_clients: int) -> None:
        """Raise :class:`~silotune.errors.ConfigError` unless ``delta < 1/num_clients``.

        The client-level counterpart of :meth:`SampleDPConfig.check_against_dataset`:
        here one "example" is one silo.
        """
        _delta_vs_count(self, num_clients, "client", "clients")

    def resolve(self, *, rounds: int, client_sample_rate: float, cohort_size: int) -> ClientNoise:
        """The per-round noise for this config over ``rounds`` rounds."""
        if self.noise_multiplier is not None:
            return ClientNoise(self.noise_multiplier, self.clip_norm, cohort_size)
        assert self.target_epsilon is not None  # the validator guarantees one of the two
        return calibrate_client_noise(
            clip_norm=self.clip_norm,
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            rounds=rounds,
            client_sample_rate=client_sample_rate,
            cohort_size=cohort_size,
            accountant=self.accountant,
        )
