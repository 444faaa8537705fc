"""The steps of a federated round as plain functions over the object store.

Prefect tasks in ``tasks/`` are thin wrappers around these; a notebook can call
them directly. Every function takes and returns small records (keys, hashes,
counts, metrics), never tensors, so they can cross process and host boundaries.

Round ``r`` (0-based), pipelined so that each round needs one pass over the silos:

1. ``start_federation`` writes the initial global adapter (or finds the resume point);
2. each silo evaluates the global it receives, ``rounds/r/global`` (round r-1's output; in round 0
   the initial adapter), with ``evaluate_silo``, then trains from it with ``train_silo`` and writes
   ``rounds/r/updates/<silo>``;
3. ``aggregate_round`` verifies and combines the updates, writes ``rounds/r+1/global``;
4. ``commit_round`` writes round r's manifest and ``state.json``: only now is round r complete.
   The evaluations of step 2 belong to round r-1 (or to the initial adapter): ``record_evaluation``
   adds them to that round's history entry and to a write-once object next to its manifest.

After the last round the silos evaluate the final global once more (``record_evaluation`` of the
last round). Evaluation is deterministic, so these are the numbers an evaluation right after each
aggregation would give; see ``FederationState.pending_evaluation``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from silotune import __version__
from silotune.adapters import AdapterModel, TensorDict
from silotune.config import FederationConfig
from silotune.data import encode_dataset, encode_file, is_preference_file, read_records
from silotune.errors import ConfigError, SilotuneError, StoreError, UpdateError
from silotune.evaluation import EvalResult, evaluate, weighted_mean
from silotune.methods import hetero
from silotune.methods.objectives import build_objective
from silotune.methods.peft_methods import initial_lora as initial_adapter
from silotune.poisoning import attack_silo_update, poison_silo_records
from silotune.privacy.filters import (
    apply_client_dp,
    client_epsilon,
    client_noise,
    noise_key,
    record_sample_dp,
    sample_dp_plan,
)
from silotune.protection import (
    AggregateRecord,
    AggregationJob,
    ObjectRef,
    SiloContext,
    exchanged_keys,
    scheme_for,
    silo_keys,
)
from silotune.protection.base import require_quorum, sign_object
from silotune.reuse import WorkMemo, copy_training, file_sha256, memo_key, tensor_digest
from silotune.store import FederationLayout, ObjectStore, get_json, get_tensors, put_json, put_tensors, sha256
from silotune.training import DPSGD, TrainResult, silo_seed, train_local

__all__ = ["initial_adapter"]  # LoRA's seeded init; other methods: AdapterModel.initial_state

log = logging.getLogger(__name__)


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

    @property
    def pending_evaluation(self) -> int | None:
        """The round whose output still awaits its holdout evaluation (``-1``: the initial global), or None.

        Only the global adapter the silos receive next (``global_ref``) can be pending: the
        evaluation of round r arrives with round r+1's silo runs (or the final evaluation pass)
        and is recorded no later than round r+1's commit. History entries written before
        evaluation was pipelined carry no ``evaluated`` key and count as evaluated.
        """
        if self.completed_rounds == 0:
            return -1 if self.initial_eval is None else None
        if self.history and self.history[-1].get("evaluated") is False:
            return self.completed_rounds - 1
        return None


class UpdateRecord(BaseModel):
    silo: str
    round: int
    update: ObjectRef
    num_examples: int
    train: dict[str, float | int]
    protection: str = "none"
    signature: ObjectRef | None = None
    privacy: dict[str, float] = Field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0


class SiloFailure(BaseModel):
    silo: str
    round: int
    stage: str
    error: str


class EvalRecord(BaseModel):
    silo: str
    round: int
    result: dict[str, float | int]


class SiloRoundResult(BaseModel):
    """What a silo's round run returns: its evaluation of the global it received, and its update.

    ``evaluation`` belongs to round ``round - 1`` (the initial global in round 0); ``update`` is None
    when training failed (``train_error`` says why: the evaluation still counts), ``evaluation`` is None
    when the silo has no holdout, was not asked to evaluate, or its evaluation failed (``eval_error``).
    """

    silo: str
    round: int
    update: UpdateRecord | None = None
    evaluation: EvalRecord | None = None
    train_error: str | None = None
    eval_error: str | None = None
    run_id: str | None = None  # the flow run that wrote it: a record left by an earlier run is not read


class SiloEvalResult(BaseModel):
    """What a silo's evaluate-only run returns (``evaluation`` None: the silo has no holdout)."""

    silo: str
    round: int
    evaluation: EvalRecord | None = None
    run_id: str | None = None


