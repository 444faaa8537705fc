"""The steps of a federated round as plain functions over the object store.

Prefect tasks in ``tasks/`` are thin wrappers around these; a notebook can call
them directly. Every function takes and returns small records (keys, hashes,
counts, metrics), never tensors, so they can cross process and host boundaries.

Round ``r`` (0-based):

1. ``start_federation`` writes the initial global adapter (or finds the resume point);
2. each silo runs ``train_silo``: fetch ``rounds/r/global``, train, write ``rounds/r/updates/<silo>``;
3. ``aggregate_round`` verifies and combines the updates, writes ``rounds/r+1/global``;
4. each silo runs ``evaluate_silo`` on the new global;
5. ``commit_round`` writes the manifest and ``state.json``: only now is round r complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from silotune import __version__
from silotune.adapters import AdapterModel, global_norm
from silotune.aggregation import ClientUpdate, build_aggregator, build_server_optimizer, check_update
from silotune.config import FederationConfig
from silotune.data import encode_file, is_preference_file
from silotune.errors import ConfigError, QuorumError, SilotuneError, StoreError, UpdateError
from silotune.evaluation import EvalResult, evaluate, weighted_mean
from silotune.methods.objectives import build_objective
from silotune.methods.peft_methods import initial_lora as initial_adapter
from silotune.store import FederationLayout, ObjectStore, get_json, get_tensors, put_json, put_tensors, sha256
from silotune.training import silo_seed, train_local

__all__ = ["initial_adapter"]  # LoRA's seeded init; other methods: AdapterModel.initial_state

log = logging.getLogger(__name__)


class ObjectRef(BaseModel):
    key: str
    sha256: str


class FederationState(BaseModel):
    """The resume point, stored at ``federations/<fid>/state.json``."""

    federation_id: str
    fingerprint: str
    completed_rounds: int = 0
    global_ref: ObjectRef
    tracking_run_id: str | None = None
    initial_eval: dict[str, Any] | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    silotune_version: str = __version__


class UpdateRecord(BaseModel):
    silo: str
    round: int
    update: ObjectRef
    num_examples: int
    train: dict[str, float | int]


class SiloFailure(BaseModel):
    silo: str
    round: int
    stage: str
    error: str


class EvalRecord(BaseModel):
    silo: str
    round: int
    result: dict[str, float | int]


class AggregateRecord(BaseModel):
    round: int
    included: list[str]
    excluded: dict[str, str]
    next_global: ObjectRef
    server_state: ObjectRef | None = None
    delta_norm: float
    seconds: float


# --- initial adapter -------------------------------------------------------------------------
# ``initial_adapter`` (LoRA) and every other method's first global: silotune.methods.


def load_state(store: ObjectStore, federation_id: str) -> FederationState | None:
    key = FederationLayout(federation_id).state()
    if not store.exists(key):
        return None
    return FederationState.model_validate(get_json(store, key))


def start_federation(config: FederationConfig, store: ObjectStore, adapter: AdapterModel) -> FederationState:
    """Create the federation's initial global adapter, or return the resume point of an earlier run.

    Refuses to resume a federation id whose stored fingerprint (model, LoRA,
    training, silos, aggregation, seed) differs from ``config``.
    """
    layout = FederationLayout(config.federation_id)
    existing = load_state(store, config.federation_id)
    fp = config.fingerprint()
    if existing is not None:
        if existing.fingerprint != fp:
            raise ConfigError(
                f"federation {config.federation_id!r} exists in {store.describe()} with a different "
                f"configuration (fingerprint {existing.fingerprint} != {fp}); use a new federation_id "
                "or the original config (only 'rounds', tracking, evaluation and tags may change on resume)"
            )
        # The referenced global must still be intact before any silo trains on it.
        get_tensors(store, existing.global_ref.key, expected_sha256=existing.global_ref.sha256)
        return existing
    init = adapter.initial_state(config.seed)
    key = layout.global_adapter(0)
    sha = put_tensors(store, key, init, metadata={"federation_id": config.federation_id, "round": "0"})
    state = FederationState(
        federation_id=config.federation_id, fingerprint=fp, global_ref=ObjectRef(key=key, sha256=sha)
    )
    put_json(store, layout.state(), state.model_dump(mode="json"))
    return state


def save_state(store: ObjectStore, state: FederationState) -> None:
    put_json(store, FederationLayout(state.federation_id).state(), state.model_dump(mode="json"))


# --- silo side --------------------------------------------------------------------------------


def _silo_examples(
    config: FederationConfig, path: str, adapter: AdapterModel, *, pairs: bool = False
) -> list[Any]:
    return encode_file(path, adapter.tokenizer, config.model.max_seq_len, pairs=pairs)


def train_silo(
    config: FederationConfig,
    silo: str,
    round_: int,
    global_ref: ObjectRef,
    store: ObjectStore,
    adapter: AdapterModel,
    *,
    progress: bool = True,
) -> UpdateRecord:
    """A silo's local round: fetch the global adapter, train on local data, upload the delta."""
    spec = config.silo(silo)
    index = [s.name for s in config.silos].index(silo)
    global_state = get_tensors(store, global_ref.key, expected_sha256=global_ref.sha256)
    objective = build_objective(config.objective_for(silo))
    examples = _silo_examples(config, spec.train_path, adapter, pairs=objective is not None)
    d, result = train_local(
        adapter,
        global_state,
        examples,
        config.train,
        seed=silo_seed(config.seed, round_, index),
        desc=f"round {round_ + 1} · {silo}",
        progress=progress,
        objective=objective,
    )
    key = FederationLayout(config.federation_id).update(round_, silo)
    sha = put_tensors(
        store,
        key,
        d,
        metadata={
            "federation_id": config.federation_id,
            "round": str(round_),
            "silo": silo,
            "num_examples": str(result.num_examples),
        },
    )
    return UpdateRecord(
        silo=silo,
        round=round_,
        update=ObjectRef(key=key, sha256=sha),
        num_examples=result.num_examples,
        train=result.as_dict(),
    )


