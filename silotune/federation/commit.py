"""Commit and state: the federation's resume point, round manifests and evaluation records.

``start_federation`` writes the initial global (or finds the resume point); ``commit_round`` writes a
round's manifest and then ``state.json`` (only then is the round complete); ``record_evaluation``
adds the silos' holdout evaluation of a round's output, which arrives with the next round's wave.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from pydantic import ValidationError

from silotune import __version__
from silotune.adapters import AdapterModel
from silotune.aggregation.sampling import silos_of_round
from silotune.config import FederationConfig
from silotune.errors import ConfigError, StoreError
from silotune.evaluation import EvalResult, weighted_mean
from silotune.methods import stacked
from silotune.privacy.filters import client_epsilon, client_noise
from silotune.protection.base import sign_object
from silotune.records import (
    AggregateRecord,
    EvalRecord,
    Evaluation,
    FederationState,
    HoldoutMetrics,
    ObjectRef,
    RoundSummary,
    SiloBytes,
    SiloFailure,
    UpdateRecord,
)
from silotune.store import FederationLayout, ObjectStore, get_json, get_tensors, put_json, put_tensors, sha256


def load_state(store: ObjectStore, federation_id: str) -> FederationState | None:
    """The federation's resume point, or None if it has none yet.

    Raises :class:`StoreError` naming every field of ``state.json`` this version cannot read (a key it
    does not know is refused, not dropped: a later save would lose it).
    """
    key = FederationLayout(federation_id).state()
    if not store.exists(key):
        return None
    try:
        return FederationState.model_validate(get_json(store, key))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise StoreError(
            f"{key} in {store.describe()} is not a state file silotune {__version__} can read: {problems}"
        ) from exc


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
    if config.aggregation.lora_merge == "stack":  # FLoRA: the global is the merged update, zero at first
        init = stacked.initial_merged(adapter)
    else:
        init = adapter.initial_state(config.seed)
    key = layout.global_adapter(0)
    sha = put_tensors(store, key, init, metadata={"federation_id": config.federation_id, "round": "0"})
    sign_object(config, store, key, store.get(key), round_=0, purpose="global")
    state = FederationState(
        federation_id=config.federation_id,
        fingerprint=fp,
        global_ref=ObjectRef(key=key, sha256=sha),
        started_at=time.time(),
    )
    put_json(store, layout.state(), state.model_dump(mode="json"))
    return state


def save_state(store: ObjectStore, state: FederationState) -> None:
    put_json(store, FederationLayout(state.federation_id).state(), state.model_dump(mode="json"))


def summarize_evals(evals: Sequence[EvalRecord]) -> HoldoutMetrics | None:
    """The example-weighted mean of the silos' evaluations (None: no silo evaluated)."""
    results = [EvalResult(**e.result) for e in evals]  # type: ignore[arg-type]
    return HoldoutMetrics.model_validate(weighted_mean(results).as_dict()) if results else None


