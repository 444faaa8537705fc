"""Every GPU check of silotune's compute placement, in one run on a machine with CUDA.

Run (from the repository root, on the GPU machine, offline):
``bash bench/gpu_checks.sh`` (this script with a time budget per part), or
``python bench/gpu_checks.py [--parts federation,dpsgd,shape1b,ddp,throughput,memory] [--quick]``.

Parts, each writing its own JSON under ``results/gpu-checks-<gpu>/`` (``<gpu>`` from
``torch.cuda.get_device_name``) as soon as it finishes, so a part that runs out of time loses
only itself:

- ``federation``: a 2-round embedded federation on the real SmolLM2-135M in which silo
  ``clinic`` trains QLoRA (NF4, bf16 compute, double quantisation) on ``cuda``, silo ``bank``
  LoRA in fp32 on the ``cpu`` and silo ``lab`` LoRA in bf16 on ``cuda``; the final adapter is
  loaded back with PEFT and the holdout loss must fall.
- ``dpsgd``: a DP-SGD round (Opacus, keyed noise) of LoRA and of QLoRA on the real SmolLM2 on
  ``cuda`` in bf16.
- ``shape1b``: the ``gpu`` tests (a LoRA and a QLoRA round on a random Llama-3.2-1B shape).
- ``ddp``: one silo's round in 2 processes on the GPU(s) (NCCL with 2 GPUs, gloo sharing one),
  compared with the one-process round on the same global batch.
- ``throughput``: ``bench/train_throughput.py --device cuda`` for SmolLM2-135M and a random
  Llama-3.2-1B, bf16 LoRA and 4-bit QLoRA, each plain and with the levers.
- ``memory``: the estimator against the measured peak of silotune's own ``train_local`` for the
  six shapes and recipes of ``results/gpu-qlora-memory-h200.json`` (target: within ±15 %).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPES = {
    "r8-qv": {"r": 8, "target_modules": ["q_proj", "v_proj"], "gradient_checkpointing": False},
    "r64-all+ckpt": {"r": 64, "target_modules": ALL_LINEAR, "gradient_checkpointing": True},
}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _write(out: Path, name: str, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"== {name}: wrote {out / f'{name}.json'}", flush=True)


def part_federation(out: Path, quick: bool) -> dict[str, Any]:
    """A mixed federation: QLoRA bf16 on CUDA, LoRA fp32 on the CPU, LoRA + DP-SGD on CUDA."""
    from peft import PeftModel

    from flows.federated_training import federated_training
    from silotune.config import parse_config
    from silotune.demo import make_demo_silos
    from silotune.modeling import load_base_model, smollm2_path

    work = Path(tempfile.mkdtemp(prefix="gpu-fed-"))
    data = make_demo_silos(work / "data", seed=0, scale=0.3 if quick else 1.0)
    qlora = {"name": "qlora", "options": {"bits": 4}}  # compute dtype: the silo's precision (bf16)
    cfg = parse_config(
        {
            "federation_id": "gpu-mixed",
            "rounds": 2,
            "seed": 0,
            "model": {"name_or_path": "smollm2-135m-instruct", "max_seq_len": 256},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "train": {"local_steps": 4 if quick else 8, "batch_size": 8, "learning_rate": 2e-3},
            "silos": [
                {
                    "name": "clinic",
                    "device": "cuda",
                    "method": qlora,
                    "train_path": str(data["clinic"]["train"]),
                    "eval_path": str(data["clinic"]["eval"]),
                },
                {
                    "name": "bank",
                    "device": "cpu",
                    "train_path": str(data["bank"]["train"]),
                    "eval_path": str(data["bank"]["eval"]),
                },
                {
                    "name": "lab",
                    "device": "cuda",
                    "train_path": str(data["lab"]["train"]),
                    "eval_path": str(data["lab"]["eval"]),
                },
            ],
            "aggregation": {"name": "fedavg", "min_silos": 2},
            "store": {"kind": "local", "root": str(work / "store")},
            "tracking": {"kind": "none"},
        }
    )
    t = time.perf_counter()
    result = federated_training(cfg)
    seconds = time.perf_counter() - t
    history = [h.model_dump(mode="json") if hasattr(h, "model_dump") else h for h in result["history"]]
    model = PeftModel.from_pretrained(load_base_model(smollm2_path()), result["adapter"])
    losses = [h["global_eval"]["loss"] for h in history if h.get("global_eval")]
    return {
        "seconds": seconds,
        "history": history,
        "global_eval_loss": losses,
        "adapter": str(result["adapter"]),
        "adapter_loads": model is not None,
        "holdout_loss_falls": losses[-1] < losses[0] if len(losses) > 1 else None,
    }


def part_dpsgd(out: Path, quick: bool) -> dict[str, Any]:
    from silotune.adapters import AdapterModel
    from silotune.compute import placement
    from silotune.config import LoraSpec, MethodSpec, ModelSpec, TrainSpec
    from silotune.data import encode_dataset, read_records
    from silotune.demo import make_demo_silos
    from silotune.federation import initial_adapter
    from silotune.training import DPSGD, train_local

    data = make_demo_silos(tempfile.mkdtemp(prefix="gpu-dp-"), seed=0, scale=0.3)
    spec = TrainSpec(local_steps=4, batch_size=8, learning_rate=2e-3, device="cuda")
    rows = {}
    for method, options in (("lora", {"base_dtype": "bfloat16"}), ("qlora", {"bits": 4})):
        adapter = AdapterModel.create(
            ModelSpec(name_or_path="smollm2-135m-instruct"),
            LoraSpec(r=8),
            seed=0,
            method=MethodSpec(name=method, options=options),
            placement=placement(spec),
        )
        ex = encode_dataset(read_records(data["lab"]["train"]), adapter.tokenizer, 128)
        g = initial_adapter(adapter.state(), seed=0)
        dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=8 / len(ex), noise_seed=0)
        t = time.perf_counter()
        d, r = train_local(adapter, g, ex, spec, seed=1, progress=False, dp=dp)
        rows[method] = {
            "seconds": time.perf_counter() - t,
            "precision": adapter.placement.precision,
            "losses": [r.first_loss, r.final_loss],
            "update_norm": r.update_norm,
            "finite": all(bool(torch.isfinite(v).all()) for v in d.values()),
        }
        del adapter
    return rows


def part_shape1b(out: Path, quick: bool) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/unit"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return {"returncode": proc.returncode, "tail": proc.stdout[-4000:] + proc.stderr[-2000:]}


def part_ddp(out: Path, quick: bool) -> dict[str, Any]:
    from silotune.adapters import AdapterModel
    from silotune.compute import placement
    from silotune.config import LoraSpec, ModelSpec, TrainSpec
    from silotune.data import encode_dataset, read_records
    from silotune.demo import make_demo_silos
    from silotune.federation import initial_adapter
    from silotune.training import train_local

    data = make_demo_silos(tempfile.mkdtemp(prefix="gpu-ddp-"), seed=0, scale=0.3)
    spec = TrainSpec(local_steps=3, batch_size=8, learning_rate=2e-3, device="cuda", precision="fp32")
    adapter = AdapterModel.create(
        ModelSpec(name_or_path="smollm2-135m-instruct"), LoraSpec(r=8), seed=0, placement=placement(spec)
    )
    ex = encode_dataset(read_records(data["lab"]["train"]), adapter.tokenizer, 128)
    g = initial_adapter(adapter.state(), seed=0)
    d1, r1 = train_local(adapter, g, ex, spec, seed=1, progress=False)
    t = time.perf_counter()
    d2, r2 = train_local(adapter, g, ex, spec.model_copy(update={"processes": 2}), seed=1, progress=False)
    diff = max(float((d2[k] - d1[k]).abs().max()) for k in d1)
    return {
        "gpus": torch.cuda.device_count(),
        "backend": "nccl" if torch.cuda.device_count() >= 2 else "gloo (2 processes share one GPU)",
        "two_process_seconds": time.perf_counter() - t,
        "max_abs_update_diff": diff,
        "max_abs_update": max(float(d1[k].abs().max()) for k in d1),
        "loss_one": [r1.first_loss, r1.final_loss],
        "loss_two": [r2.first_loss, r2.final_loss],
        "equal_within_1e-4": diff <= 1e-4,
    }


def part_throughput(out: Path, quick: bool) -> dict[str, Any]:
    runs = {}
    models = ["smollm2-135m-instruct"] + ([] if quick else ["random:llama-3.2-1b"])
    for model in models:
        for method in ("lora", "qlora"):
            for levers in ("", "response_only,packing"):
                name = f"{model.replace(':', '-')}-{method}-{'levers' if levers else 'plain'}"
                path = out / f"throughput-{name}.json"
                cmd = [
                    sys.executable,
                    "bench/train_throughput.py",
                    "--device=cuda",
                    f"--model={model}",
                    f"--method={method}",
                    f"--levers={levers}",
                    "--no-pack",
                    "--batch-size=8",
                    "--seq-len=256",
                    "--steps=4",
                    "--repeats=2" if quick else "--repeats=3",
                    "--noisy-cores=100",  # a GPU run: other processes' CPU use does not matter
                    f"--json={path}",
                ]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
                runs[name] = {"returncode": proc.returncode, "summary": proc.stdout[-1500:]}
                if proc.returncode:
                    runs[name]["stderr"] = proc.stderr[-2000:]
                print(proc.stdout[-800:], flush=True)
    return runs


def part_memory(out: Path, quick: bool) -> dict[str, Any]:
    """Estimator vs measured peak of silotune's own loop, for the shapes of the H200 table."""
    from silotune.adapters import AdapterModel
    from silotune.compute import Placement
    from silotune.config import LoraSpec, MethodSpec, ModelSpec, TrainSpec
    from silotune.data import Example
    from silotune.federation import initial_adapter
    from silotune.memory_estimate import SHAPES
    from silotune.modeling import random_model_path
    from silotune.silo_memory import estimate_method
    from silotune.training import train_local

    batch, seq = 4, 512
    rows = []
    shapes = ["smollm2-135m", "llama-1b"] + ([] if quick else ["llama-2-7b"])
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        path = random_model_path(shape.hf_config(), shape_name)
        for recipe, r in RECIPES.items():
            lora = {"r": r["r"], "alpha": 2 * r["r"], "target_modules": r["target_modules"]}
            options = {"bits": 4, "compute_dtype": "bfloat16"}
            ckpt = r["gradient_checkpointing"]
            place = Placement(device="cuda:0", precision="bf16", gradient_checkpointing=ckpt)
            torch.cuda.empty_cache()
            adapter = AdapterModel.create(
                ModelSpec(name_or_path=str(path)),
                LoraSpec(**lora),
                seed=0,
                method=MethodSpec(name="qlora", options=options),
                placement=place,
            )
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 49152, (batch, seq), generator=gen).tolist()
            examples = [Example(x, x) for x in ids]  # batch × seq tokens, every position a label
            g = initial_adapter(adapter.state(), seed=0)
            spec = TrainSpec(
                local_steps=2,
                batch_size=batch,
                learning_rate=1e-4,
                device="cuda",
                precision="bf16",
                gradient_checkpointing=ckpt,
            )
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            _, res = train_local(adapter, g, examples, spec, seed=0, progress=False)
            peak = torch.cuda.max_memory_allocated()
            est = estimate_method(
                shape,
                "qlora",
                batch=batch,
                seq=seq,
                options=options,
                lora=lora,
                gradient_checkpointing=ckpt,
                precision="bf16",
            )
            rows.append(
                {
                    "shape": shape_name,
                    "recipe": recipe,
                    "batch": batch,
                    "seq": seq,
                    "peak_measured": peak,
                    "peak_estimate": est.total,
                    "ratio": peak / est.total,
                    "within_15pct": abs(peak / est.total - 1) <= 0.15,
                    "estimate": est.as_dict(),
                    "losses": [res.first_loss, res.final_loss],
                }
            )
            print(f"  {shape_name} {recipe}: measured/estimate = {peak / est.total:.3f}", flush=True)
            del adapter
    return {"rows": rows}


PARTS = {
    "federation": part_federation,
    "dpsgd": part_dpsgd,
    "shape1b": part_shape1b,
    "ddp": part_ddp,
    "throughput": part_throughput,
    "memory": part_memory,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--quick", action="store_true", help="smaller data and models (a short device budget)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/gpu-checks-<gpu>")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    out = args.out or ROOT / "results" / f"gpu-checks-{_slug(gpu)}"
    meta = {
        "gpu": gpu,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
    }
    failed = []
    for name in args.parts.split(","):
        t = time.perf_counter()
        print(f"== {name} ...", flush=True)
        try:
            data = PARTS[name](out, args.quick)
            ok = True
        except Exception:
            data, ok = {"error": traceback.format_exc()}, False
            failed.append(name)
            print(data["error"], file=sys.stderr, flush=True)
        _write(out, name, {**meta, "part": name, "ok": ok, "seconds": time.perf_counter() - t, **data})
    print(f"GPU checks on {gpu}: {'all parts ran' if not failed else 'failed: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
