"""What privacy and protection cost, each against its baseline in the same run.

Run: ``.venv/bin/python bench/privacy_costs.py [--model smollm2-135m-instruct|tiny-llama] [--steps 3]
[--repeats 3] [--silos 4]``

1. DP-SGD step vs the non-private step: silotune's ``train_local`` on the demo "lab" silo, LoRA r=8 on
   q,v, batch 4 (DP: Poisson sampling with expected batch 4), with Opacus per-example gradients in
   ``hooks`` and ``ew`` modes. Runs are interleaved (plain, hooks, ew, plain, ...) so machine noise
   hits all three; reported as training tokens per second (DP batches vary in size) and the ratio
   plain / DP, i.e. how many times slower a DP step is per token.
2. Encryption and masking bytes and seconds per update: TenSEAL's default CKKS parameters vs
   silotune's packed CKKS preset vs secure-aggregation masking, on a 460,800-value delta (SmolLM2
   LoRA r=8 on q,v), from ``bench/crypto_bytes.py``; bytes as a ratio of fp32, encryption speed as
   a ratio of the TenSEAL default.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from silotune.adapters import AdapterModel
from silotune.config import LoraSpec, ModelSpec, TrainSpec
from silotune.data import encode_dataset, read_records
from silotune.demo import make_demo_silos
from silotune.training import DPSGD, train_local


def dp_step_costs(model: str, steps: int, repeats: int) -> list[tuple[str, float]]:
    adapter = AdapterModel.create(ModelSpec(name_or_path=model, max_seq_len=128), LoraSpec(r=8), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_demo_silos(Path(tmp), seed=0)
        examples = encode_dataset(read_records(paths["lab"]["train"]), adapter.tokenizer, 128)
    spec = TrainSpec(local_steps=steps, batch_size=4, learning_rate=2e-3)
    g = adapter.state()
    q = 4 / len(examples)
    modes = {
        "non-private": None,
        "DP-SGD (opacus hooks)": DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=q, noise_seed=1),
        "DP-SGD (opacus ew)": DPSGD(
            noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=q, noise_seed=1, grad_sample_mode="ew"
        ),
    }
    for dp in modes.values():  # warm-up: first-call costs out of the timings
        train_local(
            adapter, g, examples, TrainSpec(local_steps=1, batch_size=4), seed=0, progress=False, dp=dp
        )
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for rep in range(repeats):
        for name, dp in modes.items():
            _, res = train_local(adapter, g, examples, spec, seed=rep, progress=False, dp=dp)
            rates[name].append(res.tokens_per_second)
            print(f"  repeat {rep + 1}: {name:<24} {res.tokens_per_second:8.1f} tok/s", flush=True)
    return [(name, statistics.median(v)) for name, v in rates.items()]


def _crypto_module():
    path = Path(__file__).with_name("crypto_bytes.py")
    spec = importlib.util.spec_from_file_location("crypto_bytes", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["crypto_bytes"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--silos", type=int, default=4)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, model {args.model}")

    print("\n1. DP-SGD vs non-private local training (tokens/s, median of repeats)")
    rates = dp_step_costs(args.model, args.steps, args.repeats)
    base = rates[0][1]
    for name, r in rates:
        print(f"  {name:<24} {r:8.1f} tok/s   cost ratio vs non-private: {base / r:5.2f}x")

    print("\n2. Encryption / masking per update (460,800 fp32 values)")
    cb = _crypto_module()
    g = torch.Generator().manual_seed(0)
    deltas = [
        {
            "v.lora_B": torch.randn(cb.NUMEL // 2, generator=g) * cb.SCALE,
            "q.lora_A": torch.randn(cb.NUMEL // 2, generator=g) * cb.SCALE,
        }
        for _ in range(args.silos)
    ]
    weights = [1.0 / args.silos] * args.silos
    ref = {k: sum(w * d[k].double() for d, w in zip(deltas, weights, strict=True)) for k in deltas[0]}
    fp32 = cb.NUMEL * 4
    default = cb.bench_ckks("TenSEAL default CKKS", "tenseal-default", deltas, weights, ref, args.repeats)
    packed = cb.bench_ckks(
        "silotune CKKS packed-n4096", cb.ckks.DEFAULT_PRESET, deltas, weights, ref, args.repeats
    )
    masked = cb.bench_secagg(deltas, weights, ref, args.repeats)
    print(
        f"  {'scheme':<34} {'bytes':>11} {'x fp32':>7} {'enc s':>7} {'speed vs default':>17} {'max err':>9}"
    )
    for row in (default, packed, masked):
        print(
            f"  {row.name:<34} {row.bytes_per_update:>11,} {row.bytes_per_update / fp32:>7.2f} "
            f"{row.encrypt_s:>7.3f} {default.encrypt_s / row.encrypt_s:>16.1f}x {row.max_abs_err:>9.1e}"
        )
    print(
        f"\nsummary: DP-SGD costs {base / rates[1][1]:.2f}x (hooks) / {base / rates[2][1]:.2f}x (ew) a "
        f"non-private step per token; packed CKKS is {packed.bytes_per_update / fp32:.2f}x fp32 bytes "
        f"(default {default.bytes_per_update / fp32:.2f}x) and encrypts "
        f"{default.encrypt_s / packed.encrypt_s:.1f}x faster than the default; "
        f"masking is {masked.bytes_per_update / fp32:.3f}x fp32 bytes"
    )


if __name__ == "__main__":
    main()
