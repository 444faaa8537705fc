"""The memory estimator, fed by each method's footprint, against known counts and the paper's section 2.2."""

from __future__ import annotations

import dataclasses

import pytest

from silotune.errors import RegistryError
from silotune.memory_estimate import GIB, SHAPES, Footprint, ModelShape, estimate
from silotune.silo_memory import estimate_method, method_footprint

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _trainable(shape: ModelShape, method: str, **kw) -> int:
    return method_footprint(shape, method, **kw).trainable_params


def test_smollm2_counts_match_the_real_model() -> None:
    s = SHAPES["smollm2-135m"]
    assert s.num_params() == 134_515_008  # the converted SmolLM2-135M-Instruct (docs/facts)
    assert _trainable(s, "lora", lora={"r": 8}) == 460_800  # LoRA r=8 on q,v (docs/facts)
    assert _trainable(s, "lora", lora={"r": 8, "target_modules": ALL}) == 2_442_240  # all linear: 2.44 M
    assert _trainable(s, "prompt_tuning", options={"num_virtual_tokens": 16}) == 16 * 576


def test_tiny_model_counts_match_torch(tiny_adapter) -> None:
    import json

    cfg = json.loads((tiny_adapter.model_path / "config.json").read_text())
    shape = ModelShape.from_hf_config(cfg)
    base = tiny_adapter.model.get_base_model()
    n_base = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    assert shape.num_params() == n_base
    assert _trainable(shape, "lora", lora={"r": 4}) == tiny_adapter.num_trainable()


def test_qlora_nf4_weights_match_the_measured_footprint() -> None:
    # facts: SmolLM2 in 4-bit NF4 has a get_memory_footprint() of 166 MB (fp32 embeddings, packed linears).
    e = estimate_method(SHAPES["smollm2-135m"], "qlora", batch=1, seq=16, lora={"r": 8})
    assert (e.weights + e.quant_constants - 460_800 * 4) / 1e6 == pytest.approx(166, rel=0.06)


def _bf16(shape: ModelShape, method: str, **kw) -> Footprint:
    # The papers' recipes keep every unquantised weight and activation in bf16 (norms included).
    fp = method_footprint(shape, method, **kw)
    return dataclasses.replace(fp, weight_bytes=2, other_bytes=2, compute_bytes=2)


def test_paper_section_2_2_figures() -> None:
    """QLoRA: 7B in ~5 GB, 65B on one 48 GB GPU; 16-bit full fine-tuning of 65B: over 780 GB."""
    kw = dict(batch=1, seq=512, gradient_checkpointing=True)
    s7, s65 = SHAPES["llama-2-7b"], SHAPES["llama-65b"]
    q7 = estimate(s7, _bf16(s7, "qlora", lora={"r": 8}), **kw)
    assert 4.0 < q7.total / 1e9 < 6.0
    # The QLoRA paper's recipe: r=64 on every linear layer, adapters in bf16; it reports ~41 GB.
    q65 = estimate(s65, _bf16(s65, "qlora", lora={"r": 64, "target_modules": ALL}), adapter_bytes=2, **kw)
    assert 38 < q65.total / 1e9 < 48
    f65 = estimate(s65, _bf16(s65, "full"), mixed_precision=True, **kw)
    assert f65.total / 1e9 > 780


def test_monotone_in_batch_rank_and_checkpointing() -> None:
    s = SHAPES["llama-1b"]
    a = estimate_method(s, "lora", batch=2, seq=256).total
    assert estimate_method(s, "lora", batch=4, seq=256).total > a
    assert estimate_method(s, "lora", batch=2, seq=256, lora={"r": 64}).total > a
    ckpt = {"gradient_checkpointing": True}
    assert estimate_method(s, "lora", batch=2, seq=256, options=ckpt).total < a
    qlora = estimate_method(s, "qlora", batch=2, seq=256).weights
    assert qlora < estimate_method(s, "lora", batch=2, seq=256).weights / 4
    assert estimate_method(s, "full", batch=2, seq=256, objective="dpo").reference == s.num_params() * 4
    with pytest.raises(RegistryError, match="unknown post-training method 'adalora'"):
        estimate_method(s, "adalora", batch=1, seq=8)
    bits8 = estimate_method(s, "qlora", batch=1, seq=8, options={"bits": 8}).weights
    assert bits8 > estimate_method(s, "qlora", batch=1, seq=8).weights
    assert GIB == 2**30


def test_ia3_footprint_follows_its_options() -> None:
    s = SHAPES["smollm2-135m"]
    default = _trainable(s, "ia3")
    assert default == 30 * (192 + 192 + 1536)  # k and v outputs (kv width 192), down_proj's input
    assert _trainable(s, "ia3", options={"target_modules": ["k_proj"], "feedforward_modules": []}) == 30 * 192
    with pytest.raises(ValueError, match="unknown target modules"):
        method_footprint(s, "lora", lora={"target_modules": ["c_attn"]})


def test_estimator_imports_nothing_beyond_the_standard_library() -> None:
    """The estimator is arithmetic over a shape and a footprint: it knows no method and needs no torch."""
    import ast
    from pathlib import Path

    import silotune.memory_estimate as m

    tree = ast.parse(Path(m.__file__).read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert mods <= {"__future__", "collections.abc", "dataclasses", "typing"}
