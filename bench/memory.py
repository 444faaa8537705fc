"""Estimated vs measured peak memory of a training step on the real model, on CPU.

One fresh subprocess per method (so nothing one method allocated survives into
the next). In each: the model is built with silotune's method registry, every
weight is copied out of the safetensors memory map (so RSS counts it once, as
anonymous memory, whether a step touched it or not), the process's peak-RSS
counter (VmHWM) is reset through ``/proc/self/clear_refs`` so the model's load
transient does not count, two training steps run at a
fixed batch × sequence, and the peak is read back. The measured training
footprint is that peak minus the RSS of the process right after its imports
(the Python/torch runtime, which the estimator does not model). RSS does not
depend on CPU contention, so this can run on a busy machine.

    python bench/memory.py                         # lora, qlora, full on SmolLM2-135M, batch 4 × 128
    python bench/memory.py --methods lora --batch 2 --seq 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(method: str, model: str, batch: int, seq: int, steps: int, threads: int) -> dict[str, object]:
    import ctypes
    import gc

    # Everything building the model will import, so the baseline holds the whole runtime.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    from silotune.adapters import AdapterModel
    from silotune.config import LoraSpec, MethodSpec, ModelSpec
    from silotune.training import train_step

    torch.set_num_threads(threads)
    rss_imports = _status_kib("VmRSS") * 1024
    file_imports = _status_kib("RssFile") * 1024
    t0 = time.perf_counter()
    adapter = AdapterModel.create(
        ModelSpec(name_or_path=model, max_seq_len=seq), LoraSpec(), seed=0, method=MethodSpec(name=method)
    )
    load_s = time.perf_counter() - t0
    # transformers maps fp32 safetensors into memory and uses the file pages as weights: RSS would
    # count them only once touched, and pages read while quantising would linger. Copying every
    # tensor to anonymous memory and dropping the mapping makes RSS count each weight once.
    with torch.no_grad():
        for module in adapter.model.modules():
            for p in module.parameters(recurse=False):
                p.data = p.data.clone()
            for name, b in list(module.named_buffers(recurse=False)):
                if b is not None:
                    module._buffers[name] = b.clone()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_loaded = _status_kib("VmRSS") * 1024
    file_loaded = _status_kib("RssFile") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the load transient is not training memory
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (batch, seq), generator=gen)
    batch_t = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model = adapter.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    step_s = []
    for _ in range(steps):
        t = time.perf_counter()
        train_step(model, batch_t, opt, params, 1.0)
        step_s.append(time.perf_counter() - t)
    peak = _status_kib("VmHWM") * 1024
    return {
        "method": method,
        "rss_imports": rss_imports,
        "rss_loaded": rss_loaded,
        "file_pages_added_by_load": file_loaded - file_imports,
        "peak": peak,
        "load_s": load_s,
        "step_s": step_s,
        "trainable": sum(p.numel() for p in params),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,qlora,full")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        out = _child(args.child, args.model, args.batch, args.seq, args.steps, args.threads)
        print("RESULT " + json.dumps(out))
        return 0

    sys.path.insert(0, str(ROOT))
    from silotune.memory_estimate import MIB, ModelShape
    from silotune.modeling import resolve_model_path
    from silotune.silo_memory import estimate_method

    path = resolve_model_path(args.model)
    shape = ModelShape.from_hf_config(json.loads((path / "config.json").read_text()), name=args.model)
    rows = []
    for method in args.methods.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--model",
            args.model,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{method}: the measuring subprocess failed (rc {proc.returncode})")
        m = json.loads(line.removeprefix("RESULT "))
        # The method's default options and LoRA shape: fp32 weights and compute on CPU.
        est = estimate_method(shape, method, batch=args.batch, seq=args.seq)
        measured = m["peak"] - m["rss_imports"]
        rows.append(
            {
                **m,
                "estimate": est.as_dict(),
                "measured": measured,
                "ratio": est.total / measured,
                "weights_measured": m["rss_loaded"] - m["rss_imports"],
                "weights_estimate": est.weights + est.quant_constants,
            }
        )
    print(
        f"\nPeak training memory, {args.model}, batch {args.batch} × seq {args.seq}, "
        f"{args.steps} AdamW steps, CPU fp32"
    )
    print(
        f"{'method':<8} {'trainable':>11} {'est. total':>11} {'measured':>10} {'est/meas':>9} "
        f"{'est. weights':>13} {'loaded':>8} {'step s':>7}"
    )
    for r in rows:
        print(
            f"{r['method']:<8} {r['trainable']:>11,} {r['estimate']['total'] / MIB:>8.0f} MiB "
            f"{r['measured'] / MIB:>6.0f} MiB {r['ratio']:>9.2f} {r['weights_estimate'] / MIB:>9.0f} MiB "
            f"{r['weights_measured'] / MIB:>4.0f} MiB {sum(r['step_s']) / len(r['step_s']):>7.1f}"
        )
    print(
        "measured = peak RSS during the steps (VmHWM, reset after loading) − RSS after imports;\n"
        "loaded = RSS after building the model − RSS after imports"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
