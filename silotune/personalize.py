"""Personalisation at a silo: a few local steps from the federation's final global, kept private.

After the federation, a silo may fine-tune the final global adapter on its own training data for its
own use (Tan et al., "Towards Personalized Federated Learning", 2022, survey the options; this is the
simplest, local fine-tuning of the global model). The result stays in the silo's private folder,
``<private_dir>/personalized/<federation_id>/``, as a PEFT folder: nothing is uploaded, so nothing
about it reaches the coordinator or the store, and no privacy budget is spent on it (it is never
released).

Which adapter the silo keeps is decided on its *validation* file (``val.jsonl`` beside its training
file, or the path given), never on the holdout: if the personalised adapter's validation loss is not
lower than the global's (too many steps, too high a learning rate, too little data), the folder holds
the global and the record says so. :func:`compare_on_holdout` then reports both on the silo's own
holdout, for the report only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from safetensors.torch import load as st_load

from silotune.adapters import AdapterModel, apply_delta
from silotune.config import FederationConfig
from silotune.data import encode_file, is_preference_file
from silotune.errors import ConfigError
from silotune.evaluation import evaluate
from silotune.federation.commit import load_state
from silotune.methods import hetero
from silotune.methods.objectives import build_objective
from silotune.protection import exchanged_keys, scheme_for
from silotune.protection.base import SiloContext
from silotune.store import ObjectStore, save_tensors
from silotune.training import silo_seed, train_local


class Personalized(BaseModel):
    """Where a silo's personalised adapter is, what it started from, and how its training went."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    silo: str
    federation_id: str
    folder: str  # in the silo's private folder
    global_sha256: str
    rounds: int
    steps: int
    train: dict[str, float | int]
    # The choice: "personalized", or "global" when the personalised adapter did not lower the validation
    # loss; "personalized" without a validation file (nothing to decide on).
    kept: Literal["personalized", "global"] = "personalized"
    validation_loss: dict[str, float] | None = None  # {"global": …, "personalized": …}
    validation_path: str | None = None