class SiloStepResult(BaseModel):
    """What a silo's protocol step returns: the keys of the messages it wrote."""

    silo: str
    round: int
    stage: str
    objects: list[str] = Field(default_factory=list)  # not `keys`: Prefect reads that as a mapping
    run_id: str | None = None


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
    sign_object(config, store, key, store.get(key), round_=0, purpose="global")
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
    memo: WorkMemo | None = None,
    lifetime_epsilon: float | None = None,
) -> UpdateRecord:
    """A silo's local round: fetch the global adapter, train, filter, upload its update.

    The filters run in order and fail closed (see :mod:`silotune.protection`):
    DP-SGD in training, client-level clip + noise, encryption or masking, signing.
    ``memo`` (experiments only, :mod:`silotune.reuse`): reuse the training result of an
    earlier call with identical inputs; never used with DP-SGD.
    """
    spec = config.silo(silo)
    index = [s.name for s in config.silos].index(silo)
    scheme = scheme_for(config)
    ctx = SiloContext(config, silo, round_, store)
    global_state, bytes_down = scheme.read_global(ctx, global_ref)
    objective = build_objective(config.objective_for(silo))
    if spec.poison is not None and objective is None:  # evaluation-only data poisoning of SFT records
        raw = read_records(spec.train_path)
        records = poison_silo_records(spec, raw, seed=silo_seed(config.seed, 0, index))
        examples = encode_dataset(records, adapter.tokenizer, config.model.max_seq_len)
    else:
        examples = _silo_examples(config, spec.train_path, adapter, pairs=objective is not None)
    full_global, global_state = global_state, hetero.truncate(global_state, config.lora_for(silo).r)
    keys = exchanged_keys(config, global_state)
    frozen = sorted(set(global_state) - set(keys))
    privacy: dict[str, float] = {}
    dp = plan = None
    # What a DP release is bound to: a round asked again with other inputs is refused by the ledger.
    inputs = {
        "global_sha256": global_ref.sha256,
        "config_fingerprint": config.fingerprint(),
        "data_sha256": file_sha256(spec.train_path),
    }
    if config.privacy.sample_dp is not None:
        plan = sample_dp_plan(config, silo, round_, len(examples), inputs, lifetime_epsilon=lifetime_epsilon)
        dp = DPSGD(
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=config.privacy.sample_dp.max_grad_norm,
            sample_rate=plan.sample_rate,
            noise_key=noise_key(config, silo, round_, "dp-sgd", inputs),
            grad_sample_mode=config.privacy.grad_sample_mode,
        )

    def run() -> tuple[TensorDict, TrainResult]:
        return train_local(
            adapter,
            global_state,
            examples,
            config.train,
            seed=silo_seed(config.seed, round_, index),
            desc=f"round {round_ + 1} · {silo}",
            progress=progress,
            dp=dp,
            frozen=frozen,
            exchanged=keys,
            objective=objective,
        )

    if memo is None or dp is not None:
        d, result = run()
    else:
        key = memo_key(
            "train",
            tensor_digest(global_state),
            silo,
            index,
            round_,
            config.seed,
            file_sha256(spec.train_path),
            spec.model_dump(mode="json", exclude={"attack"}),  # the attack applies after training
            config.model,
            config.lora_for(silo),
            config.method_for(silo),
            config.objective_for(silo),
            config.train,
            config.security,
            frozen,
            keys,
        )
        d, result = memo.get_or_compute(key, run, copy_training)
    d = hetero.pad(d, {k: full_global[k] for k in d})  # a low-rank silo uploads its slice zero-padded
    d = attack_silo_update(spec, d, seed=silo_seed(config.seed, round_, index))  # evaluation-only attacker
    if plan is not None:
        privacy.update(record_sample_dp(config, silo, round_, plan))
    if config.privacy.client_dp is not None:
        d, info = apply_client_dp(config, silo, round_, d, inputs, lifetime_epsilon=lifetime_epsilon)
        privacy.update(info)
    payload = scheme.pack(ctx, d)
    key = ctx.layout.update(round_, silo, scheme.extension)
    signature = None
    if config.security.signing or config.silos[index].public_key is not None:
        sig = ctx.vault.signing_key().sign(
            payload, federation_id=config.federation_id, round=round_, silo=silo
        )
        store.put(key + ".sig", sig)
        signature = ObjectRef(key=key + ".sig", sha256=sha256(sig))
    store.put(key, payload)
    return UpdateRecord(
        silo=silo,
        round=round_,
        update=ObjectRef(key=key, sha256=sha256(payload)),
        num_examples=result.num_examples,
        train=result.as_dict(),
        protection=config.security.protection,
        signature=signature,
        privacy=privacy,
        bytes_up=len(payload) + (64 if signature else 0),
        bytes_down=bytes_down,
    )


