"""Each silo's memory model: a federation config mapped onto :func:`silotune.memory.estimate`.

The method (and its options: bits, rank, base dtype, gradient checkpointing), the
objective (DPO doubles the rows and, for full fine-tuning, adds a frozen reference),
the LoRA shape and the training batch decide the estimate; the model's shape comes
from its ``config.json`` (or a named preset for models that are not on this machine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from silotune import memory

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_shape(config: Any) -> memory.ModelShape:
    """The shape of ``config.model``: from its config.json when the folder is here, else a preset."""
    name = config.model.name_or_path
    preset = memory.MODEL_SHAPES.get(name) or memory.MODEL_SHAPES.get(str(config.model.descriptor or ""))
    if preset:
        return memory.SHAPES[preset]
    from silotune.modeling import resolve_model_path

    path = resolve_model_path(name)
    return memory.ModelShape.from_hf_config(json.loads((Path(path) / "config.json").read_text()), name=name)


def estimate_silo(config: Any, silo: str, *, shape: memory.ModelShape | None = None) -> memory.MemoryEstimate:
    """Estimated peak training memory of ``silo`` in ``config`` (one local step)."""
    spec = config.method_for(silo)
    opts = dict(spec.options)
    lora = config.lora_for(silo)
    if spec.name == "qlora":
        compute = _DTYPE_BYTES[opts.get("compute_dtype", "float32")]
        weight, other = compute, 4  # prepare_model_for_kbit_training keeps non-quantised weights in fp32
    else:
        weight = compute = other = _DTYPE_BYTES[opts.get("base_dtype", "float32")]
    return memory.estimate(
        shape or model_shape(config),
        spec.name,
        batch=config.train.batch_size,
        seq=config.model.max_seq_len,
        lora_r=lora.r,
        lora_targets=tuple(lora.target_modules),
        bits=opts.get("bits", 4),
        double_quant=opts.get("double_quant", True),
        weight_bytes=weight,
        other_bytes=other,
        compute_bytes=compute,
        gradient_checkpointing=bool(opts.get("gradient_checkpointing", False)),
        num_virtual_tokens=opts.get("num_virtual_tokens", 16),
        train_embeddings=opts.get("train_embeddings", True),
        objective=config.objective_for(silo).name,
    )
