"""Checking a federation config against a silo's policy: every :class:`Violation` at once.

:func:`check_config` covers the policy's rules; the signed acceptance is checked in
:mod:`silotune.policy.acceptance` and both are enforced by :mod:`silotune.policy.enforcement`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from silotune.config import FederationConfig, ModelSpec, StoreSpec
from silotune.crypto.signing import public_key_hex
from silotune.errors import SilotuneError
from silotune.policy.model import SiloPolicy
from silotune.policy.stores import entry_location, store_location
from silotune.policy.weights import model_weights_sha256


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


def rule_line(name: str, value: Any) -> str:
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
        add(
            Violation(
                "federation_id", rule_line("federations", policy.federations), f"{fid!r} is not allowed"
            )
        )

    index = next((i for i, s in enumerate(config.silos) if s.name == policy.silo), None)
    if index is None:
        names = ", ".join(s.name for s in config.silos)
        add(
            Violation(
                "silos", rule_line("silo", policy.silo), f"no silo named {policy.silo!r} (silos: {names})"
            )
        )
    else:
        spec = config.silos[index]
        for kind in ("attack", "poison"):
            if getattr(spec, kind) is not None and not policy.allow_attack_simulation:
                add(
                    Violation(
                        f"silos.{index}.{kind}",
                        rule_line("allow_attack_simulation", False),
                        f"set on this silo: simulated {kind}s are for evaluation only, never at a real silo",
                    )
                )

    sec = config.security
    if sec.protection not in policy.protection:
        add(
            Violation(
                "security.protection",
                rule_line("protection", policy.protection),
                f"{sec.protection!r} is not allowed",
            )
        )
    if policy.require_signing and not sec.signing:
        add(Violation("security.signing", rule_line("require_signing", True), "uploads must be signed"))
    if policy.require_signing and sec.protection in ("secagg", "ckks"):
        unpinned = [s.name for s in config.silos if not s.public_key]
        if unpinned:
            add(
                Violation(
                    "silos[].public_key",
                    rule_line("require_signing", True),
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
                    rule_line("coordinator_key", policy.coordinator_key),
                    f"{sec.coordinator_key!r} is not the coordinator key this policy pins ({pinned[:16]}…)",
                )
            )

    if policy.methods is not None:
        if config.method.name not in policy.methods:
            add(
                Violation(
                    "method.name",
                    rule_line("methods", policy.methods),
                    f"{config.method.name!r} is not allowed",
                )
            )
        own = config.silos[index].method if index is not None else None
        if own is not None and own.name not in policy.methods:
            add(
                Violation(
                    f"silos.{index}.method.name",
                    rule_line("methods", policy.methods),
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
        rule = rule_line("base_model_sha256", policy.base_model_sha256)
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
            out.append(
                Violation("privacy.sample_dp", rule_line("dp.require_sample_dp", True), "DP-SGD is off")
            )
    else:
        eps = sample.target_epsilon
        if dp.max_epsilon is not None:
            rule = rule_line("dp.max_epsilon", dp.max_epsilon)
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
                    rule_line("dp.max_lifetime_epsilon", dp.max_lifetime_epsilon),
                    f"{eps} is above this data set's lifetime budget on its own",
                )
            )
        sigma = sample.noise_multiplier
        if dp.min_noise_multiplier is not None and sigma is not None and sigma < dp.min_noise_multiplier:
            out.append(
                Violation(
                    "privacy.sample_dp.noise_multiplier",
                    rule_line("dp.min_noise_multiplier", dp.min_noise_multiplier),
                    f"{sigma} is below the floor",
                )
            )
        if dp.max_delta is not None and sample.delta > dp.max_delta:
            out.append(
                Violation(
                    "privacy.sample_dp.delta",
                    rule_line("dp.max_delta", dp.max_delta),
                    f"{sample.delta} is above the cap",
                )
            )
    if client is None:
        if dp.require_client_dp:
            out.append(
                Violation("privacy.client_dp", rule_line("dp.require_client_dp", True), "client DP is off")
            )
    elif dp.max_client_epsilon is not None:
        rule = rule_line("dp.max_client_epsilon", dp.max_client_epsilon)
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
    rule = rule_line("stores", policy.stores)
    try:
        where = store_location(store)
    except ValueError as exc:
        return [Violation("store.endpoint_url", rule, str(exc))]
    if not any(where.within(entry_location(e)) for e in policy.stores):
        field = "store.root" if store.kind == "local" else "store"
        out.append(Violation(field, rule, f"{where.text} is not an allowed store"))
    if store.kind == "s3":
        keys = policy.store_keys
        for name in ("access_key_env", "secret_key_env", "profile"):
            want, got = getattr(keys, name), getattr(store, name)
            if got != want:
                out.append(
                    Violation(
                        f"store.{name}", rule_line(f"store_keys.{name}", want), f"{got!r} is not allowed"
                    )
                )
    return out
