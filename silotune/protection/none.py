"""No protection: plaintext updates, so every aggregator (robust rules included) can run.

The coordinator sees each silo's delta. Silos still sign (when the federation signs) and their
DP filters still apply; this scheme only decides the update's encoding and the aggregation.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from safetensors.torch import load as st_load

from silotune.adapters import TensorDict, global_norm, lora_b_keys
from silotune.aggregation import (
    ClientUpdate,
    build_aggregator,
    build_server_optimizer,
    check_update,
    example_weights,
    scaffold,
)
from silotune.aggregation.stacking import stacked_update
from silotune.config import FederationConfig
from silotune.errors import SilotuneError, StoreError, UpdateError
from silotune.methods import hetero, stacked
from silotune.protection.base import (
    AggregateRecord,
    AggregationJob,
    ObjectRef,
    SiloContext,
    global_round,
    require_quorum,
    sign_object,
    verify_coordinator,
)
from silotune.root_update import prepare_aggregator
from silotune.store import (
    FederationLayout,
    ObjectStore,
    get_json,
    get_tensors,
    put_tensors,
    save_tensors,
    sha256,
)

log = logging.getLogger(__name__)


def exchanged_keys(config: FederationConfig, state: dict[str, Any]) -> list[str]:
    """The adapter tensors silos train and upload: LoRA B only under FFA-LoRA, else all."""
    return lora_b_keys(state) if config.ffa_lora else sorted(state)


def update_template(config: FederationConfig, global_state: TensorDict) -> TensorDict:
    """The tensors (and shapes) of a silo's update: the exchanged ones, plus SCAFFOLD's control keys."""
    sub = {k: global_state[k] for k in exchanged_keys(config, global_state)}
    return scaffold.template(sub) if config.aggregation.algorithm == "scaffold" else sub


def read_plain_global(ctx: SiloContext, ref: ObjectRef) -> tuple[TensorDict, int]:
    """A plaintext global adapter, checked against its sha256 and the coordinator's signature."""
    data = ctx.store.get(ref.key)
    if sha256(data) != ref.sha256:
        raise UpdateError(
            ctx.silo, f"{ref.key}: sha256 mismatch (the global adapter changed or was corrupted)"
        )
    verify_coordinator(ctx.config, ctx.store, ref.key, data, round_=global_round(ref.key), purpose="global")
    try:
        return dict(st_load(data)), len(data)
    except Exception as exc:
        raise UpdateError(ctx.silo, f"{ref.key}: not a valid safetensors object ({exc})") from None


def load_server_state(store: ObjectStore, layout: FederationLayout, round_: int, optimizer: Any) -> bool:
    """Load round ``round_ - 1``'s server optimizer state into ``optimizer``; False when there is none.

    The state is the one the committed manifest of round ``round_ - 1`` names, checked against its
    sha256 (manifests written before the state was listed fall back to the state's fixed key).
    """
    key = layout.manifest(round_ - 1)
    manifest = get_json(store, key) if store.exists(key) else {}
    ref = manifest.get("objects", {}).get("server_state")
    if ref is not None:
        optimizer.load_state_dict(get_tensors(store, ref["key"], expected_sha256=ref["sha256"]))
        return True
    if store.exists(layout.server_state(round_ - 1)):
        optimizer.load_state_dict(get_tensors(store, layout.server_state(round_ - 1)))
        return True
    return False


def load_server_control(
    store: ObjectStore, layout: FederationLayout, round_: int, template: TensorDict
) -> TensorDict:
    """SCAFFOLD's server variate entering round ``round_``: zero in round 0, else the one round
    ``round_ - 1``'s manifest names (checked against its sha256); a missing one is an error."""
    if round_ == 0:
        return scaffold.zeros(template)
    key = layout.manifest(round_ - 1)
    ref = (get_json(store, key) if store.exists(key) else {}).get("objects", {}).get("server_control")
    if ref is None:
        raise StoreError(
            f"round {round_ + 1}: round {round_}'s manifest ({key}) names no SCAFFOLD server control "
            f"variate in {store.describe()}; SCAFFOLD cannot continue without it"
        )
    control = get_tensors(store, ref["key"], expected_sha256=ref["sha256"])
    try:
        scaffold.check_variate(control, template, ref["key"])
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    return control


