"""``plan`` writes each silo's device; the memory estimate follows train.gradient_checkpointing/precision."""

from __future__ import annotations

from pathlib import Path

from silotune.config import parse_config
from silotune.memory_estimate import SHAPES
from silotune.plan import load_answers, make_plan, to_config
from silotune.silo_memory import estimate_method, planned_precision

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plan"


def test_plan_places_gpu_silos_on_cuda_and_cpu_silos_on_the_cpu() -> None:
    a = load_answers(EXAMPLES / "mixed.yaml")
    p = make_plan(a)
    assert not any("still to be wired" in w for w in p.warnings)
    cfg = parse_config(to_config(a, p))
    by = {s.name: s for s in cfg.silos}
    assert by["lab-a100"].device == "cuda" and by["clinic-12g"].device == "cuda"
    assert by["office-cpu"].device == "cpu"
    # The QLoRA silo's compute dtype is bf16 on its GPU, as the estimate assumed.
    assert cfg.method_for("clinic-12g").options["compute_dtype"] == "bfloat16"


def test_estimate_follows_train_checkpointing_and_precision() -> None:
    shape = SHAPES["smollm2-135m"]
    base = estimate_method(shape, "lora", batch=4, seq=512)
    ckpt = estimate_method(shape, "lora", batch=4, seq=512, gradient_checkpointing=True)
    bf16 = estimate_method(shape, "lora", batch=4, seq=512, precision="bf16")
    assert ckpt.activations < base.activations / 3  # one layer's activations instead of 30
    assert bf16.activations < base.activations and bf16.weights == base.weights  # fp32 base, bf16 autocast
    assert planned_precision("auto", "cuda:1") == "bf16" and planned_precision("auto", "cpu") == "fp32"
    assert planned_precision("auto", "auto") == "fp32" and planned_precision("fp16", "cuda") == "fp16"
