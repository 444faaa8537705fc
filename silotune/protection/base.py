"""What every protection scheme shares: the interface, the trust anchors, signed objects, weights.

A scheme decides what leaves a silo (``pack``), how a silo reads the global it receives
(``read_global``), the extra protocol steps it needs at the silos (``steps_before_upload``,
``steps_after_upload``, run by the coordinator flow through ``run_step``) and how the coordinator
combines the uploads it screened (``aggregate``). The coordinator flow, the silo flow and
:mod:`silotune.federation` only ever ask the config's scheme; none of them branches on its name.

Trust anchors. Every signature check uses keys the silo itself agreed to: the silos' Ed25519 keys
pinned in the federation config (``silos[].public_key``) and the coordinator's
(``security.coordinator_key``). Both are inside the config's fingerprint, which each silo signs when
it accepts the federation (:mod:`silotune.policy`), so a coordinator that adds a silo or swaps a key
changes the fingerprint and every silo refuses the round. Configs that pin nothing (one-machine
experiments) fall back to the coordinator's ``keys_dir`` for silo keys and to no coordinator
signatures at all.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from silotune.adapters import TensorDict
from silotune.aggregation.sampling import silos_of_round
from silotune.config import FederationConfig
from silotune.crypto.signing import SiloKeyPair, TrustedKeys, public_key_from_hex, verify_update
from silotune.errors import ConfigError, QuorumError, SilotuneError, StoreError, UpdateError
from silotune.keys import CoordinatorKeys, SiloVault
from silotune.records import AggregateRecord, ObjectRef
from silotune.store import FederationLayout, ObjectStore

COORDINATOR = "coordinator"  # the signer name in the coordinator's signatures


@dataclass(frozen=True)
class SiloContext:
    """A silo's view of one round: its config (already checked against its policy), store and vault."""

    config: FederationConfig
    silo: str
    round: int
    store: ObjectStore

    @property
    def vault(self) -> SiloVault:
        return SiloVault.for_silo(self.config.silo(self.silo))

    @property
    def layout(self) -> FederationLayout:
        return FederationLayout(self.config.federation_id)

    @property
    def roster(self) -> list[str]:
        """The silos of this round: every configured silo, or the round's sample (client sampling)."""
        return silos_of_round(self.config, self.round)


class ProtectionScheme(Protocol):
    """One way of hiding updates from the coordinator (see the module docstring)."""

    name: ClassVar[str]
    extension: ClassVar[str]  # of the uploaded object
    steps_before_upload: ClassVar[tuple[str, ...]]  # protocol steps at every silo before the round's wave
    steps_after_upload: ClassVar[tuple[str, ...]]  # at the survivors, after the uploads are fixed
    publishes_at_silo: ClassVar[bool]  # only a silo can decrypt the final adapter: one of them publishes

    def pack(self, ctx: SiloContext, delta: TensorDict) -> bytes: ...

    def read_global(self, ctx: SiloContext, ref: ObjectRef) -> tuple[TensorDict, int]: ...

    def run_step(self, ctx: SiloContext, stage: str) -> dict[str, Any]: ...

    def open_round(self, config: FederationConfig, store: ObjectStore, round_: int) -> list[str]:
        """Coordinator, before the silos' first step: what it announces (keys written), if anything."""
        ...

    def close_upload(
        self, config: FederationConfig, store: ObjectStore, round_: int, valid: Mapping[str, bytes]
    ) -> list[str]: ...

    def aggregate(self, job: AggregationJob) -> AggregateRecord: ...


@dataclass
class AggregationJob:
    """The coordinator's inputs to one round's aggregation, after screening."""

    config: FederationConfig
    store: ObjectStore
    round: int
    global_ref: ObjectRef
    valid: dict[str, bytes]  # silo -> uploaded bytes (checksum and signature verified)
    excluded: dict[str, str]  # silo -> why
    num_examples: dict[str, int]  # silo -> what it reported (0: withheld)
    start: float

    @property
    def layout(self) -> FederationLayout:
        return FederationLayout(self.config.federation_id)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


# -- trust anchors ------------------------------------------------------------------------------


def pinned_silo_keys(config: FederationConfig) -> TrustedKeys | None:
    """The silos' keys pinned in the config (all or none must be pinned), else None."""
    pinned = {s.name: s.public_key for s in config.silos if s.public_key}
    if not pinned:
        return None
    missing = sorted(s.name for s in config.silos if not s.public_key)
    if missing:
        raise ConfigError(
            f"silos[].public_key: pinned for {sorted(pinned)} but not for {missing}; pin every silo's key"
        )
    return TrustedKeys({n: public_key_from_hex(k, what=f"silo {n!r} public_key") for n, k in pinned.items()})


