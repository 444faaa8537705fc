"""Protection schemes: what hides a silo's update from the coordinator, as registered entries.

``none`` (plaintext, any aggregator), ``secagg`` (pairwise masking: the coordinator learns only
the sum) and ``ckks`` (encryption under the silos' shared key: the coordinator adds ciphertexts).
Each is one file behind :class:`~silotune.protection.base.ProtectionScheme`; the round's code asks
``scheme_for(config)`` and never branches on the name. Every scheme fails closed: an update that
should be protected and is not raises, it is never uploaded in plaintext.

Aggregation under protection is a mean with equal silo weights: a silo cannot weight itself by
example count without knowing everyone's counts, and client-level DP bounds each silo's share of a
sum in any case. Each silo scales its delta by ``1/len(silos)``; whoever reads the sum divides by
the weight it carries, so the result is the mean over the silos that made it into the round.
"""

from __future__ import annotations

from silotune.adapters import TensorDict
from silotune.config import FederationConfig
from silotune.protection.base import (
    AggregateRecord,
    AggregationJob,
    ObjectRef,
    ProtectionScheme,
    ProtocolRefusal,
    SiloContext,
    check_weight,
    silo_keys,
    uniform_weight,
)
from silotune.protection.ckks import CkksScheme
from silotune.protection.none import PlainScheme, exchanged_keys
from silotune.protection.secagg import SecAggScheme
from silotune.store import ObjectStore, sha256

SCHEMES: dict[str, ProtectionScheme] = {s.name: s for s in (PlainScheme(), SecAggScheme(), CkksScheme())}
EXTENSIONS = {name: s.extension for name, s in SCHEMES.items()}


def scheme_for(config: FederationConfig) -> ProtectionScheme:
    name = config.security.protection
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown protection {name!r}; known: {', '.join(SCHEMES)}") from None


# -- the silo's steps, by name (what tasks and notebooks call) ----------------------------------------


def fetch_global(
    config: FederationConfig, silo: str, ref_key: str, ref_sha: str, store: ObjectStore, round_: int = 0
) -> tuple[TensorDict, int]:
    """The global adapter a reference names, as the silo accepts it, and the bytes downloaded."""
    ctx = SiloContext(config, silo, round_, store)
    return scheme_for(config).read_global(ctx, ObjectRef(key=ref_key, sha256=ref_sha))


def load_global(
    config: FederationConfig, silo: str, ref_key: str, ref_sha: str, store: ObjectStore
) -> TensorDict:
    return fetch_global(config, silo, ref_key, ref_sha, store)[0]


def pack_update(config: FederationConfig, silo: str, round_: int, d: TensorDict, store: ObjectStore) -> bytes:
    """The bytes that leave the silo: plaintext safetensors, a CKKS ciphertext or a masked update."""
    return scheme_for(config).pack(SiloContext(config, silo, round_, store), d)


def run_silo_step(config: FederationConfig, silo: str, round_: int, stage: str, store: ObjectStore) -> dict:
    return scheme_for(config).run_step(SiloContext(config, silo, round_, store), stage)


def secagg_advertise(config: FederationConfig, silo: str, round_: int, store: ObjectStore) -> str:
    return SCHEMES["secagg"].advertise(SiloContext(config, silo, round_, store))  # type: ignore[attr-defined]


def secagg_share(config: FederationConfig, silo: str, round_: int, store: ObjectStore) -> list[str]:
    return SCHEMES["secagg"].share(SiloContext(config, silo, round_, store))  # type: ignore[attr-defined]


def secagg_unmask(config: FederationConfig, silo: str, round_: int, store: ObjectStore) -> str | None:
    return SCHEMES["secagg"].unmask(SiloContext(config, silo, round_, store))  # type: ignore[attr-defined]


__all__ = [
    "EXTENSIONS",
    "SCHEMES",
    "AggregateRecord",
    "AggregationJob",
    "ObjectRef",
    "ProtectionScheme",
    "ProtocolRefusal",
    "SiloContext",
    "check_weight",
    "exchanged_keys",
    "fetch_global",
    "load_global",
    "pack_update",
    "run_silo_step",
    "scheme_for",
    "secagg_advertise",
    "secagg_share",
    "secagg_unmask",
    "sha256",
    "silo_keys",
    "uniform_weight",
]
