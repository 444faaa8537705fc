"""Silo results as signed, plain-JSON records in the silo's own store prefix.

What a silo's flow run returns to the coordinator (its update record, its evaluation, a protocol
step's keys) is written by the silo to ``results/<silo>/<fid>/<round>/<stage>.json`` with its
signature beside it, and read back by the coordinator with a size limit, ``json``, a pydantic model
and the silo's pinned key. Nothing a silo writes is ever deserialized by a format it chooses:
Prefect's persisted results would rebuild their serializer (pickle included) from metadata the
silo's own engine reported, so the silo flows persist no results at all.

Under DP or protection a record carries only what the silo's policy releases (:func:`redact`):
no training losses, token counts, example counts or update norms unless the policy allows them.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from silotune.config import FederationConfig
from silotune.errors import SilotuneError, StoreError, StoreUnavailable
from silotune.keys import SiloVault
from silotune.protection.base import pinned_silo_keys, silo_keys
from silotune.store import FederationLayout, ObjectStore

MAX_RESULT_BYTES = 1 << 20  # a result record is a few kilobytes; a larger object is refused unread

M = TypeVar("M", bound=BaseModel)


class ResultError(SilotuneError):
    """A silo's result record is missing, too large, unsigned, forged or malformed."""


class Release(BaseModel):
    """What per-silo values may leave a silo unnoised under DP or protection (the silo policy's say)."""

    training_metrics: bool = False  # losses, token counts, steps
    num_examples: bool = False  # drives example-weighted FedAvg; withheld: the silo weighs like the others
    evaluation_metrics: bool = True  # holdout metrics of the global adapter (not of the silo's update)
    epsilon: bool = True  # ε so far and the public DP settings (σ, C, δ)


def _signs(config: FederationConfig) -> bool:
    return config.security.signing or pinned_silo_keys(config) is not None


def put_result(
    config: FederationConfig, store: ObjectStore, silo: str, round_: int, stage: str, record: BaseModel
) -> str:
    """Silo: write its signed result record of a flow run; returns the key."""
    key = FederationLayout(config.federation_id).result(round_, silo, stage)
    data = record.model_dump_json().encode()
    if len(data) > MAX_RESULT_BYTES:
        raise ResultError(f"silo {silo!r}: {stage} result is {len(data)} bytes, over {MAX_RESULT_BYTES}")
    if _signs(config):
        vault = SiloVault.for_silo(config.silo(silo))
        sig = vault.signing_key().sign(
            data, federation_id=config.federation_id, round=round_, silo=silo, purpose="result"
        )
        store.put(key + ".sig", sig)
    store.put(key, data)
    return key


def read_result(
    config: FederationConfig, store: ObjectStore, silo: str, round_: int, stage: str, model: type[M]
) -> M:
    """Coordinator: a silo's result record, verified, parsed with ``model``; ResultError otherwise.

    A store that cannot be reached raises :class:`StoreUnavailable`: the record may well be there, and
    reading it again later is the caller's choice (a silo is not failed for the coordinator's outage).
    """
    key = FederationLayout(config.federation_id).result(round_, silo, stage)
    try:
        data = store.get_bounded(key, MAX_RESULT_BYTES)
        trusted = silo_keys(config)
        if trusted is not None:
            sig = store.get_bounded(key + ".sig", 1024) if store.exists(key + ".sig") else None
            trusted.verify(
                data, sig, federation_id=config.federation_id, round=round_, silo=silo, purpose="result"
            )
    except StoreUnavailable:
        raise
    except (StoreError, SilotuneError) as exc:
        raise ResultError(f"silo {silo!r}: {stage} result of round {round_ + 1}: {exc}") from None
    try:
        record = model.model_validate_json(data)
    except (ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ResultError(f"silo {silo!r}: {key} is not a valid {model.__name__} record ({first})") from None
    for field, expected in (("silo", silo), ("round", round_)):
        got = getattr(record, field, expected)
        if got != expected:
            raise ResultError(f"silo {silo!r}: {key} names {field} {got!r}, expected {expected!r}")
    return record


def redact(record: M, release: Release, config: FederationConfig) -> M:
    """``record`` with only what ``release`` lets leave the silo, when DP or protection is on.

    Applies to an update record (``train``, ``num_examples``, ``privacy``) or a round result that
    holds one (``update``) and an evaluation (``evaluation``). Without DP and protection the update
    itself leaves in plaintext, so its metadata is no secret and nothing is removed.
    """
    guarded = (
        config.security.protected
        or config.privacy.sample_dp is not None
        or (config.privacy.client_dp is not None)
    )
    if not guarded:
        return record
    update: dict[str, object] = {}
    inner = getattr(record, "update", None)
    if isinstance(inner, BaseModel):
        update["update"] = redact(inner, release, config)
    evaluation = getattr(record, "evaluation", None)
    if evaluation is not None and not release.evaluation_metrics:
        update["evaluation"] = None
    if hasattr(record, "train") and not release.training_metrics:
        update["train"] = {}
    if hasattr(record, "num_examples") and not release.num_examples:
        update["num_examples"] = 0
    privacy = getattr(record, "privacy", None)
    if isinstance(privacy, dict):
        # The norm before clipping is the raw update's norm: never released. ε and the public settings
        # (σ, C, δ, the cohort) only when the policy releases ε.
        keep = {k: v for k, v in privacy.items() if "norm_before_clip" not in k}
        update["privacy"] = keep if release.epsilon else {}
    return record.model_copy(update=update) if update else record
