"""Each silo's peak training memory, from its federation config (``silotune estimate``, ``plan``).

A silo's method, with its options (bits, rank, base dtype, gradient checkpointing)
and LoRA shape, declares its footprint on the model's shape (``Method.footprint``);
the objective (DPO doubles the rows and may keep a reference copy) and the training
batch complete the estimate, which :func:`silotune.memory_estimate.estimate` sums.
The model's shape comes from its ``config.json``, or a named preset for models
that are not on this machine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from silotune.config import FederationConfig, LoraSpec
from silotune.memory_estimate import MODEL_SHAPES, SHAPES, Footprint, MemoryEstimate, ModelShape, estimate
from silotune.methods import get_method, parse_options
from silotune.modeling import resolve_model_path


def model_shape(config: FederationConfig) -> ModelShape:
    """The shape of ``config.model``: a preset for a known name or descriptor, else its config.json."""
    name = config.model.name_or_path
    preset = MODEL_SHAPES.get(name) or MODEL_SHAPES.get(str(config.model.descriptor or ""))
    if preset:
        return SHAPES[preset]
    path = resolve_model_path(name)
    return ModelShape.from_hf_config(json.loads((Path(path) / "config.json").read_text()), name=name)


def method_footprint(
    shape: ModelShape,
    method: str,
    *,
    options: Mapping[str, Any] | None = None,
    lora: LoraSpec | Mapping[str, Any] | None = None,
) -> Footprint:
    """The registered method ``method``'s footprint with ``options`` and LoRA shape ``lora`` on ``shape``."""
    impl = get_method(method)
    return impl.footprint(shape, parse_options(impl, options or {}), _lora_spec(lora))


def estimate_method(
    shape: ModelShape,
    method: str,
    *,
    batch: int,
    seq: int,
    options: Mapping[str, Any] | None = None,
    lora: LoraSpec | Mapping[str, Any] | None = None,
    objective: str = "sft",
) -> MemoryEstimate:
    """Estimated peak memory of one local step of ``method`` configured by ``options`` and ``lora``."""
    impl = get_method(method)
    opts = parse_options(impl, options or {})
    return estimate(
        shape,
        impl.footprint(shape, opts, _lora_spec(lora)),
        batch=batch,
        seq=seq,
        gradient_checkpointing=opts.gradient_checkpointing,
        objective=objective,
    )


def estimate_silo(config: FederationConfig, silo: str, *, shape: ModelShape | None = None) -> MemoryEstimate:
    """Estimated peak training memory of ``silo`` in ``config`` (one local step)."""
    spec = config.method_for(silo)
    return estimate_method(
        shape or model_shape(config),
        spec.name,
        batch=config.train.batch_size,
        seq=config.model.max_seq_len,
        options=spec.options,
        lora=config.lora_for(silo),
        objective=config.objective_for(silo).name,
    )


def _lora_spec(lora: LoraSpec | Mapping[str, Any] | None) -> LoraSpec:
    return lora if isinstance(lora, LoraSpec) else LoraSpec.model_validate(dict(lora or {}))
