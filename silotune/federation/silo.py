"""The silo's side of a round: fetch the global it accepts, train, filter, pack and upload; evaluate.

The filters run in order and fail closed: DP-SGD in training (on the silo's ledger), client-level
clip and noise, then the protection scheme's packing (plaintext, masked or encrypted) and signing.
"""

from __future__ import annotations

from typing import Any

from silotune.adapters import AdapterModel, TensorDict
from silotune.config import FederationConfig
from silotune.data import encode_dataset, encode_file, is_preference_file, read_records
from silotune.evaluation import evaluate
from silotune.memo import WorkMemo, copy_training, file_sha256, memo_key, tensor_digest
from silotune.methods import hetero
from silotune.methods.objectives import build_objective
from silotune.poisoning import attack_silo_update, poison_silo_records
from silotune.privacy.filters import apply_client_dp, noise_key, record_sample_dp, sample_dp_plan
from silotune.protection import SiloContext, exchanged_keys, scheme_for
from silotune.records import EvalRecord, ObjectRef, UpdateRecord
from silotune.store import ObjectStore, sha256
from silotune.training import DPSGD, TrainResult, silo_seed, train_local


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
    ``memo`` (experiments only, :mod:`silotune.memo`): reuse the training result of an
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
