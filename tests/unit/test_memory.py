"""The memory estimator against known counts and the paper's section 2.2 figures."""

from __future__ import annotations

import pytest

from silotune.memory import GIB, SHAPES, ModelShape, estimate, trainable_params

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_smollm2_counts_match_the_real_model() -> None:
    s = SHAPES["smollm2-135m"]
    assert s.num_params() == 134_515_008  # the converted SmolLM2-135M-Instruct (docs/facts)
    assert trainable_params(s, "lora", lora_r=8) == 460_800  # LoRA r=8 on q,v (docs/facts)
    assert trainable_params(s, "lora", lora_r=8, lora_targets=ALL) == 2_442_240  # all linear: 2.44 M
    assert trainable_params(s, "prompt_tuning", num_virtual_tokens=16) == 16 * 576


def test_tiny_model_counts_match_torch(tiny_adapter) -> None:
    import json

    cfg = json.loads((tiny_adapter.model_path / "config.json").read_text())
    shape = ModelShape.from_hf_config(cfg)
    base = tiny_adapter.model.get_base_model()
    n_base = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    assert shape.num_params() == n_base
    assert trainable_params(shape, "lora", lora_r=4) == tiny_adapter.num_trainable()


def test_qlora_nf4_weights_match_the_measured_footprint() -> None:
    # facts: SmolLM2 in 4-bit NF4 has a get_memory_footprint() of 166 MB (fp32 embeddings, packed linears).
    e = estimate(SHAPES["smollm2-135m"], "qlora", batch=1, seq=16, lora_r=8)
    assert (e.weights + e.quant_constants - 460_800 * 4) / 1e6 == pytest.approx(166, rel=0.06)


def test_paper_section_2_2_figures() -> None:
    """QLoRA: 7B in ~5 GB, 65B on one 48 GB GPU; 16-bit full fine-tuning of 65B: over 780 GB."""
    kw = dict(batch=1, seq=512, weight_bytes=2, other_bytes=2, compute_bytes=2, gradient_checkpointing=True)
    q7 = estimate(SHAPES["llama-2-7b"], "qlora", lora_r=8, **kw)
    assert 4.0 < q7.total / 1e9 < 6.0
    # The QLoRA paper's recipe: r=64 on every linear layer, adapters in bf16; it reports ~41 GB.
    q65 = estimate(SHAPES["llama-65b"], "qlora", lora_r=64, lora_targets=ALL, adapter_bytes=2, **kw)
    assert 38 < q65.total / 1e9 < 48
    f65 = estimate(
        SHAPES["llama-65b"],
        "full",
        batch=1,
        seq=512,
        weight_bytes=2,
        mixed_precision=True,
        gradient_checkpointing=True,
    )
    assert f65.total / 1e9 > 780


def test_monotone_in_batch_rank_and_checkpointing() -> None:
    s = SHAPES["llama-1b"]
    a = estimate(s, "lora", batch=2, seq=256).total
    assert estimate(s, "lora", batch=4, seq=256).total > a
    assert estimate(s, "lora", batch=2, seq=256, lora_r=64).total > a
    assert estimate(s, "lora", batch=2, seq=256, gradient_checkpointing=True).total < a
    assert estimate(s, "qlora", batch=2, seq=256).weights < estimate(s, "lora", batch=2, seq=256).weights / 4
    assert estimate(s, "full", batch=2, seq=256, objective="dpo").reference == s.num_params() * 4
    with pytest.raises(ValueError, match="unknown method 'adalora'"):
        estimate(s, "adalora", batch=1, seq=8)
    assert estimate(s, "qlora", batch=1, seq=8, bits=8).weights > estimate(s, "qlora", batch=1, seq=8).weights
    assert GIB == 2**30


def test_memory_module_imports_nothing_beyond_the_standard_library() -> None:
    """bench/gpu_qlora_memory.py loads it by path on a machine without silotune's dependencies."""
    import ast
    from pathlib import Path

    import silotune.memory as m

    tree = ast.parse(Path(m.__file__).read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert mods <= {"__future__", "collections.abc", "dataclasses", "typing"}
