"""Local-training throughput: silotune's silo step (``train_local``) vs a bare peft+torch loop.

Run: ``.venv/bin/python bench/train_throughput.py [--model smollm2-135m-instruct|tiny-llama] [--steps 4]
[--batch-size 4] [--seq-len 128] [--repeats 3] [--json out.json]``

Both sides train the same LoRA config on the same base weights, from the same initial adapter, on the
same batches, with the same torch thread count:

- **silotune**: one ``train_local`` call per repeat, timed from call to return, so it includes what a
  silo really pays: ``load_state`` of the global adapter, optimizer creation, batch sampling and
  collation, per-sequence loss, gradient clipping (the ``TrainSpec`` default), and the delta, its
  norm and byte count at the end.
- **bare**: a minimal hand-written loop on a separately loaded copy of the base model wrapped with
  ``peft.get_peft_model``: AdamW, ``model(input_ids, attention_mask, labels)`` with transformers'
  built-in causal-LM loss, backward, step, over batches collated before the clock starts.

Data: the demo "lab" silo (``make_demo_silos``). By default each example is a multi-turn chat of
consecutive lab records, truncated to ``--seq-len`` tokens, so a batch is exactly
``batch × seq-len`` tokens (the loss still falls only on assistant turns); ``--no-pack`` uses the
single-turn records instead (about 85 tokens each, right-padded to the longest in the batch).
Throughput counts non-pad tokens (the attention mask). Each side gets one untimed warm-up step;
the two measurements are interleaved (A B A B ...) ``--repeats`` times so machine noise hits both,
and the median tokens/s of each side is reported with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from silotune.adapters import AdapterModel, TensorDict
from silotune.config import LoraSpec, ModelSpec, TrainSpec
from silotune.data import Example, batches, collate, encode_chat, encode_dataset, read_records
from silotune.demo import make_demo_silos
from silotune.training import train_local

TARGET = 0.95


@dataclass
class Side:
    name: str
    tokens_per_s: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time (all threads)
    first_loss: float = float("nan")

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)

    def add(self, wall: float, cpu: float, tokens: int, first_loss: float) -> None:
        self.seconds.append(wall)
        self.cpu_seconds.append(cpu)
        self.tokens_per_s.append(tokens / wall)
        self.first_loss = first_loss

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_s": self.tokens_per_s,
            "median_tokens_per_s": self.median,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "first_loss": self.first_loss,
        }


def lab_examples(tokenizer: Any, seq_len: int, *, pack: bool) -> list[Example]:
    """The demo lab silo's training set, encoded and truncated to ``seq_len`` tokens."""
    with tempfile.TemporaryDirectory(prefix="silotune-bench-") as tmp:
        chats = read_records(make_demo_silos(tmp, seed=0)["lab"]["train"])
    if pack:
        # Chat i = records i, i+1, ... as turns, until it reaches seq_len tokens (then truncated).
        packed = []
        for i in range(len(chats)):
            chat, j = list(chats[i]), i + 1
            while (e := encode_chat(chat, tokenizer, 10**9)) is not None and len(e.input_ids) < seq_len:
                chat += chats[j % len(chats)]
                j += 1
            packed.append(chat)
        chats = packed
    return encode_dataset(chats, tokenizer, seq_len)


def load_bare_model(model_path: Path, lora: LoraSpec, init: TensorDict, seed: int) -> Any:
    """A second, independent copy: plain transformers + peft, same base weights and initial adapter."""
    from peft import LoraConfig, TaskType, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base.config.use_cache = False
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    set_peft_model_state_dict(model, dict(init))
    return model


def check_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        raise SystemExit("the two models do not have the same parameters")
    for k, v in sa.items():
        if not torch.equal(v, sb[k]):
            raise SystemExit(f"weights differ between the two models at {k}")


class Clock:
    """Wall and process-CPU seconds between ``start()`` and ``stop()``."""

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self._wall, time.process_time() - self._cpu


