"""CKKS: silos encrypt under one shared key; the coordinator adds ciphertexts it cannot read.

The cryptography is :mod:`silotune.crypto.ckks`. A round's next global is a pointer,
``{round, base, aggregate, contributions}``: the previous global plus the encrypted mean of the
listed uploads. A silo decrypts only an aggregate it has checked (the coordinator could otherwise
name one silo's ciphertext three times and have every silo decrypt, and one publish, that update):

- the pointer carries the coordinator's signature (when the config pins its key);
- its base is the global the silo itself accepted for the previous round (a silo remembers every
  global it received, so a rebased or equivocated pointer is refused);
- the contributions are at least ``max(2, min_silos)`` distinct roster silos, each upload at its
  exact key, with its sha256 and its silo's signature for this round;
- the silo recomputes the sum of exactly those ciphertexts with the public operations and
  decrypts its own sum; the coordinator's aggregate must have the same bytes.

The shared secret key is the scheme's limit: every silo can decrypt every ciphertext, so CKKS
hides updates from the coordinator and the storage, not from a silo that obtains another's
ciphertext (a coordinator colluding with a silo can hand them over). The store lets silos read
CKKS uploads only (needed for the recomputation); use ``secagg`` when silos distrust each other.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from silotune.adapters import TensorDict, apply_delta
from silotune.aggregation.sampling import silos_of_round
from silotune.config import FederationConfig
from silotune.crypto.ckks import (
    CkksContext,
    EncryptionError,
    decrypt_update,
    encrypt_update,
    load_context,
    public_context,
    read_header,
    sum_encrypted,
)
from silotune.errors import SilotuneError, UpdateError
from silotune.keys import CoordinatorKeys, write_private
from silotune.protection.base import (
    AggregateRecord,
    AggregationJob,
    ObjectRef,
    ProtocolRefusal,
    SiloContext,
    global_round,
    read_signed,
    require_quorum,
    sign_object,
    uniform_weight,
    verify_coordinator,
)
from silotune.protection.none import read_plain_global
from silotune.store import FederationLayout, ObjectStore, sha256

log = logging.getLogger(__name__)

MAX_POINTER_BYTES = 1 << 20


class Contribution(BaseModel):
    silo: str
    key: str
    sha256: str


class GlobalPointer(BaseModel):
    """A CKKS round's global: the previous global plus the encrypted mean of ``contributions``."""

    round: int
    base: ObjectRef
    base_round: int
    aggregate: ObjectRef
    contributions: list[Contribution]


def _min_contributions(config: FederationConfig) -> int:
    return max(2, config.aggregation.min_silos)


@functools.lru_cache(maxsize=4)
def _public_of(secret: bytes) -> CkksContext:
    return load_context(public_context(secret))