def evaluate_silo(
    config: FederationConfig,
    silo: str,
    round_: int,
    global_ref: ObjectRef,
    store: ObjectStore,
    adapter: AdapterModel,
    *,
    memo: WorkMemo | None = None,
) -> EvalRecord | None:
    """Evaluate a global adapter on the silo's holdout; None when the silo has no holdout.

    ``memo`` (experiments only): reuse the result of an earlier evaluation with identical inputs.
    """
    spec = config.silo(silo)
    if spec.eval_path is None:
        return None
    state, _ = scheme_for(config).read_global(SiloContext(config, silo, round_ + 1, store), global_ref)
    state = hetero.truncate(state, config.lora_for(silo).r)

    def run() -> dict[str, Any]:
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
        return res.as_dict()

    if memo is None:
        result = run()
    else:
        key = memo_key(
            "evaluate",
            tensor_digest(state),
            file_sha256(spec.eval_path),
            config.model,
            config.lora_for(silo),
            config.method_for(silo),
            config.objective_for(silo),
            config.evaluation,
        )
        result = memo.get_or_compute(key, run, dict)
    return EvalRecord(silo=silo, round=round_, result=result)


# --- coordinator side -------------------------------------------------------------------------


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
    evals: Sequence[EvalRecord] | None = None,
    eval_failures: Sequence[SiloFailure] = (),
) -> FederationState:
    """Write round ``round_``'s manifest, then advance ``state.json`` (the commit point).

    Before committing, every object the manifest names is re-read and checked
    against its sha256, so a manifest never points at a missing or changed object.
    The round's holdout evaluation normally arrives later (see :func:`record_evaluation`); its
    history entry says ``evaluated: False`` until then. A caller that already evaluated the new
    global passes ``evals`` and both are recorded here.
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
    summary: dict[str, Any] = {
        "round": round_ + 1,
        "included": agg.included,
        "excluded": {**agg.excluded, **{f.silo: f"{f.stage}: {f.error}" for f in failures}},
        "train": {u.silo: u.train for u in updates},
        "delta_norm": agg.delta_norm if math.isfinite(agg.delta_norm) else None,
        "protection": config.security.protection,
        "privacy": {u.silo: u.privacy for u in updates if u.privacy},
        "bytes": {u.silo: {"up": u.bytes_up, "down": u.bytes_down} for u in updates},
    }
    if config.privacy.client_dp is not None:
        # ε from the noise each round actually used (a resume with more rounds recalibrates z for the
        # rounds to come, never for those already released).
        z = client_noise(config).noise_multiplier
        used = [h["client_dp_noise_multiplier"] for h in state.history if "client_dp_noise_multiplier" in h]
        used += [z] * (round_ - len(used))  # rounds committed before z was recorded
        summary["client_dp_noise_multiplier"] = z
        summary["client_dp_epsilon"] = client_epsilon(config, [*used, z])
    manifest = {
        "federation_id": config.federation_id,
        "fingerprint": state.fingerprint,
        **summary,
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
            "history": [*state.history, {**summary, "eval": {}, "global_eval": {}, "evaluated": False}],
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

    The evaluation goes into ``history[round_]`` (``eval``, ``global_eval``, ``eval_failures``,
    ``evaluated``; for ``-1``: ``initial_eval``) and into a write-once object next to the round's
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
    else:
        record = {
            "federation_id": config.federation_id,
            "round": round_ + 1,  # 0: the initial global adapter
            "global": state.global_ref.model_dump(),
            "eval": {e.silo: e.result for e in evals},
            "global_eval": summarize_evals(evals),
            "eval_failures": {f.silo: f.error for f in failures},
            "silotune_version": __version__,
        }
        put_json(store, key, record)
    entry = {"eval": record["eval"], "global_eval": record["global_eval"]}
    if record["eval_failures"]:
        entry["eval_failures"] = record["eval_failures"]
    if round_ < 0:
        new_state = state.model_copy(update={"initial_eval": entry})
    else:
        history = [*state.history[:-1], {**state.history[-1], **entry, "evaluated": True}]
        new_state = state.model_copy(update={"history": history})
    if save:
        save_state(store, new_state)
    return new_state
