"""The policy's schema: :class:`SiloPolicy` and its sections, validated by pydantic.

A newcomer adding a policy rule adds its field here and its check in
:mod:`silotune.policy.check`.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from silotune.config import StoreSpec
from silotune.crypto.signing import load_public_key
from silotune.errors import ConfigError
from silotune.keys import SiloVault
from silotune.methods import METHODS
from silotune.policy.stores import parse_store_entry

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_PATTERN = re.compile(r"^[a-z0-9_\-*?\[\]!]{1,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Protection = Literal["none", "secagg", "ckks"]
PROTECTION_ORDER: tuple[Protection, ...] = ("none", "secagg", "ckks")


class PolicyError(ConfigError):
    """A silo policy file (or policy object) is invalid, or the silo's acceptance file is unusable."""


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DPPolicy(_Policy):
    """The silo's differential-privacy floors; a config that sets less is refused."""

    require_sample_dp: bool = Field(
        True,
        description=(
            "Refuse a federation without DP-SGD on this silo's examples (privacy.sample_dp). "
            "The privacy unit is one training example."
        ),
    )
    max_epsilon: float | None = Field(
        None,
        gt=0,
        description=(
            "Largest sample-level ε one federation may spend on this silo's data. The config must state "
            "privacy.sample_dp.target_epsilon at or below it (a bare noise multiplier states no budget). "
            "None: no cap per federation."
        ),
    )
    max_lifetime_epsilon: float | None = Field(
        None,
        gt=0,
        description=(
            "Largest sample-level ε spent on this silo's data set over its lifetime, composed across "
            "federations and scheduled retraining (the silo's lifetime ledger stops training beyond it). "
            "A single federation asking for more is refused up front. None: no lifetime cap."
        ),
    )
    min_noise_multiplier: float | None = Field(
        None,
        gt=0,
        description="Smallest fixed DP-SGD noise multiplier σ (privacy.sample_dp.noise_multiplier) allowed.",
    )
    max_delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Largest δ of sample-level (ε, δ)-DP allowed (privacy.sample_dp.delta).",
    )
    require_client_dp: bool = Field(
        False,
        description=(
            "Refuse a federation without client-level DP (privacy.client_dp: the silo clips its delta "
            "and adds its share of the noise). The privacy unit is the whole silo."
        ),
    )
    max_client_epsilon: float | None = Field(
        None,
        gt=0,
        description=(
            "Largest client-level ε one federation may spend; the config must state "
            "privacy.client_dp.target_epsilon at or below it. None: no cap."
        ),
    )

    @model_validator(mode="after")
    def _cross(self) -> DPPolicy:
        problems = []
        if not self.require_sample_dp:
            for name in ("max_epsilon", "max_lifetime_epsilon", "min_noise_multiplier", "max_delta"):
                if getattr(self, name) is not None:
                    problems.append(
                        f"{name}: a DP-SGD floor means nothing while DP-SGD is optional; set "
                        "dp.require_sample_dp: true, or remove it"
                    )
        if (
            self.max_epsilon is not None
            and self.max_lifetime_epsilon is not None
            and self.max_lifetime_epsilon < self.max_epsilon
        ):
            problems.append(
                f"max_lifetime_epsilon: {self.max_lifetime_epsilon} is below dp.max_epsilon "
                f"{self.max_epsilon}; the lifetime budget covers every federation, so it is at least the "
                "budget of one"
            )
        if not self.require_client_dp and self.max_client_epsilon is not None:
            problems.append(
                "max_client_epsilon: a client-DP cap means nothing while client DP is optional; set "
                "dp.require_client_dp: true, or remove it"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


class ReleasePolicy(_Policy):
    """Which per-silo values may leave the silo unnoised when DP or protection is on.

    Without DP and protection the silo's plaintext update leaves it anyway, so this
    section applies only when ``privacy.sample_dp``, ``privacy.client_dp`` or a
    protection scheme is on.
    """

    training_metrics: bool = Field(
        False,
        description="Per-silo training loss, token counts, update norms (before and after clipping).",
    )
    num_examples: bool = Field(
        False, description="The silo's number of training examples (it drives example-weighted FedAvg)."
    )
    evaluation_metrics: bool = Field(
        True, description="Holdout metrics of the *global* adapter, evaluated at this silo."
    )
    epsilon: bool = Field(True, description="The ε this silo has spent (its privacy ledger's total).")


class StoreKeysPolicy(_Policy):
    """Where the silo's S3 keys come from. A config naming other variables or a profile is refused.

    The access key id travels in clear in every request's Authorization header, so a coordinator
    that could choose the variable could make the silo send any of its environment (a database
    password, another service's token) to the store endpoint.
    """

    access_key_env: str = Field(
        "AWS_ACCESS_KEY_ID", min_length=1, description="The only env var the access key id may be read from."
    )
    secret_key_env: str = Field(
        "AWS_SECRET_ACCESS_KEY",
        min_length=1,
        description="The only env var the secret key may be read from.",
    )
    profile: str | None = Field(
        None, description="The only boto3 profile allowed instead of the env vars (None: no profile)."
    )

    @classmethod
    def from_spec(cls, spec: StoreSpec) -> StoreKeysPolicy:
        return cls(
            access_key_env=spec.access_key_env, secret_key_env=spec.secret_key_env, profile=spec.profile
        )


def _default_protection() -> list[Protection]:
    return ["secagg", "ckks"]


class SiloPolicy(_Policy):
    """One silo's policy. Relative paths in a policy *file* resolve against the file's folder."""

    silo: str = Field(description="This silo's name: the config must list a silo with this name.")
    private_dir: str = Field(
        description=(
            "The silo's private folder (signing key, CKKS secret, noise secret, privacy ledgers, accepted "
            "configs, refusals.log). Replaces the config's silos[].private_dir."
        )
    )
    train_path: str = Field(
        description="The silo's training data (.jsonl/.json/.parquet). Replaces the config's train_path."
    )
    eval_path: str | None = Field(
        None, description="The silo's local holdout. Replaces the config's eval_path (None: no holdout)."
    )
    federations: list[str] = Field(
        description=(
            "Federation ids this silo joins: exact ids or fnmatch patterns (e.g. 'retrain-*' for "
            "scheduled retraining). Any other federation_id is refused."
        ),
    )
    coordinator_key: str | None = Field(
        None,
        description=(
            "The coordinator's Ed25519 public key (PEM; coordinator.pub.pem), relative to the policy file's "
            "folder: globals and manifests the coordinator signs are verified with it. None: not pinned."
        ),
    )
    base_model_sha256: str | None = Field(
        None,
        description=(
            "sha256 of the base model's weights: of the file for a single weight file (`sha256sum`), else "
            "of the `sha256sum` listing of the weight files sorted by name. None: not pinned."
        ),
    )
    methods: list[str] | None = Field(
        None,
        description="Post-training methods this silo runs (e.g. [lora]). None: any registered method.",
    )
    protection: list[Protection] = Field(
        default_factory=_default_protection,
        min_length=1,
        description=(
            "Protection schemes allowed for this silo's update: 'secagg' (pairwise masking), 'ckks' "
            "(encryption), 'none' (plaintext to the coordinator)."
        ),
    )
    require_signing: bool = Field(
        True, description="Refuse a federation whose uploads are not signed (security.signing)."
    )
    device: str | None = Field(
        None,
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="Where this silo trains: auto, cpu, cuda or cuda:N (None: the config's train.device).",
    )
    dp: DPPolicy = Field(default_factory=DPPolicy, description="Differential-privacy floors.")
    stores: list[str] = Field(
        description=(
            "Object stores the silo may use: 's3://HOST:PORT/BUCKET[/PREFIX]' (the store's endpoint_url host "
            "and port, no port meaning 443; 's3://aws/BUCKET' for AWS's default endpoint) or "
            "'file:///ABSOLUTE/ROOT' for a local store. A store at or under an entry is allowed."
        ),
    )
    store_keys: StoreKeysPolicy = Field(
        default_factory=StoreKeysPolicy, description="Where the silo's S3 keys come from."
    )
    release: ReleasePolicy = Field(
        default_factory=ReleasePolicy,
        description="Per-silo values that may leave the silo unnoised under DP or protection.",
    )
    require_accepted_config: bool = Field(
        True,
        description=(
            "Run only federations this silo accepted (`silotune silo accept`), and only while their "
            "config fingerprint equals the accepted one."
        ),
    )
    allow_attack_simulation: bool = Field(
        False,
        description=(
            "EVALUATION ONLY: let a config simulate this silo as an attacker (silos[].attack, "
            "silos[].poison). A real silo leaves it false."
        ),
    )

    @field_validator("silo")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError(
                f"{v!r} is not a valid silo id (lowercase letters, digits, '-', '_'; ≤ 63 chars)"
            )
        return v

    @field_validator("federations")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("an empty list allows no federation; list the ids (or patterns) this silo joins")
        bad = [p for p in v if not _PATTERN.match(p)]
        if bad:
            raise ValueError(
                f"{', '.join(map(repr, bad))}: not a federation id or fnmatch pattern (lowercase letters, "
                "digits, '-', '_', and '*', '?', '[...]')"
            )
        return v

    @field_validator("base_model_sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().lower()
        if not _SHA256.match(v):
            raise ValueError(f"{v!r} is not a sha256 (64 hex digits)")
        return v

    @field_validator("protection")
    @classmethod
    def _unique_protection(cls, v: list[Protection]) -> list[Protection]:
        if len(set(v)) != len(v):
            raise ValueError(f"{v}: lists a scheme twice")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty list allows no method; list at least one, or null for any registered")

        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS.names())}")
        return v

    @field_validator("stores")
    @classmethod
    def _stores(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("an empty list allows no store; list the stores this silo may use")
        problems = []
        out = []
        for entry in v:
            try:
                out.append(parse_store_entry(entry).text)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return out

    def allows_federation(self, federation_id: str) -> bool:
        return any(fnmatch.fnmatchcase(federation_id, p) for p in self.federations)

    def coordinator_public_key(self) -> Any:
        """The pinned coordinator key (an Ed25519PublicKey), or None when not pinned."""
        if self.coordinator_key is None:
            return None

        try:
            return load_public_key(self.coordinator_key)
        except OSError as exc:
            raise PolicyError(
                f"coordinator_key: cannot read {self.coordinator_key} ({exc.strerror})"
            ) from None

    def vault(self) -> Any:
        """The silo's private folder (:class:`silotune.keys.SiloVault`) at the policy's private_dir."""
        return SiloVault(self.silo, Path(self.private_dir))
