"""QLoRA peak GPU memory: measured (torch.cuda.max_memory_allocated) vs silotune's estimator.

For a bare GPU machine without internet: needs torch (CUDA), transformers, peft,
bitsandbytes and pydantic (``pip install --no-deps .gpu_wheels/*.whl``: bitsandbytes,
pydantic, pydantic-core, annotated-types, typing-inspection where missing), and
imports only ``silotune.memory_estimate`` and ``silotune.methods`` of this
repository (the estimator and QLoRA's own footprint; no config, store or Prefect).

For each model shape (SmolLM2-135M, a ~1.1B Llama, Llama-2-7B) a randomly
initialised Llama is built directly on the GPU in bf16, its decoder linear
layers are quantised to 4-bit NF4 with double quantisation (bitsandbytes'
``Params4bit``, as ``from_pretrained(quantization_config=...)`` does; embeddings,
norms and the LM head stay bf16), LoRA is attached with PEFT, the peak-memory
counter is reset, and two AdamW steps run at a fixed batch × sequence. Two
recipes per shape: silotune's default (r=8 on q,v) and the QLoRA paper's
(r=64 on every linear layer, gradient checkpointing).

    python bench/gpu_qlora_memory.py            # writes $OUT/gpu_memory.json (or ./gpu_memory.json)
    python bench/gpu_qlora_memory.py --shapes smollm2-135m --batch 2 --seq 256
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPES = {
    "r8-qv": {"r": 8, "targets": ["q_proj", "v_proj"], "checkpointing": False},
    "r64-all+ckpt": {"r": 64, "targets": ALL_LINEAR, "checkpointing": True},
}


def qlora_estimate(shape, recipe: str, batch: int, seq: int):  # type: ignore[no-untyped-def]
    """silotune's estimate of this bench's recipe: QLoRA's declared footprint, everything but LoRA in bf16."""
    import dataclasses

    from silotune.memory_estimate import estimate
    from silotune.methods import get_method
    from silotune.methods.peft_methods import QLoRAOptions

    r = RECIPES[recipe]
    # The LoRA shape as a config's `lora` section gives it (LoraSpec lives with the config).
    lora = SimpleNamespace(r=r["r"], target_modules=r["targets"])
    options = QLoRAOptions(bits=4, double_quant=True, compute_dtype="bfloat16")
    footprint = get_method("qlora").footprint(shape, options, lora)
    # Built directly in bf16 (not prepare_model_for_kbit_training): norms and the LM head stay bf16.
    footprint = dataclasses.replace(footprint, other_bytes=2)
    return estimate(
        shape, footprint, batch=batch, seq=seq, adapter_bytes=4, gradient_checkpointing=r["checkpointing"]
    )


def _quantise_linears(model, torch, bnb, device: str) -> None:  # type: ignore[no-untyped-def]
    """Replace every decoder-layer nn.Linear by a 4-bit NF4 bnb Linear4bit holding the same weights."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                ).to(device)  # quantises on the move to the device
                setattr(parent, name, q)
                del child
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_one(shape, recipe: str, batch: int, seq: int, steps: int, device: str = "cuda") -> dict:  # type: ignore[no-untyped-def]
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    r = RECIPES[recipe]
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape.hf_config(), max_position_embeddings=max(2048, seq), use_cache=False)
    cfg._attn_implementation = "sdpa"
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    # Built directly in bf16 on the device: a 7B model never exists in fp32 (27 GB) anywhere.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    _quantise_linears(model, torch, bnb, device)
    for p in model.parameters():
        p.requires_grad_(False)
    if r["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(
        model, LoraConfig(r=r["r"], lora_alpha=2 * r["r"], target_modules=r["targets"], task_type="CAUSAL_LM")
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(5, min(cfg.vocab_size, 30000), (batch, seq), device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    weights_measured = torch.cuda.memory_allocated() if cuda else 0
    step_s, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        # silotune's loss: fp32 cross-entropy over the logits (labels shifted, not the logits).
        labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated() if cuda else 1
    est = qlora_estimate(shape, recipe, batch, seq)
    del model, opt, out, loss, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "shape": shape.name,
        "params_b": shape.num_params() / 1e9,
        "recipe": recipe,
        "batch": batch,
        "seq": seq,
        "trainable": est.trainable_params,
        "weights_measured": weights_measured,
        "weights_estimate": est.weights + est.quant_constants,
        "peak_measured": peak,
        "peak_estimate": est.total,
        "ratio": est.total / peak,
        "estimate": est.as_dict(),
        "step_s": step_s,
        "losses": losses,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2-135m,llama-1b,llama-2-7b")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument(
        "--cpu-dry-run", action="store_true", help="check the mechanics on CPU (no memory numbers)"
    )
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_memory.json")
    args = ap.parse_args()

    import torch

    dev = "cpu" if args.cpu_dry_run else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    from silotune.memory_estimate import SHAPES

    device = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (dry run)"
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    rows = []
    for shape_name in args.shapes.split(","):
        for recipe in args.recipes.split(","):
            shape = SHAPES[shape_name]
            try:
                row = run_one(shape, recipe, args.batch, args.seq, args.steps, dev)
            except Exception as exc:  # one failing shape must not lose the others' numbers
                row = {"shape": shape_name, "recipe": recipe, "error": f"{type(exc).__name__}: {exc}"}
                gc.collect()
                if dev == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "estimate"}), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2)
            )
    gib = 1024**3
    print(
        "\nQLoRA (NF4 + double quant, bf16 compute, fp32 LoRA, AdamW), "
        f"batch {args.batch} × seq {args.seq}, {device}"
    )
    print(
        f"{'shape':<14} {'recipe':<13} {'weights est/meas GiB':>21} {'peak est GiB':>13} "
        f"{'peak meas GiB':>14} {'est/meas':>9} {'step s':>7}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<14} {r['recipe']:<13} ERROR {r['error']}")
            continue
        print(
            f"{r['shape']:<14} {r['recipe']:<13} {r['weights_estimate'] / gib:>9.2f} / "
            f"{r['weights_measured'] / gib:<9.2f} {r['peak_estimate'] / gib:>13.2f} "
            f"{r['peak_measured'] / gib:>14.2f} {r['ratio']:>9.2f} {r['step_s'][-1]:>7.2f}"
        )
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
