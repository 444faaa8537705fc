"""The coordinator's side of a round: screen the uploads, fix them, aggregate through the scheme.

How the screened uploads combine (a robust rule on plaintext, a masked sum, a ciphertext sum, then
the server optimizer) belongs to the protection scheme (:mod:`silotune.protection`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from silotune.aggregation.sampling import silos_of_round
from silotune.config import FederationConfig
from silotune.errors import SilotuneError, StoreError, UpdateError
from silotune.protection import AggregationJob, scheme_for, silo_keys
from silotune.protection.base import require_quorum
from silotune.records import AggregateRecord, ObjectRef, UpdateRecord
from silotune.store import FederationLayout, ObjectStore, get_json, sha256

log = logging.getLogger(__name__)


UPLOAD_SIZE_FACTOR = 32


def screen_uploads(
    config: FederationConfig,
    store: ObjectStore,
    round_: int,
    records: Sequence[UpdateRecord],
    global_key: str | None = None,
) -> tuple[dict[str, bytes], dict[str, str]]:
    """Verify every upload's slot, checksum and signature; returns (silo -> payload, excluded).

    Rejected: an update for another round (replay), outside the silo's own slot, from a
    silo not in the federation, whose bytes changed, that is unsigned or whose signature
    does not verify against the silo's pinned (or registered) public key (tampered, replayed
    from another round, or uploaded by another silo).
    """
    layout = FederationLayout(config.federation_id)
    ext = scheme_for(config).extension
    names = {s.name for s in config.silos}
    drawn = set(silos_of_round(config, round_))
    trusted = silo_keys(config)
    # An upload is at most a few times the global adapter (CKKS' standard encoding: ~20x fp32); a silo
    # must not make the coordinator read an arbitrarily large object into memory.
    limit = UPLOAD_SIZE_FACTOR * len(store.get(global_key)) + (1 << 20) if global_key else None
    valid: dict[str, bytes] = {}
    excluded: dict[str, str] = {}
    for rec in records:
        try:
            if rec.silo not in names:
                raise UpdateError(rec.silo, "not a silo of this federation")
            if rec.silo not in drawn:
                raise UpdateError(rec.silo, f"not drawn for round {round_ + 1} (client sampling)")
            if rec.silo in valid:
                raise UpdateError(rec.silo, "more than one update in this round")
            if rec.round != round_:
                raise UpdateError(
                    rec.silo, f"update is for round {rec.round + 1}, not round {round_ + 1} (replay?)"
                )
            if rec.update.key != layout.update(round_, rec.silo, ext):
                raise UpdateError(
                    rec.silo, f"update key {rec.update.key!r} is not this silo's slot for round {round_ + 1}"
                )
            payload = store.get(rec.update.key) if limit is None else store.get_bounded(rec.update.key, limit)
            if sha256(payload) != rec.update.sha256:
                raise StoreError(
                    f"{rec.update.key}: sha256 mismatch (stored object changed or was corrupted)"
                )
            if trusted is not None:
                sig_key = rec.update.key + ".sig"
                named = rec.signature is not None and rec.signature.key == sig_key
                sig = store.get(sig_key) if named and store.exists(sig_key) else None
                trusted.verify(payload, sig, federation_id=config.federation_id, round=round_, silo=rec.silo)
            valid[rec.silo] = payload
        except (SilotuneError, OSError) as exc:
            excluded[rec.silo] = str(exc)
            log.warning("round %d: excluding silo %s: %s", round_ + 1, rec.silo, exc)
    return valid, excluded


def _plain_base(ref: ObjectRef, store: ObjectStore) -> str:
    """The plaintext global whose size bounds this round's uploads (under CKKS: the first round's)."""
    key = ref.key
    while key.endswith(".json"):  # a CKKS pointer: follow its bases down to the plaintext global
        key = get_json(store, key)["base"]["key"]
    return key


def open_round(config: FederationConfig, store: ObjectStore, round_: int) -> list[str]:
    """Announce what the round's silos check before their first step (secure aggregation: the
    masking graph); the keys written, none for schemes without such a step."""
    return scheme_for(config).open_round(config, store, round_)


def close_upload(
    config: FederationConfig, store: ObjectStore, round_: int, records: Sequence[UpdateRecord]
) -> list[str]:
    """Fix the round's uploads before the silos' after-upload steps (secure aggregation: the survivors)."""
    valid, excluded = screen_uploads(config, store, round_, records)
    closed = scheme_for(config).close_upload(config, store, round_, valid)
    for silo in sorted(set(valid) - set(closed)):
        excluded[silo] = "malformed protected update"
    require_quorum(config, round_, closed, excluded)
    return closed


close_secagg_upload = close_upload  # the name notebooks and tests of secure aggregation use


def aggregate_round(
    config: FederationConfig,
    store: ObjectStore,
    round_: int,
    global_ref: ObjectRef,
    records: Sequence[UpdateRecord],
) -> AggregateRecord:
    """Verify, screen and combine the silos' updates; write the next global adapter.

    A silo whose update is missing, corrupted (checksum), unsigned or wrongly signed, or
    malformed (keys, shapes, dtype, NaN/Inf; for ciphertexts: parameters, key, layout) is
    excluded and logged. The round fails with :class:`QuorumError` only if fewer than
    ``aggregation.min_silos`` remain. How the updates combine is the protection scheme's
    (:mod:`silotune.protection`): a robust rule on plaintext, a masked sum, a ciphertext sum.
    """
    start = time.perf_counter()
    valid, excluded = screen_uploads(
        config, store, round_, records, global_key=_plain_base(global_ref, store)
    )
    job = AggregationJob(
        config=config,
        store=store,
        round=round_,
        global_ref=global_ref,
        valid=valid,
        excluded=excluded,
        num_examples={r.silo: r.num_examples for r in records},
        start=start,
    )
    return scheme_for(config).aggregate(job)