def validation_file(config: FederationConfig, silo: str, path: str | Path | None = None) -> Path | None:
    """The silo's validation file: ``path``, else ``val.jsonl`` beside its training file if present."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"validation file {p} of silo {silo!r} does not exist")
        return p
    beside = Path(config.silo(silo).train_path).with_name("val.jsonl")
    return beside if beside.is_file() else None


def personalized_folder(config: FederationConfig, silo: str) -> Path:
    return Path(config.silo(silo).private_folder) / "personalized" / config.federation_id


def _final_global(config: FederationConfig, silo: str, store: ObjectStore) -> tuple[dict[str, Any], Any]:
    """The final global as this silo reads it (verified; decrypted by the silo under CKKS)."""
    state = load_state(store, config.federation_id)
    if state is None or state.completed_rounds == 0:
        raise ConfigError(f"federation {config.federation_id!r} has no trained global adapter to personalise")
    if config.aggregation.lora_merge == "stack":
        raise ConfigError(
            f"federation {config.federation_id!r} stacks LoRA ranks (aggregation.lora_merge 'stack'): its "
            "global is a merged update, not an adapter to fine-tune; export it (--format merged) and "
            "fine-tune that model"
        )
    ctx = SiloContext(config, silo, state.completed_rounds, store)
    tensors, _ = scheme_for(config).read_global(ctx, state.global_ref)
    return hetero.truncate(tensors, config.lora_for(silo).r), state


def personalize_silo(
    config: FederationConfig,
    silo: str,
    store: ObjectStore,
    adapter: AdapterModel,
    *,
    steps: int | None = None,
    learning_rate: float | None = None,
    validation: str | Path | None = None,
    progress: bool = False,
) -> Personalized:
    """Fine-tune the final global on the silo's own training data; write it to its private folder only.

    ``steps`` and ``learning_rate`` default to the federation's ``train.local_steps`` and
    ``train.learning_rate``. ``validation``: the file that decides whether the personalised adapter is
    kept (default: ``val.jsonl`` beside the training file). The store is only read.
    """
    global_state, state = _final_global(config, silo, store)
    spec = config.silo(silo)
    objective = build_objective(config.objective_for(silo))
    examples = encode_file(
        spec.train_path, adapter.tokenizer, config.model.max_seq_len, pairs=objective is not None
    )
    train = config.train.model_copy(
        update={
            k: v for k, v in {"local_steps": steps, "learning_rate": learning_rate}.items() if v is not None
        }
    )
    keys = exchanged_keys(config, global_state)
    index = [s.name for s in config.silos].index(silo)
    delta, result = train_local(
        adapter,
        global_state,
        examples,
        train,
        seed=silo_seed(config.seed, state.completed_rounds, index),
        desc=f"personalise · {silo}",
        progress=progress,
        frozen=sorted(set(global_state) - set(keys)),
        exchanged=keys,
        objective=objective,
    )
    personal = apply_delta(global_state, delta)
    kept, val_loss, val_path = "personalized", None, validation_file(config, silo, validation)
    if val_path is not None:
        val = encode_file(val_path, adapter.tokenizer, config.model.max_seq_len, pairs=objective is not None)
        if not val:
            raise ConfigError(f"validation file {val_path} of silo {silo!r} holds no usable record")
        beta = config.objective_for(silo).beta
        size = config.evaluation.batch_size
        val_loss = {
            name: float(evaluate(adapter, val, batch_size=size, state=st, beta=beta).loss)
            for name, st in (("global", global_state), ("personalized", personal))
        }
        if not val_loss["personalized"] < val_loss["global"]:
            kept, personal = "global", global_state
    dest = personalized_folder(config, silo)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        adapter.save_pretrained(tmp / "adapter", personal)  # PEFT format, for the silo's own serving
        (tmp / "state.safetensors").write_bytes(save_tensors(personal))  # the adapter's own tensor names
        record = Personalized(
            silo=silo,
            federation_id=config.federation_id,
            folder=str(dest / "adapter"),
            global_sha256=state.global_ref.sha256,
            rounds=state.completed_rounds,
            steps=train.local_steps,
            train=result.as_dict(),
            kept=kept,
            validation_loss=val_loss,
            validation_path=str(val_path) if val_path is not None else None,
        )
        (tmp / "personalized.json").write_text(record.model_dump_json(indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)  # the whole folder or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def compare_on_holdout(
    config: FederationConfig, silo: str, store: ObjectStore, adapter: AdapterModel
) -> dict[str, dict[str, float | int]]:
    """The silo's holdout metrics of the final global and of its personalised adapter.

    ``{"global": {...}, "personalized": {...}}`` (loss, exact match; preference metrics on preference
    silos). Needs :func:`personalize_silo` to have run at this silo, and the silo's ``eval_path``.
    """
    spec = config.silo(silo)
    if spec.eval_path is None:
        raise ConfigError(f"silos.{silo}.eval_path: the silo has no holdout to compare on")
    meta = personalized_folder(config, silo) / "personalized.json"
    if not meta.is_file():
        raise ConfigError(
            f"silo {silo!r} has no personalised adapter for {config.federation_id!r}: run personalize"
        )
    record = Personalized.model_validate(json.loads(meta.read_text()))
    global_state, state = _final_global(config, silo, store)
    if state.global_ref.sha256 != record.global_sha256:
        raise ConfigError(
            f"silo {silo!r}: its personalised adapter started from another global "
            f"({record.global_sha256[:12]}…, now {state.global_ref.sha256[:12]}…): personalise again"
        )
    examples = encode_file(
        spec.eval_path, adapter.tokenizer, config.model.max_seq_len, pairs=is_preference_file(spec.eval_path)
    )
    if config.evaluation.max_examples:
        examples = examples[: config.evaluation.max_examples]
    beta = config.objective_for(silo).beta
    size = config.evaluation.batch_size
    personal = dict(st_load((personalized_folder(config, silo) / "state.safetensors").read_bytes()))
    return {
        "global": evaluate(adapter, examples, batch_size=size, state=global_state, beta=beta).as_dict(),
        "personalized": evaluate(adapter, examples, batch_size=size, state=personal, beta=beta).as_dict(),
    }
