"""The silo's side of a round: fetch the global it accepts, train, filter, pack and upload; evaluate.

The filters run in order and fail closed: DP-SGD in training (on the silo's ledger), client-level
clip and noise, then the protection scheme's packing (plaintext, masked or encrypted) and signing.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from safetensors.torch import load as st_load

from silotune.adapters import AdapterModel, TensorDict, apply_delta
from silotune.aggregation import scaffold
from silotune.config import FederationConfig
from silotune.data import (
    encode_dataset,
    encode_file,
    encode_preferences,
    is_preference_file,
    read_preferences,
    read_records,
)
from silotune.evaluation import evaluate
from silotune.keys import SiloVault, write_private
from silotune.methods import hetero, stacked
from silotune.methods.objectives import build_objective
from silotune.poisoning import attack_silo_update, poison_pairs, poison_silo_records
from silotune.privacy.filters import apply_client_dp, noise_key, record_sample_dp, sample_dp_plan
from silotune.protection import ProtocolRefusal, SiloContext, exchanged_keys, scheme_for
from silotune.protection.base import read_json_object, verify_coordinator
from silotune.records import EvalRecord, ObjectRef, UpdateRecord
from silotune.reuse import WorkMemo, copy_training, file_sha256, memo_key, tensor_digest
from silotune.store import FederationLayout, ObjectStore, get_tensors, save_tensors, sha256
from silotune.training import DPSGD, TrainResult, silo_seed, train_local


def _silo_examples(
    config: FederationConfig, path: str, adapter: AdapterModel, *, pairs: bool = False
) -> list[Any]:
    return encode_file(path, adapter.tokenizer, config.model.max_seq_len, pairs=pairs)


class TrainedDelta(BaseModel):
    """What the train step leaves for the next steps: where the delta is, and small facts about it."""

    silo: str
    round: int
    delta: str  # a file in the silo's private folder (never a tensor across a task boundary)
    num_examples: int
    train: dict[str, float | int]
    privacy: dict[str, float] = Field(default_factory=dict)
    inputs: dict[str, str]  # global sha256, config fingerprint, data sha256: what DP releases bind to
    bytes_down: int = 0
    control: str | None = None  # SCAFFOLD: the round's server and silo variates (private folder)


def _work(config: FederationConfig, silo: str, round_: int) -> Path:
    """The silo's scratch folder for a round's steps (in its private folder, mode 0700)."""
    return SiloVault.for_silo(config.silo(silo)).root / "work" / config.federation_id / f"{round_:05d}"


def _write(path: Path, data: bytes) -> str:
    write_private(path, data)
    return str(path)


def _read_tensors(path: str) -> TensorDict:
    return dict(st_load(Path(path).read_bytes()))


# -- SCAFFOLD's control variates (silotune.aggregation.scaffold) ---------------------------------------

MAX_MANIFEST_BYTES = 1 << 22  # a round's manifest is a few kB per silo


def _manifest(config: FederationConfig, store: ObjectStore, round_: int) -> dict[str, Any] | None:
    """Round ``round_``'s committed manifest (None: none), signed by the coordinator if its key is pinned."""
    key = FederationLayout(config.federation_id).manifest(round_)
    if not store.exists(key):
        return None
    data = store.get_bounded(key, MAX_MANIFEST_BYTES)
    verify_coordinator(config, store, key, data, round_=round_, purpose="manifest")
    doc = read_json_object(data, key)
    return doc if isinstance(doc, dict) else None