class CkksScheme:
    name: ClassVar[str] = "ckks"
    extension: ClassVar[str] = "ckks"
    steps_before_upload: ClassVar[tuple[str, ...]] = ()
    steps_after_upload: ClassVar[tuple[str, ...]] = ()
    publishes_at_silo: ClassVar[bool] = True

    # -- silo side ------------------------------------------------------------------------------

    def pack(self, ctx: SiloContext, delta: TensorDict) -> bytes:
        return encrypt_update(delta, ctx.vault.ckks_secret(), weight=uniform_weight(ctx.config, ctx.round))

    def run_step(self, ctx: SiloContext, stage: str) -> dict[str, Any]:
        raise ValueError(f"protection 'ckks' has no silo step {stage!r}")

    def read_global(self, ctx: SiloContext, ref: ObjectRef) -> tuple[TensorDict, int]:
        """The global a reference names, as this silo accepts it (see the module docstring)."""
        if not ref.key.endswith(".json"):
            state, down = read_plain_global(ctx, ref)
            _remember(ctx, global_round(ref.key), ref)
            return state, down
        data = ctx.store.get_bounded(ref.key, MAX_POINTER_BYTES)
        if sha256(data) != ref.sha256:
            raise UpdateError(
                ctx.silo, f"{ref.key}: sha256 mismatch (the global adapter changed or was corrupted)"
            )
        pointer = _parse_pointer(ctx.silo, ref.key, data)
        verify_coordinator(ctx.config, ctx.store, ref.key, data, round_=pointer.round, purpose="global")
        cache = ctx.vault.global_cache(ctx.config.federation_id, pointer.round)
        if cache.is_file():
            cached = cache.read_bytes()
            header = json.loads(cached[8 : 8 + int.from_bytes(cached[:8], "little")])
            if header.get("__metadata__", {}).get("pointer_sha256") == ref.sha256:
                return dict(st_load(cached)), len(data)
        _check_base(ctx, pointer)
        base, down = self.read_global(ctx, pointer.base)
        total_bytes = self._checked_sum(ctx, pointer)
        header = read_header(total_bytes)
        total = decrypt_update(total_bytes, ctx.vault.ckks_secret(), min_count=_min_contributions(ctx.config))
        mean = {k: (v.double() / header.weight).to(v.dtype) for k, v in total.items()}
        out = apply_delta(base, mean)
        write_private(cache, st_save(out, metadata={"pointer_sha256": ref.sha256}))
        _remember(ctx, pointer.round, ref)
        return out, down + len(data)

    def _checked_sum(self, ctx: SiloContext, pointer: GlobalPointer) -> bytes:
        """Recompute the sum of the pointer's contributions; refuse anything that does not check out."""
        config, round_ = ctx.config, pointer.round - 1
        silos = [c.silo for c in pointer.contributions]
        refuse = f"silo {ctx.silo!r} refuses to decrypt the aggregate of round {pointer.round}"
        if len(set(silos)) != len(silos) or len({c.sha256 for c in pointer.contributions}) != len(silos):
            raise ProtocolRefusal(f"{refuse}: a silo or an upload is listed twice ({silos})")
        if len(silos) < _min_contributions(config):
            raise ProtocolRefusal(
                f"{refuse}: it sums {len(silos)} upload(s); at least "
                f"{_min_contributions(config)} are required"
            )
        roster = set(silos_of_round(config, round_))  # the round's silos (its sample, if sampling)
        layout = FederationLayout(config.federation_id)
        blobs = []
        for c in sorted(pointer.contributions, key=lambda c: c.silo):
            if c.silo not in roster:
                raise ProtocolRefusal(f"{refuse}: {c.silo!r} is not a silo of this round")
            if c.key != layout.update(round_, c.silo, self.extension):
                raise ProtocolRefusal(
                    f"{refuse}: {c.key!r} is not {c.silo}'s upload slot of round {round_ + 1}"
                )
            try:
                blob = read_signed(config, ctx.store, c.key, signer=c.silo, round_=round_, purpose="update")
            except SilotuneError as exc:
                raise ProtocolRefusal(f"{refuse}: {exc}") from None
            if sha256(blob) != c.sha256:
                raise ProtocolRefusal(f"{refuse}: {c.key} does not have the listed sha256")
            blobs.append(blob)
        try:
            total = sum_encrypted(blobs, _public_of(ctx.vault.ckks_path.read_bytes()), silos=sorted(silos))
        except EncryptionError as exc:
            raise ProtocolRefusal(f"{refuse}: {exc}") from None
        if sha256(total) != pointer.aggregate.sha256:
            raise ProtocolRefusal(f"{refuse}: the aggregate is not the sum of the listed uploads")
        return total

    # -- coordinator side -------------------------------------------------------------------------

    def open_round(self, config: FederationConfig, store: ObjectStore, round_: int) -> list[str]:
        return []  # nothing to announce before the round's uploads

    def close_upload(
        self, config: FederationConfig, store: ObjectStore, round_: int, valid: dict[str, bytes]
    ) -> list[str]:
        return sorted(valid)

    def aggregate(self, job: AggregationJob) -> AggregateRecord:
        """Add the silos' ciphertexts; the next global is (this global, encrypted mean, its inputs)."""
        config, store, round_ = job.config, job.store, job.round
        public = CoordinatorKeys.for_config(config).ckks_public()
        checked: dict[str, bytes] = {}
        for silo, blob in sorted(job.valid.items()):
            try:  # parse + load under the public context: wrong key, parameters, corruption
                sum_encrypted([blob], public, silos=[silo])
                checked[silo] = blob
            except EncryptionError as exc:
                job.excluded[silo] = f"silo {silo!r}: {exc}"
                log.warning("round %d: excluding silo %s: %s", round_ + 1, silo, exc)
        layouts = {silo: read_header(blob).layout for silo, blob in checked.items()}
        reference = sorted(checked)[0] if checked else None
        for silo in list(checked):
            if reference is not None and layouts[silo] != layouts[reference]:
                job.excluded[silo] = f"silo {silo!r}: tensor layout differs from silo {reference!r}"
                del checked[silo]
        require_quorum(config, round_, list(checked), job.excluded)
        names = sorted(checked)
        total = sum_encrypted([checked[s] for s in names], public, silos=names)
        layout = job.layout
        agg_key = layout.aggregate(round_)
        store.put(agg_key, total)
        pointer = GlobalPointer(
            round=round_ + 1,
            base=job.global_ref,
            base_round=round_,
            aggregate=ObjectRef(key=agg_key, sha256=sha256(total)),
            contributions=[
                Contribution(silo=s, key=layout.update(round_, s, self.extension), sha256=sha256(checked[s]))
                for s in names
            ],
        )
        data = json.dumps(pointer.model_dump(mode="json"), sort_keys=True).encode()
        pkey = layout.global_pointer(round_ + 1)
        store.put(pkey, data)
        sign_object(config, store, pkey, data, round_=round_ + 1, purpose="global")
        return AggregateRecord(
            round=round_,
            included=names,
            excluded=job.excluded,
            next_global=ObjectRef(key=pkey, sha256=sha256(data)),
            server_state=None,
            delta_norm=float("nan"),  # only silos can decrypt the aggregate
            seconds=job.seconds(),
        )


