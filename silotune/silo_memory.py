"""Each silo's peak training memory, from its federation config (``silotune estimate``, ``plan``).

A silo's method, with its options (bits, rank, base dtype, gradient checkpointing)
and LoRA shape, declares its footprint on the model's shape (``Method.footprint``);
the objective (DPO doubles the rows and may keep a reference copy) and the training
batch complete the estimate, which :func:`silotune.memory_estimate.estimate` sums.
The model's shape comes from its ``config.json``, or a named preset for models
that are not on this machine.
"""

from __future__ import annotations

import dataclasses
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
    gradient_checkpointing: bool = False,
    precision: str = "fp32",
) -> MemoryEstimate:
    """Estimated peak memory of one local step of ``method`` configured by ``options`` and ``lora``.

    ``gradient_checkpointing``: ``train.gradient_checkpointing`` (either it or the method's option
    turns it on, as in training). ``precision``: the resolved ``train.precision``; bf16/fp16
    autocast keeps 16-bit activations even on an fp32 base.
    """
    impl = get_method(method)
    opts = parse_options(impl, options or {})
    fp = impl.footprint(shape, opts, _lora_spec(lora))
    if precision in ("bf16", "fp16") and fp.compute_bytes > 2:
        fp = dataclasses.replace(fp, compute_bytes=2)
    return estimate(
        shape,
        fp,
        batch=batch,
        seq=seq,
        gradient_checkpointing=opts.gradient_checkpointing or gradient_checkpointing,
        objective=objective,
    )


def estimate_silo(config: FederationConfig, silo: str, *, shape: ModelShape | None = None) -> MemoryEstimate:
    """Estimated peak training memory of ``silo`` in ``config`` (one local step, its placement's settings)."""
    spec = config.method_for(silo)
    return estimate_method(
        shape or model_shape(config),
        spec.name,
        batch=config.train.batch_size,
        seq=config.model.max_seq_len,
        options=spec.options,
        lora=config.lora_for(silo),
        objective=config.objective_for(silo).name,
        gradient_checkpointing=config.train.gradient_checkpointing,
        precision=planned_precision(config.train.precision, config.silo(silo).device or config.train.device),
    )


def planned_precision(precision: str, device: str) -> str:
    """The precision a silo will train in, judged from its config alone (no GPU needed to ask).

    auto is bf16 on a named CUDA device (the GPUs silotune plans for support it; an older one
    falls back to fp16, the same bytes) and fp32 otherwise, the CPU case and the upper bound.
    """
    if precision != "auto":
        return precision
    return "bf16" if device.startswith("cuda") else "fp32"


def _lora_spec(lora: LoraSpec | Mapping[str, Any] | None) -> LoraSpec:
    return lora if isinstance(lora, LoraSpec) else LoraSpec.model_validate(dict(lora or {}))