def run_bare(
    model: Any, init: TensorDict, batches_: Sequence[dict[str, torch.Tensor]], spec: TrainSpec
) -> tuple[float, float, list[float]]:
    """The baseline loop; returns (wall s, CPU s, losses). Resetting the adapter is not timed."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, dict(init))
    model.train()
    losses = []
    clock = Clock()
    clock.start()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    for b in batches_:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach())
    wall, cpu = clock.stop()
    model.eval()
    return wall, cpu, [float(x) for x in losses]


def run_silotune(
    adapter: AdapterModel, init: TensorDict, examples: Sequence[Example], spec: TrainSpec, seed: int
) -> tuple[float, float, int, float]:
    """One silo's local training exactly as a silo runs it; returns (wall s, CPU s, tokens, first loss)."""
    clock = Clock()
    clock.start()
    _, result = train_local(adapter, init, examples, spec, seed=seed, progress=False)
    wall, cpu = clock.stop()
    return wall, cpu, result.tokens, result.first_loss


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local folder")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per repeat and side")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    ap.add_argument("--no-pack", dest="pack", action="store_false", help="single-turn examples, padded")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    lora = LoraSpec()
    adapter = AdapterModel.create(ModelSpec(name_or_path=args.model), lora, seed=args.seed)
    init = adapter.state()
    bare = load_bare_model(adapter.model_path, lora, init, args.seed)
    check_same_weights(adapter.model, bare)
    pad_id = adapter.tokenizer.pad_token_id
    examples = lab_examples(adapter.tokenizer, args.seq_len, pack=args.pack)
    # torch_threads=None: train_local leaves the thread count alone, so both sides run on `threads`.
    spec = TrainSpec(local_steps=args.steps, batch_size=args.batch_size, torch_threads=None)
    warm_spec = spec.model_copy(update={"local_steps": 1})
    # The very batches train_local draws (same generator seed), collated before the bare clock starts.
    gen = torch.Generator().manual_seed(args.seed)
    bare_batches = [
        collate(b, pad_id) for b in batches(examples, spec.batch_size, steps=spec.local_steps, generator=gen)
    ]
    tokens = sum(int(b["attention_mask"].sum()) for b in bare_batches)
    shape = tuple(bare_batches[0]["input_ids"].shape)
    setup_s = time.perf_counter() - t0

    # Warm-up: one step each, not timed.
    run_silotune(adapter, init, examples, warm_spec, args.seed)
    run_bare(bare, init, bare_batches[:1], spec)

    load_before = os.getloadavg()[0]
    a, b = Side("silotune train_local"), Side("bare peft+torch")
    for r in range(args.repeats):
        wall, cpu, tok, loss = run_silotune(adapter, init, examples, spec, args.seed)
        if tok != tokens:
            raise SystemExit(f"silotune trained on {tok} tokens, the baseline on {tokens}: batches differ")
        a.add(wall, cpu, tokens, loss)
        wall, cpu, losses = run_bare(bare, init, bare_batches, spec)
        b.add(wall, cpu, tokens, losses[0])
        print(
            f"  repeat {r + 1}/{args.repeats}: silotune {a.tokens_per_s[-1]:8.1f} tok/s   "
            f"bare {b.tokens_per_s[-1]:8.1f} tok/s   (ratio {a.tokens_per_s[-1] / b.tokens_per_s[-1]:.3f})",
            file=sys.stderr,
            flush=True,
        )
    load_after = os.getloadavg()[0]
    if torch.get_num_threads() != threads:
        raise SystemExit("the torch thread count changed during the run")

    ratio = a.median / b.median
    paired = statistics.median(x / y for x, y in zip(a.tokens_per_s, b.tokens_per_s, strict=True))
    cpu_ratio = statistics.median(b.cpu_seconds) / statistics.median(a.cpu_seconds)
    print()
    print(
        f"model {args.model}  batch {shape[0]}x{shape[1]}  {args.steps} steps x {args.repeats} repeats  "
        f"{tokens} non-pad tokens/repeat  threads {threads}  setup {setup_s:.1f}s  "
        f"load avg {load_before:.2f} -> {load_after:.2f}"
    )
    print(
        f"{'side':<22}{'median tok/s':>14}{'min':>10}{'max':>10}{'median s':>10}{'CPU s':>10}{'1st loss':>10}"
    )
    for side in (a, b):
        print(
            f"{side.name:<22}{side.median:>14.1f}{min(side.tokens_per_s):>10.1f}"
            f"{max(side.tokens_per_s):>10.1f}{statistics.median(side.seconds):>10.3f}"
            f"{statistics.median(side.cpu_seconds):>10.3f}{side.first_loss:>10.4f}"
        )
    print(
        f"median of paired (adjacent) ratios = {paired:.3f}; CPU-time ratio bare/silotune = {cpu_ratio:.3f}"
    )
    if load_before > threads + 0.5 or load_after > threads + 0.5:
        print(f"warning: load average above {threads} threads; other processes shared the CPUs")
    print(f"ratio silotune/bare = {ratio:.2f} (target >= {TARGET})")

    if args.json:
        report = {
            "model": args.model,
            "batch_size": shape[0],
            "seq_len": shape[1],
            "packed": args.pack,
            "steps": args.steps,
            "repeats": args.repeats,
            "tokens_per_repeat": tokens,
            "threads": threads,
            "load_avg": [load_before, load_after],
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "silotune": a.as_dict(),
            "bare": b.as_dict(),
            "ratio": ratio,
            "paired_ratio": paired,
            "cpu_time_ratio": cpu_ratio,
            "target": TARGET,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