def _parse_pointer(silo: str, key: str, data: bytes) -> GlobalPointer:
    try:
        return GlobalPointer.model_validate_json(data)
    except (ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise UpdateError(silo, f"{key}: not a CKKS global pointer ({first})") from None


def _accepted_path(ctx: SiloContext) -> Any:
    return ctx.vault.root / "globals" / ctx.config.federation_id / "accepted.json"


def _accepted(ctx: SiloContext) -> dict[str, dict[str, str]]:
    path = _accepted_path(ctx)
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_base(ctx: SiloContext, pointer: GlobalPointer) -> None:
    """The pointer's base must be the global this silo accepted for the previous round."""
    if pointer.base_round != pointer.round - 1:
        raise ProtocolRefusal(
            f"silo {ctx.silo!r}: the global of round {pointer.round} is based on round {pointer.base_round}, "
            f"not round {pointer.round - 1} (rebased pointer)"
        )
    if global_round(pointer.base.key) != pointer.base_round:
        raise ProtocolRefusal(
            f"silo {ctx.silo!r}: {pointer.base.key} is not round {pointer.base_round}'s global"
        )
    held = _accepted(ctx).get(str(pointer.base_round))
    if held is not None and held != pointer.base.model_dump():
        raise ProtocolRefusal(
            f"silo {ctx.silo!r}: the global of round {pointer.round} is based on {pointer.base.key} "
            f"({pointer.base.sha256[:12]}), not on the round-{pointer.base_round} global this silo "
            f"received ({held['key']}, {held['sha256'][:12]}): rebased pointer refused"
        )


def _remember(ctx: SiloContext, round_: int, ref: ObjectRef) -> None:
    """Record the global this silo accepted for ``round_``; a different one for the same round is refused."""
    accepted = _accepted(ctx)
    held = accepted.get(str(round_))
    if held is not None and held != ref.model_dump():
        raise ProtocolRefusal(
            f"silo {ctx.silo!r}: the coordinator sent two different globals for round {round_} "
            f"({held['key']} and {ref.key})"
        )
    if held is None:
        accepted[str(round_)] = ref.model_dump()
        write_private(_accepted_path(ctx), json.dumps(accepted, sort_keys=True).encode())