def commit_round(
    config: FederationConfig,
    store: ObjectStore,
    state: FederationState,
    round_: int,
    updates: Sequence[UpdateRecord],
    failures: Sequence[SiloFailure],
    agg: AggregateRecord,
    evals: Sequence[EvalRecord] | None = None,
    eval_failures: Sequence[SiloFailure] = (),
    round_seconds: float | None = None,
) -> FederationState:
    """Write round ``round_``'s manifest, then advance ``state.json`` (the commit point).

    Before committing, every object the manifest names is re-read and checked
    against its sha256, so a manifest never points at a missing or changed object.
    The round's holdout evaluation normally arrives later (see :func:`record_evaluation`); its
    history entry says ``evaluated=False`` until then. A caller that already evaluated the new
    global passes ``evals`` and both are recorded here.
    """
    layout = FederationLayout(config.federation_id)
    objects = {"global_in": state.global_ref.model_dump(), "global_out": agg.next_global.model_dump()}
    if agg.server_state is not None:  # the server optimizer's state: the next round continues from it
        objects["server_state"] = agg.server_state.model_dump()
    if agg.control is not None:  # SCAFFOLD's server variate: the next round's silos read it from here
        objects["server_control"] = agg.control.model_dump()
    for u in updates:
        if u.silo in agg.included:
            objects[f"update/{u.silo}"] = u.update.model_dump()
    for name, ref in objects.items():
        data = store.get(ref["key"])
        if sha256(data) != ref["sha256"]:
            raise StoreError(f"round {round_ + 1}: object {name} ({ref['key']}) changed before commit")
    z = eps = None
    if config.privacy.client_dp is not None:
        # ε from the noise each round actually used (a resume with more rounds recalibrates z for the
        # rounds to come, never for those already released).
        z = client_noise(config).noise_multiplier
        used = [
            h.client_dp_noise_multiplier for h in state.history if h.client_dp_noise_multiplier is not None
        ]
        used += [z] * (round_ - len(used))  # rounds committed before z was recorded
        eps = client_epsilon(config, [*used, z])
    summary = RoundSummary(
        round=round_ + 1,
        included=agg.included,
        excluded={**agg.excluded, **{f.silo: f"{f.stage}: {f.error}" for f in failures}},
        train={u.silo: u.train for u in updates},
        delta_norm=agg.delta_norm if math.isfinite(agg.delta_norm) else None,
        protection=config.security.protection,
        privacy={u.silo: u.privacy for u in updates if u.privacy},
        bytes={u.silo: SiloBytes(up=u.bytes_up, down=u.bytes_down) for u in updates},
        client_dp_noise_multiplier=z,
        client_dp_epsilon=eps,
        round_seconds=round_seconds,
        aggregate_seconds=agg.seconds if round_seconds is not None else None,
        sampled=silos_of_round(config, round_) if config.aggregation.silos_per_round is not None else None,
        masking=agg.masking,
        evaluated=False,
        committed_at=time.time(),
    )
    manifest = {
        "federation_id": config.federation_id,
        "fingerprint": state.fingerprint,
        **summary.manifest_fields(),
        "objects": objects,
        "silotune_version": __version__,
    }
    sha = put_json(store, layout.manifest(round_), manifest)
    del sha
    sign_object(
        config,
        store,
        layout.manifest(round_),
        store.get(layout.manifest(round_)),
        round_=round_,
        purpose="manifest",
    )
    new_state = state.model_copy(
        update={
            "completed_rounds": round_ + 1,
            "global_ref": agg.next_global,
            "history": [*state.history, summary],
        }
    )
    if evals is not None:
        new_state = record_evaluation(config, store, new_state, round_, evals, eval_failures, save=False)
    save_state(store, new_state)
    return new_state


def record_evaluation(
    config: FederationConfig,
    store: ObjectStore,
    state: FederationState,
    round_: int,
    evals: Sequence[EvalRecord],
    failures: Sequence[SiloFailure] = (),
    *,
    save: bool = True,
) -> FederationState:
    """Record the silos' holdout evaluation of round ``round_``'s output (``-1``: the initial global).

    The evaluation goes into ``history[round_]`` (its :class:`Evaluation` fields and ``evaluated``;
    for ``-1``: ``initial_eval``) and into a write-once object next to the round's
    manifest (:meth:`FederationLayout.evaluation`). If that object already exists (a coordinator
    that crashed after writing it), the stored evaluation is the one recorded: it was computed on the
    same global adapter. Saves ``state.json`` unless ``save`` is False (the caller saves it).
    """
    if state.pending_evaluation != round_:
        raise ValueError(
            f"no evaluation of round {round_ + 1} is pending in {config.federation_id!r} "
            f"(pending: {state.pending_evaluation})"
        )
    wrong = [e.silo for e in evals if e.round != round_]
    if wrong:
        raise ValueError(f"evaluations of silos {wrong} are not of round {round_ + 1}'s output")
    layout = FederationLayout(config.federation_id)
    key = layout.evaluation(round_)
    if store.exists(key):
        record = get_json(store, key)
        if record.get("global") != state.global_ref.model_dump():
            raise StoreError(f"{key} evaluates another global adapter than {state.global_ref.key}")
        evaluation = Evaluation.model_validate(
            {k: record[k] for k in ("eval", "global_eval", "eval_failures") if k in record}
        )
    else:
        evaluation = Evaluation(
            eval={e.silo: HoldoutMetrics.model_validate(e.result) for e in evals},
            global_eval=summarize_evals(evals),
            eval_failures={f.silo: f.error for f in failures},
            eval_seconds={e.silo: e.seconds for e in evals if e.seconds is not None},
        )
        record = evaluation.evaluation_file(
            federation_id=config.federation_id, round_=round_, global_ref=state.global_ref
        )
        put_json(store, key, record)
    if round_ < 0:
        new_state = state.model_copy(update={"initial_eval": evaluation})
    else:
        last = state.history[-1].model_copy(update={**dict(evaluation), "evaluated": True})
        new_state = state.model_copy(update={"history": [*state.history[:-1], last]})
    if save:
        save_state(store, new_state)
    return new_state