def server_control(
    config: FederationConfig,
    silo: str,
    round_: int,
    store: ObjectStore,
    global_ref: ObjectRef,
    template: TensorDict,
) -> TensorDict:
    """The server variate ``c`` entering round ``round_``: zero in round 0, else the one named (with its
    sha256) by round ``round_ - 1``'s manifest, which must name ``global_ref`` as its output: the silo
    corrects its steps only with the variate that belongs to the global it trains from."""
    if round_ == 0:
        return scaffold.zeros(template)
    refuse = f"silo {silo!r} refuses the server control variate of round {round_ + 1}"
    manifest = _manifest(config, store, round_ - 1)
    objects = (manifest or {}).get("objects")
    if not isinstance(objects, dict):
        raise ProtocolRefusal(f"{refuse}: round {round_}'s manifest is missing or has no objects")
    out = objects.get("global_out")
    if not isinstance(out, dict) or (out.get("key"), out.get("sha256")) != (
        global_ref.key,
        global_ref.sha256,
    ):
        raise ProtocolRefusal(f"{refuse}: round {round_}'s manifest does not name the global it was sent")
    ref = objects.get("server_control")
    if not (isinstance(ref, dict) and isinstance(ref.get("key"), str) and isinstance(ref.get("sha256"), str)):
        raise ProtocolRefusal(f"{refuse}: round {round_}'s manifest names none")
    if ref["key"] != FederationLayout(config.federation_id).control(round_ - 1):
        raise ProtocolRefusal(f"{refuse}: {ref['key']!r} is not round {round_}'s control variate key")
    control = get_tensors(store, ref["key"], expected_sha256=ref["sha256"])
    try:
        scaffold.check_variate(control, template, ref["key"])
    except ValueError as exc:
        raise ProtocolRefusal(f"{refuse}: {exc}") from None
    return control


def silo_control(
    config: FederationConfig, silo: str, round_: int, store: ObjectStore, template: TensorDict
) -> TensorDict:
    """The silo's own variate ``c_i`` entering round ``round_``, from its private folder.

    The variate written after training in round ``r`` counts once round ``r``'s manifest lists the
    silo among the included: an update that was excluded (or a round redone after a crash) left the
    server variate without its Δc, so ``c_i`` stays where it was, as the invariant ``c = mean c_i`` needs.
    """
    folder = SiloVault.for_silo(config.silo(silo)).control_folder(config.federation_id)
    written = (
        [int(p.stem) for p in folder.glob("*.safetensors") if p.stem.isdigit()] if folder.is_dir() else []
    )
    for r in sorted((r for r in written if r < round_), reverse=True):
        manifest = _manifest(config, store, r)
        if manifest is not None and silo in (manifest.get("included") or []):
            path = folder / f"{r:05d}.safetensors"
            control = _read_tensors(str(path))
            scaffold.check_variate(control, template, str(path))
            return control
    return scaffold.zeros(template)


def _with_control(config: FederationConfig, trained: TrainedDelta, d: TensorDict) -> TensorDict:
    """Option II on the delta the silo releases; ``c_i+`` goes to its private folder; the framed update.

    Computed from the released delta (after client DP), so Δc adds nothing to what Δy reveals.
    """
    assert trained.control is not None
    saved = _read_tensors(trained.control)
    server = {k.removeprefix("server/"): v for k, v in saved.items() if k.startswith("server/")}
    own = {k.removeprefix("silo/"): v for k, v in saved.items() if k.startswith("silo/")}
    steps, lr = config.train.local_steps, config.train.learning_rate
    new, delta_c = scaffold.silo_update(own, server, d, steps=steps, lr=lr)
    folder = SiloVault.for_silo(config.silo(trained.silo)).control_folder(config.federation_id)
    write_private(folder / f"{trained.round:05d}.safetensors", save_tensors(new))
    return scaffold.frame(d, delta_c, steps=steps, lr=lr)