def evaluate_silo(
    config: FederationConfig,
    silo: str,
    round_: int,
    global_ref: ObjectRef,
    store: ObjectStore,
    adapter: AdapterModel,
) -> EvalRecord | None:
    """Evaluate a global adapter on the silo's holdout; None when the silo has no holdout."""
    spec = config.silo(silo)
    if spec.eval_path is None:
        return None
    state = get_tensors(store, global_ref.key, expected_sha256=global_ref.sha256)
    examples = _silo_examples(config, spec.eval_path, adapter, pairs=is_preference_file(spec.eval_path))
    if config.evaluation.max_examples:
        examples = examples[: config.evaluation.max_examples]
    res = evaluate(
        adapter,
        examples,
        batch_size=config.evaluation.batch_size,
        state=state,
        beta=config.objective_for(silo).beta,
    )
    return EvalRecord(silo=silo, round=round_, result=res.as_dict())


# --- coordinator side -------------------------------------------------------------------------


def aggregate_round(
    config: FederationConfig,
    store: ObjectStore,
    round_: int,
    global_ref: ObjectRef,
    records: Sequence[UpdateRecord],
) -> AggregateRecord:
    """Verify, screen and combine the silos' updates; write the next global adapter.

    A silo whose update is missing, corrupted (checksum), or malformed (keys,
    shapes, dtype, NaN/Inf) is excluded and logged. The round fails with
    :class:`QuorumError` only if fewer than ``aggregation.min_silos`` remain.
    """
    start = time.perf_counter()
    layout = FederationLayout(config.federation_id)
    global_state = get_tensors(store, global_ref.key, expected_sha256=global_ref.sha256)
    updates: list[ClientUpdate] = []
    excluded: dict[str, str] = {}
    for rec in records:
        try:
            if rec.round != round_:
                raise UpdateError(rec.silo, f"update is for round {rec.round}, not round {round_}")
            if rec.update.key != layout.update(round_, rec.silo):
                raise UpdateError(
                    rec.silo, f"update key {rec.update.key!r} is not this silo's slot for round {round_}"
                )
            delta = get_tensors(store, rec.update.key, expected_sha256=rec.update.sha256)
            upd = ClientUpdate(silo=rec.silo, delta=delta, num_examples=rec.num_examples)
            check_update(upd, global_state)
            updates.append(upd)
        except (SilotuneError, OSError) as exc:
            excluded[rec.silo] = str(exc)
            log.warning("round %d: excluding silo %s: %s", round_ + 1, rec.silo, exc)
    if len(updates) < config.aggregation.min_silos:
        raise QuorumError(
            f"round {round_ + 1}: {len(updates)} valid update(s) from {[u.silo for u in updates]}, "
            f"quorum is {config.aggregation.min_silos}; excluded: {excluded or 'none'}"
        )
    aggregator = build_aggregator(config.aggregation.name, **config.aggregation.options)
    combined = aggregator.aggregate(updates)
    optimizer = build_server_optimizer(
        config.aggregation.server_optimizer, **config.aggregation.server_options
    )
    if round_ > 0 and store.exists(layout.server_state(round_ - 1)):
        optimizer.load_state_dict(get_tensors(store, layout.server_state(round_ - 1)))
    new_global = optimizer.step(global_state, combined)
    key = layout.global_adapter(round_ + 1)
    sha = put_tensors(
        store, key, new_global, metadata={"federation_id": config.federation_id, "round": str(round_ + 1)}
    )
    server_ref = None
    opt_state = optimizer.state_dict()
    if opt_state:
        skey = layout.server_state(round_)
        server_ref = ObjectRef(key=skey, sha256=put_tensors(store, skey, opt_state))
    return AggregateRecord(
        round=round_,
        included=[u.silo for u in updates],
        excluded=excluded,
        next_global=ObjectRef(key=key, sha256=sha),
        server_state=server_ref,
        delta_norm=global_norm(combined),
        seconds=time.perf_counter() - start,
    )


