"""Holdout evaluation: the LM head on the answer positions only vs on every position.

Run: ``.venv/bin/python bench/eval_throughput.py [--model smollm2-135m-instruct|tiny-llama]
[--batch-size 20] [--repeats 3] [--threads 2]``

``silotune.evaluation.evaluate`` runs the decoder, keeps the hidden states at the positions that carry
an answer label, and applies the LM head to those rows only; the baseline is the full-logits path it
takes for any other model (``model(...)`` then ``per_sequence_loss`` over [B, T, vocab]). Both score
the demo's union holdout (``make_demo_silos`` at the demo's scale, the same records the demo and the
privacy-utility report score) with the same adapter (a LoRA with non-zero B, so the adapter is in the
path), in the same process, interleaved A B, B A, ... ``--repeats`` times.

Printed: each side's median seconds, the ratio (full / answer-only: > 1 means the answer-only path is
faster), and that both give the same exact match and the same loss to 1e-4.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import silotune.evaluation as ev
from silotune.adapters import AdapterModel
from silotune.config import LoraSpec, ModelSpec
from silotune.data import encode_dataset, read_records
from silotune.demo import REALISTIC_SCALE, make_demo_silos

TARGET = 1.10  # the answer-only head must save at least 10 % of an evaluation on the CPU


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=20)  # the demo's evaluation.batch_size
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    adapter = AdapterModel.create(ModelSpec(name_or_path=args.model, max_seq_len=160), LoraSpec(r=8), seed=0)
    state = adapter.initial_state(0)
    gen = torch.Generator().manual_seed(1)
    state = {
        k: v + 0.01 * torch.randn(v.shape, generator=gen) if "lora_B" in k else v for k, v in state.items()
    }
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        make_demo_silos(tmp, seed=0, scale=REALISTIC_SCALE)
        examples = encode_dataset(read_records(Path(tmp) / "union_eval.jsonl"), adapter.tokenizer, 160)
    answer_tokens = sum(sum(1 for x in e.labels if x != -100) for e in examples)
    all_tokens = sum(len(e.input_ids) for e in examples)
    print(
        f"{args.model}: {len(examples)} holdout records, {all_tokens} tokens of which {answer_tokens} "
        f"({100 * answer_tokens / all_tokens:.0f} %) are answer tokens; batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    real_head = ev.response_head

    def run(answer_only: bool) -> tuple[float, ev.EvalResult]:
        ev.response_head = real_head if answer_only else (lambda model: None)
        try:
            t0 = time.perf_counter()
            res = ev.evaluate(adapter, examples, batch_size=args.batch_size, state=state)
            return time.perf_counter() - t0, res
        finally:
            ev.response_head = real_head

    if real_head(adapter.model) is None:
        print(f"{args.model}: not a plain-head model (evaluate() takes the full-logits path)")
        return 1
    run(True)  # warm-up (allocator, kernels)
    fast_s, full_s = [], []
    fast = full = None
    for i in range(args.repeats):
        order = (True, False) if i % 2 == 0 else (False, True)
        for answer_only in order:
            s, res = run(answer_only)
            (fast_s if answer_only else full_s).append(s)
            if answer_only:
                fast = res
            else:
                full = res
            side = "answer-only" if answer_only else "full logits"
            print(f"  repeat {i + 1}: {side} {s:.2f} s", flush=True)
    assert fast is not None and full is not None
    same = fast.exact_match == full.exact_match and abs(fast.loss - full.loss) < 1e-4
    a, b = statistics.median(fast_s), statistics.median(full_s)
    print(f"answer-only head: {a:.2f} s   full logits: {b:.2f} s   (medians of {args.repeats})")
    print(
        f"same scores: {same} (exact match {fast.exact_match:.4f} vs {full.exact_match:.4f}, "
        f"loss {fast.loss:.6f} vs {full.loss:.6f})"
    )
    ratio = b / a
    print(f"ratio full / answer-only: {ratio:.2f}x (target >= {TARGET:.2f}x)")
    return 0 if same and ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