def train_step(
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
) -> TrainedDelta:
    """Fetch the global adapter the silo accepts and post-train on local data (DP-SGD if configured).

    The delta goes to the silo's private folder. ``memo`` (experiments only, :mod:`silotune.reuse`):
    reuse the training result of an earlier call with identical inputs; never used with DP-SGD.
    """
    spec = config.silo(silo)
    index = [s.name for s in config.silos].index(silo)
    ctx = SiloContext(config, silo, round_, store)
    if silo not in ctx.roster:  # the silo redoes the round's draw from its own config
        raise ProtocolRefusal(
            f"silo {silo!r} refuses to train in round {round_ + 1}: it is not among the silos drawn for "
            f"this round ({len(ctx.roster)} of {len(config.silos)}, aggregation.silos_per_round)"
        )
    global_state, bytes_down = scheme_for(config).read_global(ctx, global_ref)
    objective = build_objective(config.objective_for(silo))
    if spec.poison is not None and objective is None:  # evaluation-only data poisoning of SFT records
        raw = read_records(spec.train_path)
        records = poison_silo_records(spec, raw, seed=silo_seed(config.seed, 0, index))
        examples = encode_dataset(records, adapter.tokenizer, config.model.max_seq_len)
    elif spec.poison is not None:  # ... and of a DPO silo's preference pairs
        pairs = poison_pairs(
            read_preferences(spec.train_path), spec.poison, seed=silo_seed(config.seed, 0, index)
        )
        examples = encode_preferences(pairs, adapter.tokenizer, config.model.max_seq_len)
    else:
        examples = _silo_examples(config, spec.train_path, adapter, pairs=objective is not None)
    full_global = global_state
    stacking = config.aggregation.lora_merge == "stack"
    if stacking:  # FLoRA: a fresh LoRA of the silo's own rank on top of the merged global
        global_state = stacked.fresh_lora(adapter, silo_seed(config.seed, round_, index))
        stacked.check_merged(full_global, global_state)
    else:
        global_state = hetero.truncate(global_state, config.lora_for(silo).r)
    keys = exchanged_keys(config, global_state)
    frozen = sorted(set(global_state) - set(keys))
    control = control_path = None
    if config.aggregation.algorithm == "scaffold":  # c - c_i corrects every local step
        template = {k: global_state[k] for k in keys}
        c = server_control(config, silo, round_, store, global_ref, template)
        c_i = silo_control(config, silo, round_, store, template)
        control = scaffold.correction(c, c_i)
        saved = {**{f"server/{k}": v for k, v in c.items()}, **{f"silo/{k}": v for k, v in c_i.items()}}
        control_path = _write(_work(config, silo, round_) / "scaffold.safetensors", save_tensors(saved))
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
        with stacked.merged_base(adapter, full_global) if stacking else contextlib.nullcontext():
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
                control=control,
            )

    if memo is None or dp is not None:
        d, result = run()
    else:
        key = memo_key(
            "train",
            tensor_digest(global_state),
            tensor_digest(full_global) if stacking else None,  # the merged base it trains on
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
            *([tensor_digest(control)] if control is not None else []),
        )
        d, result = memo.get_or_compute(key, run, copy_training)
    # Stacking: the whole factors (B started at zero, so s·B·A is exactly what the silo changed);
    # padding: a low-rank silo uploads its slice zero-padded.
    d = apply_delta(global_state, d) if stacking else hetero.pad(d, {k: full_global[k] for k in d})
    d = attack_silo_update(spec, d, seed=silo_seed(config.seed, round_, index))  # evaluation-only attacker
    if plan is not None:
        privacy.update(record_sample_dp(config, silo, round_, plan))
    path = _write(_work(config, silo, round_) / "delta.safetensors", save_tensors(d))
    return TrainedDelta(
        silo=silo,
        round=round_,
        delta=path,
        num_examples=result.num_examples,
        train=result.as_dict(),
        privacy=privacy,
        inputs=inputs,
        bytes_down=bytes_down,
        control=control_path,
    )


def clip_and_noise_step(
    config: FederationConfig, trained: TrainedDelta, *, lifetime_epsilon: float | None = None
) -> TrainedDelta:
    """Client-level DP: clip the delta and add this silo's share of the noise (on its ledger)."""
    if config.privacy.client_dp is None:
        return trained
    d = _read_tensors(trained.delta)
    d, info = apply_client_dp(
        config, trained.silo, trained.round, d, trained.inputs, lifetime_epsilon=lifetime_epsilon
    )
    path = _write(_work(config, trained.silo, trained.round) / "private.safetensors", save_tensors(d))
    return trained.model_copy(update={"delta": path, "privacy": {**trained.privacy, **info}})


def protect_step(config: FederationConfig, trained: TrainedDelta, store: ObjectStore) -> str:
    """The bytes that leave the silo (plaintext, masked or encrypted, by the scheme) into its folder."""
    ctx = SiloContext(config, trained.silo, trained.round, store)
    d = _read_tensors(trained.delta)
    if trained.control is not None:  # SCAFFOLD: Δc travels in the same (masked) update as Δy
        d = _with_control(config, trained, d)
    payload = scheme_for(config).pack(ctx, d)
    return _write(_work(config, trained.silo, trained.round) / "payload", payload)