def summarize_evals(evals: Sequence[EvalRecord]) -> dict[str, float | int]:
    results = [EvalResult(**e.result) for e in evals]  # type: ignore[arg-type]
    return weighted_mean(results).as_dict() if results else {}


def commit_round(
    config: FederationConfig,
    store: ObjectStore,
    state: FederationState,
    round_: int,
    updates: Sequence[UpdateRecord],
    failures: Sequence[SiloFailure],
    agg: AggregateRecord,
    evals: Sequence[EvalRecord],
) -> FederationState:
    """Write round ``round_``'s manifest, then advance ``state.json`` (the commit point).

    Before committing, every object the manifest names is re-read and checked
    against its sha256, so a manifest never points at a missing or changed object.
    """
    layout = FederationLayout(config.federation_id)
    objects = {"global_in": state.global_ref.model_dump(), "global_out": agg.next_global.model_dump()}
    for u in updates:
        if u.silo in agg.included:
            objects[f"update/{u.silo}"] = u.update.model_dump()
    for name, ref in objects.items():
        data = store.get(ref["key"])
        if sha256(data) != ref["sha256"]:
            raise StoreError(f"round {round_ + 1}: object {name} ({ref['key']}) changed before commit")
    global_eval = summarize_evals(evals)
    summary = {
        "round": round_ + 1,
        "included": agg.included,
        "excluded": {**agg.excluded, **{f.silo: f"{f.stage}: {f.error}" for f in failures}},
        "train": {u.silo: u.train for u in updates},
        "eval": {e.silo: e.result for e in evals},
        "global_eval": global_eval,
        "delta_norm": agg.delta_norm,
    }
    manifest = {
        "federation_id": config.federation_id,
        "fingerprint": state.fingerprint,
        **summary,
        "objects": objects,
        "silotune_version": __version__,
    }
    put_json(store, layout.manifest(round_), manifest)
    new_state = state.model_copy(
        update={
            "completed_rounds": round_ + 1,
            "global_ref": agg.next_global,
            "history": [*state.history, summary],
        }
    )
    save_state(store, new_state)
    return new_state
