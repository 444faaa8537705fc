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
then (silotune, bare) pairs of runs are interleaved ``--repeats`` times so machine noise hits both
(``--order abba``, the default, alternates who goes first: A B, B A, A B, ...; ``--order abab`` is
A B, A B, ...). Reported: the median tokens/s of each side and their ratio (the last line), plus the
median of the per-pair ratios and the ratio of process CPU seconds, as cross-checks.

On a small shared machine another process using the cores can slow a step tenfold (OpenMP threads
spin while a sibling is descheduled), so from ``/proc/stat`` the script also measures how many cores
other processes used during each run; a pair where that reaches ``--noisy-cores`` (0.1) is shown
but not counted, and rerun, up to ``--max-extra`` (3) extra pairs. If no pair was quiet, all are
counted and a warning says the numbers are not trustworthy.
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
    """One side's timed runs (one per repeat, in order)."""

    name: str
    tokens_per_s: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time (all threads)
    others: list[float] = field(default_factory=list)  # cores used by other processes meanwhile
    first_loss: float = float("nan")

    def add(self, wall: float, cpu: float, others: float, tokens: int, first_loss: float) -> None:
        self.seconds.append(wall)
        self.cpu_seconds.append(cpu)
        self.others.append(others)
        self.tokens_per_s.append(tokens / wall)
        self.first_loss = first_loss

    def median(self, keep: Sequence[int]) -> float:
        return statistics.median(self.tokens_per_s[i] for i in keep)

    def as_dict(self, keep: Sequence[int]) -> dict[str, Any]:
        return {
            "tokens_per_s": self.tokens_per_s,
            "median_tokens_per_s": self.median(keep),
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "other_processes_cores": self.others,
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


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy (or stolen by a hypervisor) since boot; nan off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Clock:
    """Wall seconds, this process's CPU seconds, and the cores other processes used in between."""

    def start(self) -> None:
        self._wall, self._cpu, self._busy = time.perf_counter(), time.process_time(), _busy_cpu_seconds()

    def stop(self) -> tuple[float, float, float]:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        others = max(0.0, _busy_cpu_seconds() - self._busy - cpu) / wall
        return wall, cpu, others


def run_bare(
    model: Any, init: TensorDict, batches_: Sequence[dict[str, torch.Tensor]], spec: TrainSpec
) -> tuple[float, float, float, list[float]]:
    """The baseline loop; returns (wall s, CPU s, other processes' cores, losses). The reset is not timed."""
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
    wall, cpu, others = clock.stop()
    model.eval()
    return wall, cpu, others, [float(x) for x in losses]


def run_silotune(
    adapter: AdapterModel, init: TensorDict, examples: Sequence[Example], spec: TrainSpec, seed: int
) -> tuple[float, float, float, int, float]:
    """``train_local`` as a silo runs it; returns (wall s, CPU s, others' cores, tokens, first loss)."""
    clock = Clock()
    clock.start()
    _, result = train_local(adapter, init, examples, spec, seed=seed, progress=False)
    wall, cpu, others = clock.stop()
    return wall, cpu, others, result.tokens, result.first_loss


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local folder")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per repeat and side")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved (silotune, bare) pairs to count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    ap.add_argument(
        "--order",
        choices=("abba", "abab"),
        default="abba",
        help="interleaving: abba alternates who goes first (A B, B A, ...); abab always runs silotune first",
    )
    ap.add_argument(
        "--noisy-cores",
        type=float,
        default=0.1,
        help="a pair during which other processes used this many cores or more is rerun, not counted",
    )
    ap.add_argument("--max-extra", type=int, default=3, help="at most this many pairs rerun for noise")
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

    a, b = Side("silotune train_local"), Side("bare peft+torch")

    def measure_silotune() -> None:
        wall, cpu, others, tok, loss = run_silotune(adapter, init, examples, spec, args.seed)
        if tok != tokens:
            raise SystemExit(f"silotune trained on {tok} tokens, the baseline on {tokens}: batches differ")
        a.add(wall, cpu, others, tokens, loss)

    def measure_bare() -> None:
        wall, cpu, others, losses = run_bare(bare, init, bare_batches, spec)
        b.add(wall, cpu, others, tokens, losses[0])

    # Pairs until `repeats` of them ran on a quiet machine (other processes under --noisy-cores during
    # both halves), at most `repeats + max_extra` pairs.
    clean: list[int] = []
    r = 0
    while len(clean) < args.repeats and r < args.repeats + args.max_extra:
        # abba: A B, B A, A B, ... (a linear drift in machine speed hits both sides alike).
        first_bare = args.order == "abba" and r % 2 == 1
        for measure in (measure_bare, measure_silotune) if first_bare else (measure_silotune, measure_bare):
            measure()
        noisy = a.others[r] >= args.noisy_cores or b.others[r] >= args.noisy_cores  # nan (no /proc): quiet
        if not noisy:
            clean.append(r)
        print(
            f"  pair {r + 1} ({'B A' if first_bare else 'A B'}): silotune {a.tokens_per_s[r]:8.1f} tok/s   "
            f"bare {b.tokens_per_s[r]:8.1f} tok/s   ratio {a.tokens_per_s[r] / b.tokens_per_s[r]:.3f}   "
            f"other processes {a.others[r]:.2f}/{b.others[r]:.2f} cores"
            + ("  (noisy, not counted)" if noisy else ""),
            file=sys.stderr,
            flush=True,
        )
        r += 1
    if torch.get_num_threads() != threads:
        raise SystemExit("the torch thread count changed during the run")
    keep = clean or list(range(r))

    ratio = a.median(keep) / b.median(keep)
    paired = statistics.median(a.tokens_per_s[i] / b.tokens_per_s[i] for i in keep)
    cpu_ratio = statistics.median(b.cpu_seconds[i] for i in keep) / statistics.median(
        a.cpu_seconds[i] for i in keep
    )
    print()
    print(
        f"model {args.model}  batch {shape[0]}x{shape[1]}  {args.steps} steps/run  "
        f"{len(keep)} of {r} pairs counted  {tokens} non-pad tokens/run  threads {threads}  "
        f"setup {setup_s:.1f}s"
    )
    print(
        f"{'side':<22}{'median tok/s':>14}{'min':>10}{'max':>10}{'median s':>10}{'CPU s':>10}{'1st loss':>10}"
    )
    for side in (a, b):
        tps = [side.tokens_per_s[i] for i in keep]
        print(
            f"{side.name:<22}{side.median(keep):>14.1f}{min(tps):>10.1f}{max(tps):>10.1f}"
            f"{statistics.median(side.seconds[i] for i in keep):>10.3f}"
            f"{statistics.median(side.cpu_seconds[i] for i in keep):>10.3f}{side.first_loss:>10.4f}"
        )
    print(f"median of paired ratios = {paired:.3f}; CPU-time ratio bare/silotune = {cpu_ratio:.3f}")
    if not clean:
        print(
            f"warning: other processes used >= {args.noisy_cores} cores during every pair; "
            "these numbers are not trustworthy, rerun on a quiet machine"
        )
    elif len(clean) < args.repeats:
        print(f"warning: only {len(clean)} quiet pairs of the {args.repeats} asked for")
    print(f"ratio silotune/bare = {ratio:.2f} (target >= {TARGET})")

    if args.json:
        report = {
            "model": args.model,
            "batch_size": shape[0],
            "seq_len": shape[1],
            "packed": args.pack,
            "steps": args.steps,
            "repeats": args.repeats,
            "pairs_run": r,
            "pairs_counted": keep,
            "order": args.order,
            "tokens_per_run": tokens,
            "threads": threads,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "silotune": a.as_dict(keep),
            "bare": b.as_dict(keep),
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