def sign_step(config: FederationConfig, silo: str, round_: int, payload_path: str) -> str | None:
    """The silo's Ed25519 signature of its payload (None when the federation does not sign)."""
    if not (config.security.signing or config.silo(silo).public_key is not None):
        return None
    vault = SiloVault.for_silo(config.silo(silo))
    sig = vault.signing_key().sign(
        Path(payload_path).read_bytes(), federation_id=config.federation_id, round=round_, silo=silo
    )
    return _write(_work(config, silo, round_) / "payload.sig", sig)


def upload_step(
    config: FederationConfig,
    trained: TrainedDelta,
    payload_path: str,
    signature_path: str | None,
    store: ObjectStore,
) -> UpdateRecord:
    """Put the payload and its signature into the silo's update slot; the plaintext scratch goes."""
    silo, round_ = trained.silo, trained.round
    key = FederationLayout(config.federation_id).update(round_, silo, scheme_for(config).extension)
    payload = Path(payload_path).read_bytes()
    signature = None
    if signature_path is not None:
        sig = Path(signature_path).read_bytes()
        store.put(key + ".sig", sig)
        signature = ObjectRef(key=key + ".sig", sha256=sha256(sig))
    store.put(key, payload)
    for name in ("delta.safetensors", "private.safetensors", "scaffold.safetensors"):  # not kept after upload
        (_work(config, silo, round_) / name).unlink(missing_ok=True)
    return UpdateRecord(
        silo=silo,
        round=round_,
        update=ObjectRef(key=key, sha256=sha256(payload)),
        num_examples=trained.num_examples,
        train=trained.train,
        protection=config.security.protection,
        signature=signature,
        privacy=trained.privacy,
        bytes_up=len(payload) + (64 if signature else 0),
        bytes_down=trained.bytes_down,
    )


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
    """A silo's whole local round: train → clip and noise → protect → sign → upload.

    The filters run in this order and fail closed (see :mod:`silotune.protection`). The silo's flow
    runs each step as its own task; this is the same sequence in one call, for notebooks and tests.
    """
    trained = train_step(
        config, silo, round_, global_ref, store, adapter,
        progress=progress, memo=memo, lifetime_epsilon=lifetime_epsilon,
    )  # fmt: skip
    trained = clip_and_noise_step(config, trained, lifetime_epsilon=lifetime_epsilon)
    payload = protect_step(config, trained, store)
    signature = sign_step(config, silo, round_, payload)
    return upload_step(config, trained, payload, signature, store)


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
    merged = None
    if config.aggregation.lora_merge == "stack":  # the merged global itself: a LoRA that adds nothing on it
        merged, state = state, stacked.fresh_lora(adapter, config.seed)
        stacked.check_merged(merged, state)
    else:
        state = hetero.truncate(state, config.lora_for(silo).r)

    def run() -> dict[str, Any]:
        examples = _silo_examples(config, spec.eval_path, adapter, pairs=is_preference_file(spec.eval_path))
        if config.evaluation.max_examples:
            examples = examples[: config.evaluation.max_examples]
        with stacked.merged_base(adapter, merged) if merged is not None else contextlib.nullcontext():
            res = evaluate(
                adapter,
                examples,
                batch_size=config.evaluation.batch_size,
                state=state,
                beta=config.objective_for(silo).beta,
            )
        return res.as_dict()

    t0 = time.perf_counter()
    if memo is None:
        result = run()
    else:
        key = memo_key(
            "evaluate",
            tensor_digest(state),
            tensor_digest(merged) if merged is not None else None,
            file_sha256(spec.eval_path),
            config.model,
            config.lora_for(silo),
            config.method_for(silo),
            config.objective_for(silo),
            config.evaluation,
        )
        result = memo.get_or_compute(key, run, dict)
    return EvalRecord(silo=silo, round=round_, result=result, seconds=time.perf_counter() - t0)