def step_control(
    job: AggregationJob, sub_global: TensorDict, combined: TensorDict, included: list[str]
) -> tuple[TensorDict, ObjectRef | None]:
    """SCAFFOLD: split the combined update into (mean Δy, mean Δc) and store the next server variate
    ``c + (|S|/N) mean Δc``; without SCAFFOLD the combined update is the delta and nothing is stored."""
    config = job.config
    if config.aggregation.algorithm != "scaffold":
        return combined, None
    spec = config.train
    mean_delta, mean_control = scaffold.split(combined, steps=spec.local_steps, lr=spec.learning_rate)
    server = load_server_control(job.store, job.layout, job.round, sub_global)
    new = scaffold.server_update(server, mean_control, included=len(included), total=len(config.silos))
    key = job.layout.control(job.round)
    meta = {"federation_id": config.federation_id, "round": str(job.round + 1)}
    return mean_delta, ObjectRef(key=key, sha256=put_tensors(job.store, key, new, metadata=meta))


def step_server(
    job: AggregationJob, global_state: TensorDict, combined: TensorDict, included: list[str]
) -> AggregateRecord:
    """Step the server optimizer with the combined delta; write (and sign) the next global adapter."""
    config, store, round_, layout = job.config, job.store, job.round, job.layout
    keys = exchanged_keys(config, global_state)
    sub_global = {k: global_state[k] for k in keys}
    combined, control_ref = step_control(job, sub_global, combined, included)
    optimizer = build_server_optimizer(
        config.aggregation.server_optimizer, **config.aggregation.server_options
    )
    loaded = round_ > 0 and load_server_state(store, layout, round_, optimizer)
    new_global = {**global_state, **optimizer.step(sub_global, combined)}
    key = layout.global_adapter(round_ + 1)
    data = save_tensors(new_global, {"federation_id": config.federation_id, "round": str(round_ + 1)})
    store.put(key, data)
    sign_object(config, store, key, data, round_=round_ + 1, purpose="global")
    server_ref = None
    opt_state = optimizer.state_dict()
    if opt_state and round_ > 0 and not loaded:
        raise StoreError(
            f"round {round_ + 1}: the server optimizer state of round {round_} "
            f"({layout.server_state(round_ - 1)}) is missing from {store.describe()}; "
            f"{optimizer.name!r} cannot continue without it"
        )
    if opt_state:
        skey = layout.server_state(round_)
        server_ref = ObjectRef(key=skey, sha256=put_tensors(store, skey, opt_state))
    return AggregateRecord(
        round=round_,
        included=included,
        excluded=job.excluded,
        next_global=ObjectRef(key=key, sha256=sha256(data)),
        server_state=server_ref,
        control=control_ref,
        delta_norm=global_norm(combined),
        seconds=job.seconds(),
    )


