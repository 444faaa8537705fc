"""The coordinator's root update for trust-bootstrapped aggregation (FLTrust).

Cao et al., NDSS 2021: the server holds a small, clean *root data set* (public
or collected by the coordinator itself, never a silo's private data) and each
round trains on it from the broadcast global adapter, exactly as a silo would.
The resulting delta is the direction every silo's delta is scored against.

:func:`train_root_update` runs on the coordinator before aggregation and writes
the delta to ``rounds/<r>/root_update``; :func:`prepare_aggregator` hands it to
an aggregator that asks for one (it has ``set_root_update``), inside
:func:`~silotune.federation.aggregate_round`.
"""

from __future__ import annotations

from pydantic import BaseModel

from silotune.adapters import AdapterModel, lora_b_keys
from silotune.config import FederationConfig
from silotune.data import encode_dataset, read_records
from silotune.errors import ConfigError
from silotune.reuse import WorkMemo, copy_training, file_sha256, memo_key, tensor_digest
from silotune.store import FederationLayout, ObjectStore, get_tensors, put_tensors
from silotune.training import TrainResult, silo_seed, train_local


class RootUpdateRecord(BaseModel):
    round: int
    key: str
    sha256: str
    num_examples: int
    final_loss: float


def train_root_update(
    config: FederationConfig,
    round_: int,
    global_key: str,
    global_sha256: str,
    store: ObjectStore,
    adapter: AdapterModel,
    *,
    progress: bool = False,
    memo: WorkMemo | None = None,
) -> RootUpdateRecord:
    """Train on the root data set from round ``round_``'s global adapter; store the delta.

    Same recipe (``config.train``) as the silos, with a seed no silo uses, and the
    same tensors (LoRA B only under FFA-LoRA). No DP: the root data set is public.
    Idempotent: the same inputs write the same object under the same key.
    """
    path = config.aggregation.root_data_path
    if path is None:
        raise ConfigError("aggregation.root_data_path is not set: there is no root data set to train on")
    global_state = get_tensors(store, global_key, expected_sha256=global_sha256)
    examples = encode_dataset(read_records(path), adapter.tokenizer, config.model.max_seq_len)
    keys = lora_b_keys(global_state) if config.ffa_lora else sorted(global_state)
    seed = silo_seed(config.seed, round_, len(config.silos))
    frozen = sorted(set(global_state) - set(keys))

    def run() -> tuple[dict, TrainResult]:
        return train_local(
            adapter,
            global_state,
            examples,
            config.train,
            seed=seed,
            desc=f"round {round_ + 1} · root data",
            progress=progress,
            frozen=frozen,
            exchanged=keys,
        )

    if memo is None:
        d, result = run()
    else:  # experiments only (silotune.reuse): identical inputs, identical delta
        key = memo_key(
            "root-update",
            tensor_digest(global_state),
            file_sha256(path),
            seed,
            config.model,
            config.lora,
            config.method,
            config.train,
            frozen,
            keys,
        )
        d, result = memo.get_or_compute(key, run, copy_training)
    key = FederationLayout(config.federation_id).root_update(round_)
    sha = put_tensors(
        store, key, d, metadata={"federation_id": config.federation_id, "round": str(round_), "silo": "root"}
    )
    return RootUpdateRecord(
        round=round_, key=key, sha256=sha, num_examples=result.num_examples, final_loss=result.final_loss
    )


def prepare_aggregator(aggregator: object, config: FederationConfig, store: ObjectStore, round_: int) -> None:
    """Give ``aggregator`` this round's root update if it takes one; otherwise do nothing."""
    set_root = getattr(aggregator, "set_root_update", None)
    if set_root is None:
        return
    key = FederationLayout(config.federation_id).root_update(round_)
    if not store.exists(key):
        raise ConfigError(
            f"round {round_ + 1}: aggregator {config.aggregation.name!r} needs the coordinator's root update "
            f"({key}), which is missing; the coordinator trains it on aggregation.root_data_path before "
            "aggregating (silotune.root_update.train_root_update, the 'root-update' task)"
        )
    set_root(get_tensors(store, key))