def silo_keys(config: FederationConfig) -> TrustedKeys | None:
    """Who may sign as which silo: the pinned keys, else (signing on) the coordinator's key folder."""
    pinned = pinned_silo_keys(config)
    if pinned is not None:
        return pinned
    if config.security.signing:
        return CoordinatorKeys.for_config(config).trusted_keys()
    return None


def coordinator_signer(config: FederationConfig) -> SiloKeyPair | None:
    """The coordinator's signing key, when it has one (``<keys_dir>/coordinator.pem``)."""
    return CoordinatorKeys.for_config(config).signing_key()


def sign_object(
    config: FederationConfig, store: ObjectStore, key: str, data: bytes, *, round_: int, purpose: str
) -> None:
    """Coordinator: sign ``data`` (stored at ``key``) into ``key + '.sig'``, if it has a key."""
    signer = coordinator_signer(config)
    if signer is None:
        return
    sig = signer.sign(
        data, federation_id=config.federation_id, round=round_, silo=COORDINATOR, purpose=purpose
    )
    store.put(key + ".sig", sig)


def verify_coordinator(
    config: FederationConfig, store: ObjectStore, key: str, data: bytes, *, round_: int, purpose: str
) -> None:
    """Silo: when the config pins the coordinator's key, ``data`` must carry its valid signature."""
    if config.security.coordinator_key is None:
        return
    public = public_key_from_hex(config.security.coordinator_key, what="security.coordinator_key")
    sig = store.get(key + ".sig") if store.exists(key + ".sig") else None
    verify_update(
        data,
        sig,
        federation_id=config.federation_id,
        round=round_,
        silo=COORDINATOR,
        public_key=public,
        purpose=purpose,
    )


def silo_sign(ctx: SiloContext, data: bytes, *, purpose: str) -> bytes | None:
    """Silo: its signature of ``data`` when the federation signs, else None."""
    if not ctx.config.security.signing and pinned_silo_keys(ctx.config) is None:
        return None
    return ctx.vault.signing_key().sign(
        data, federation_id=ctx.config.federation_id, round=ctx.round, silo=ctx.silo, purpose=purpose
    )


def put_signed(ctx: SiloContext, key: str, data: bytes, *, purpose: str) -> None:
    sig = silo_sign(ctx, data, purpose=purpose)
    if sig is not None:
        ctx.store.put(key + ".sig", sig)
    ctx.store.put(key, data)


def read_signed(
    config: FederationConfig,
    store: ObjectStore,
    key: str,
    *,
    signer: str,
    round_: int,
    purpose: str,
    max_bytes: int | None = None,
) -> bytes:
    """Read a silo-signed object at an exact key; with known silo keys its signature must verify."""
    data = store.get(key) if max_bytes is None else store.get_bounded(key, max_bytes)
    trusted = silo_keys(config)
    if trusted is not None:
        sig = store.get_bounded(key + ".sig", 1024) if store.exists(key + ".sig") else None
        trusted.verify(
            data, sig, federation_id=config.federation_id, round=round_, silo=signer, purpose=purpose
        )
    return data


def read_json_object(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{what}: not valid JSON ({exc})") from None


def global_round(key: str) -> int:
    """The round number in a global's key (``federations/<fid>/rounds/<r>/global.*``)."""
    parts = key.split("/")
    try:
        return int(parts[parts.index("rounds") + 1])
    except (ValueError, IndexError):
        raise UpdateError("global", f"{key!r} is not a global adapter's key") from None


# -- weights ------------------------------------------------------------------------------------


def uniform_weight(config: FederationConfig, round_: int = 0) -> float:
    """Under protection each silo weights its own update by 1/len(round's silos) before it leaves."""
    return 1.0 / len(silos_of_round(config, round_))


def check_weight(total_weight: float, count: int, config: FederationConfig, round_: int = 0) -> None:
    expected = count * uniform_weight(config, round_)
    if not math.isclose(total_weight, expected, rel_tol=1e-9):
        raise UpdateError(
            "aggregate", f"weights sum to {total_weight}, expected {expected} for {count} silos"
        )


def require_quorum(
    config: FederationConfig, round_: int, valid: Sequence[str], excluded: Mapping[str, str]
) -> None:
    if len(valid) < config.aggregation.min_silos:
        raise QuorumError(
            f"round {round_ + 1}: {len(valid)} valid update(s) from {sorted(valid)}, "
            f"quorum is {config.aggregation.min_silos}; excluded: {dict(excluded) or 'none'}"
        )


class ProtocolRefusal(SilotuneError):
    """A silo refuses a protocol step because what the coordinator or a peer sent does not check out."""