def check_factors(update: ClientUpdate, merged: TensorDict, rank: int) -> None:
    """A stacked round's upload: rank-``rank`` LoRA factors of every module of the merged global.

    Raises :class:`UpdateError` naming the silo (and tensor) for anything else: other keys, another
    rank than the silo's configured one, shapes that do not fit the module, non-float or non-finite values.
    """
    silo, factors = update.silo, update.delta
    if not isinstance(update.num_examples, int) or update.num_examples <= 0:
        raise UpdateError(silo, f"num_examples must be a positive integer, got {update.num_examples!r}")
    want = {
        m + suffix: shape
        for m in stacked.modules(merged)
        for suffix, shape in (
            (".lora_A.weight", (rank, merged[stacked.merged_key(m)].shape[1])),
            (".lora_B.weight", (merged[stacked.merged_key(m)].shape[0], rank)),
        )
    }
    missing, extra = sorted(set(want) - set(factors)), sorted(set(factors) - set(want))
    if missing or extra:
        raise UpdateError(
            silo, f"LoRA factors do not match the global (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for key, shape in want.items():
        t = factors[key]
        if not t.is_floating_point():
            raise UpdateError(silo, f"dtype {t.dtype} is not floating point", tensor=key)
        if tuple(t.shape) != shape:
            raise UpdateError(silo, f"shape {tuple(t.shape)} != expected {shape} (rank {rank})", tensor=key)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UpdateError(silo, f"{bad} non-finite value(s) (NaN/Inf)", tensor=key)


def aggregate_stacked(
    job: AggregationJob, merged: TensorDict, updates: list[ClientUpdate]
) -> AggregateRecord:
    """FLoRA: merge ``sum_k p_k · s_k · B_k @ A_k`` of the checked factors into the merged global.

    ``p_k``: FedAvg's example shares (uniform with ``aggregation.options.weighted: false``); ``s_k``:
    silo ``k``'s LoRA scaling ``alpha_k / r_k``. The sum goes through the server optimizer like any
    combined delta (plain ``sgd``: the next global is ``merged`` plus the sum, exactly).
    """
    config = job.config
    weighted = config.aggregation.options.get("weighted", True)
    weights = example_weights(updates) if weighted else [1.0 / len(updates)] * len(updates)
    specs = [config.lora_for(u.silo) for u in updates]
    product = stacked_update([u.delta for u in updates], weights, scalings=[s.alpha / s.r for s in specs])
    combined = {stacked.merged_key(m): d.to(merged[stacked.merged_key(m)].dtype) for m, d in product.items()}
    return step_server(job, merged, combined, [u.silo for u in updates])


class PlainScheme:
    name: ClassVar[str] = "none"
    extension: ClassVar[str] = "safetensors"
    steps_before_upload: ClassVar[tuple[str, ...]] = ()
    steps_after_upload: ClassVar[tuple[str, ...]] = ()
    publishes_at_silo: ClassVar[bool] = False

    def pack(self, ctx: SiloContext, delta: TensorDict) -> bytes:
        meta = {"federation_id": ctx.config.federation_id, "round": str(ctx.round), "silo": ctx.silo}
        return save_tensors(delta, meta)

    def read_global(self, ctx: SiloContext, ref: ObjectRef) -> tuple[TensorDict, int]:
        return read_plain_global(ctx, ref)

    def run_step(self, ctx: SiloContext, stage: str) -> dict[str, Any]:
        raise ValueError(f"protection 'none' has no silo step {stage!r}")

    def open_round(self, config: FederationConfig, store: ObjectStore, round_: int) -> list[str]:
        return []  # nothing to announce before the round's uploads

    def close_upload(
        self, config: FederationConfig, store: ObjectStore, round_: int, valid: dict[str, bytes]
    ) -> list[str]:
        return sorted(valid)

    def aggregate(self, job: AggregationJob) -> AggregateRecord:
        """Parse and check each plaintext delta, then the configured (robust) aggregator."""
        config = job.config
        global_state = get_tensors(job.store, job.global_ref.key, expected_sha256=job.global_ref.sha256)
        sub_global = update_template(config, global_state)
        updates: list[ClientUpdate] = []
        for silo, payload in job.valid.items():
            try:
                try:
                    delta = dict(st_load(payload))
                except Exception as exc:
                    raise UpdateError(silo, f"not a valid safetensors update ({exc})") from None
                # 0: the silo's policy withholds its example count; it then weighs like every other.
                upd = ClientUpdate(silo=silo, delta=delta, num_examples=job.num_examples.get(silo) or 1)
                if config.aggregation.lora_merge == "stack":  # whole factors of the silo's own rank
                    check_factors(upd, global_state, config.lora_for(silo).r)
                else:
                    check_update(upd, sub_global)
                updates.append(upd)
            except SilotuneError as exc:
                job.excluded[silo] = str(exc)
                log.warning("round %d: excluding silo %s: %s", job.round + 1, silo, exc)
        require_quorum(config, job.round, [u.silo for u in updates], job.excluded)
        if config.aggregation.lora_merge == "stack":
            return aggregate_stacked(job, global_state, updates)
        aggregator = build_aggregator(config.aggregation.name, **config.aggregation.options)
        prepare_aggregator(aggregator, config, job.store, job.round)  # FLTrust: this round's root update
        combined = aggregator.aggregate(updates)
        if config.silo_ranks() is not None:  # validated: plaintext FedAvg only
            combined = hetero.rescale_by_coverage(
                combined,
                [config.lora_for(u.silo).r for u in updates],
                example_weights(updates)
                if config.aggregation.options.get("weighted", True)
                else [1.0 / len(updates)] * len(updates),
            )
        return step_server(job, global_state, combined, [u.silo for u in updates])
