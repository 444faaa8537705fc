"""Local-training throughput: silotune's silo step (``train_local``) vs a bare peft+torch loop.

Run: ``.venv/bin/python bench/train_throughput.py [--model smollm2-135m-instruct|tiny-llama|random:PRESET]
[--steps 4] [--batch-size 4] [--seq-len 128] [--repeats 3] [--levers response_only,packing]
[--device cpu|cuda] [--precision auto|fp32|bf16|fp16] [--method lora|qlora] [--json out.json]``

``--levers`` turns on silotune's speed levers on its side (``train.response_logits_only``,
``train.packing``); the bare loop never has them. ``random:PRESET`` is a randomly initialised model
of a ``silotune.memory_estimate.SHAPES`` preset (e.g. ``random:llama-3.2-1b``), for sizes whose
weights are not on the machine. On CUDA both sides load the base onto the GPU at the same dtype
(bf16 base for LoRA with ``--precision`` bf16; NF4 with bf16 compute and double quantisation for
``--method qlora``), run under the same autocast, and the peak GPU memory of each side is reported.

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
from silotune.compute import Placement, autocast, resolve_device, resolve_precision
from silotune.config import LoraSpec, MethodSpec, ModelSpec, TrainSpec
from silotune.data import Example, batches, collate, encode_chat, encode_dataset, read_records
from silotune.demo import make_demo_silos
from silotune.memory_estimate import SHAPES
from silotune.modeling import random_model_path
from silotune.training import train_local

TARGET = 0.95  # without levers: silotune's bookkeeping costs at most 5 %
TARGET_LEVERS_CPU = 1.15  # with the levers on the CPU: skipped work must show
TARGET_GPU = 1.5  # with the levers on a GPU (the target; peak memory <= 0.6x)
LEVERS = {"response_only": "response_logits_only", "packing": "packing"}


@dataclass
class Side:
    """One side's timed runs (one per repeat, in order)."""

    name: str
    tokens_per_s: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time (all threads)
    others: list[float] = field(default_factory=list)  # cores used by other processes meanwhile
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    peak_bytes: list[int] = field(default_factory=list)  # CUDA only: peak allocated during the run

    def add(
        self, wall: float, cpu: float, others: float, tokens: int, first_loss: float, peak: int = 0
    ) -> None:
        self.peak_bytes.append(peak)
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
            "last_loss": self.last_loss,
            "peak_bytes": self.peak_bytes,
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


def load_bare_model(
    model_path: Path,
    lora: LoraSpec,
    init: TensorDict,
    seed: int,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    qlora: bool = False,
) -> Any:
    """A second, independent copy: plain transformers + peft, same base weights and initial adapter."""
    from peft import (
        LoraConfig,
        TaskType,
        get_peft_model,
        prepare_model_for_kbit_training,
        set_peft_model_state_dict,
    )
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if device != "cpu" or qlora:
        kwargs["device_map"] = {"": device}
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, dtype),
        )
    base = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    base.config.use_cache = False
    if qlora:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
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
    sa = {k: v for k, v in sa.items() if v.dtype.is_floating_point}  # 4-bit: compare what is not packed
    sb = {k: v for k, v in sb.items() if v.dtype.is_floating_point}
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


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def run_bare(
    model: Any,
    init: TensorDict,
    batches_: Sequence[dict[str, torch.Tensor]],
    spec: TrainSpec,
    placement: Placement | None = None,
) -> tuple[float, float, float, list[float], int]:
    """The baseline loop: (wall s, CPU s, others' cores, losses, peak bytes); the reset is not timed."""
    from peft import set_peft_model_state_dict

    device = placement.device if placement else "cpu"
    set_peft_model_state_dict(model, dict(init))
    model.train()
    losses = []
    _reset_peak(device)
    clock = Clock()
    clock.start()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    for b in batches_:
        b = {k: v.to(device) for k, v in b.items()}
        with autocast(placement):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach())
    result = [float(x) for x in losses]  # synchronises a GPU before the clock stops
    wall, cpu, others = clock.stop()
    model.eval()
    return wall, cpu, others, result, _peak(device)


def run_silotune(
    adapter: AdapterModel, init: TensorDict, examples: Sequence[Example], spec: TrainSpec, seed: int
) -> tuple[float, float, float, int, float, float, int]:
    """``train_local`` as a silo runs it: (wall s, CPU s, others' cores, tokens, 1st/last loss, peak)."""
    _reset_peak(adapter.placement.device)
    clock = Clock()
    clock.start()
    _, result = train_local(adapter, init, examples, spec, seed=seed, progress=False)
    wall, cpu, others = clock.stop()
    peak = _peak(adapter.placement.device)
    return wall, cpu, others, result.tokens, result.first_loss, result.final_loss, peak


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
    ap.add_argument(
        "--levers", default="", help=f"comma-separated silotune levers: {', '.join(LEVERS)} (default none)"
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    ap.add_argument("--method", default="lora", choices=("lora", "qlora"))
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    levers = [x for x in args.levers.split(",") if x]
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise SystemExit(f"unknown levers {unknown}; known: {', '.join(LEVERS)}")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    place = Placement(device=device, precision=precision, threads=threads)
    model_name = args.model
    if model_name.startswith("random:"):
        preset = model_name.removeprefix("random:")
        if preset not in SHAPES:
            raise SystemExit(f"unknown shape {preset!r}; known: {', '.join(SHAPES)}")
        model_name = str(random_model_path(SHAPES[preset].hf_config(), preset))
    # A 16-bit base on a GPU (what plan writes), fp32 on the CPU; QLoRA computes in the precision.
    dtype = "float32" if precision == "fp32" else {"bf16": "bfloat16", "fp16": "float16"}[precision]
    qlora = args.method == "qlora"
    options: dict[str, Any] = {"compute_dtype": dtype} if qlora else {"base_dtype": dtype}
    lora = LoraSpec()
    adapter = AdapterModel.create(
        ModelSpec(name_or_path=model_name),
        lora,
        seed=args.seed,
        method=MethodSpec(name=args.method, options=options),
        placement=place,
    )
    init = adapter.state()
    bare = load_bare_model(adapter.model_path, lora, init, args.seed, device=device, dtype=dtype, qlora=qlora)
    check_same_weights(adapter.model, bare)
    pad_id = adapter.tokenizer.pad_token_id
    examples = lab_examples(adapter.tokenizer, args.seq_len, pack=args.pack)
    # torch_threads=threads: train_local keeps the count both sides run on.
    spec = TrainSpec(
        local_steps=args.steps,
        batch_size=args.batch_size,
        torch_threads=threads,
        device=device,
        precision=precision,
        **{LEVERS[x]: True for x in levers},
    )
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
    run_bare(bare, init, bare_batches[:1], spec, place)

    a, b = Side("silotune train_local"), Side("bare peft+torch")

    def measure_silotune() -> None:
        wall, cpu, others, tok, loss, last, peak = run_silotune(adapter, init, examples, spec, args.seed)
        if tok != tokens:
            raise SystemExit(f"silotune trained on {tok} tokens, the baseline on {tokens}: batches differ")
        a.add(wall, cpu, others, tokens, loss, peak)
        a.last_loss = last

    def measure_bare() -> None:
        wall, cpu, others, losses, peak = run_bare(bare, init, bare_batches, spec, place)
        b.add(wall, cpu, others, tokens, losses[0], peak)
        b.last_loss = losses[-1]

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
    gpu_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    target = (TARGET_GPU if gpu_name else TARGET_LEVERS_CPU) if levers else TARGET
    print()
    print(
        f"model {args.model} ({args.method})  {device}{f' ({gpu_name})' if gpu_name else ''} {precision}  "
        f"levers {','.join(levers) or 'none'}  batch {shape[0]}x{shape[1]}  {args.steps} steps/run  "
        f"{len(keep)} of {r} pairs counted  {tokens} non-pad tokens/run  threads {threads}  "
        f"setup {setup_s:.1f}s"
    )
    print(
        f"{'side':<22}{'median tok/s':>14}{'min':>10}{'max':>10}{'median s':>10}{'CPU s':>10}{'1st loss':>10}"
        f"{'last loss':>10}{'peak GB':>9}"
    )
    for side in (a, b):
        tps = [side.tokens_per_s[i] for i in keep]
        print(
            f"{side.name:<22}{side.median(keep):>14.1f}{min(tps):>10.1f}{max(tps):>10.1f}"
            f"{statistics.median(side.seconds[i] for i in keep):>10.3f}"
            f"{statistics.median(side.cpu_seconds[i] for i in keep):>10.3f}{side.first_loss:>10.4f}"
            f"{side.last_loss:>10.4f}{max(side.peak_bytes) / 1e9:>9.2f}"
        )
    print(f"median of paired ratios = {paired:.3f}; CPU-time ratio bare/silotune = {cpu_ratio:.3f}")
    if gpu_name:
        print(f"peak memory silotune/bare = {max(a.peak_bytes) / max(b.peak_bytes):.2f} (target <= 0.6)")
    if not clean:
        print(
            f"warning: other processes used >= {args.noisy_cores} cores during every pair; "
            "these numbers are not trustworthy, rerun on a quiet machine"
        )
    elif len(clean) < args.repeats:
        print(f"warning: only {len(clean)} quiet pairs of the {args.repeats} asked for")
    print(f"ratio silotune/bare = {ratio:.2f} (target >= {target})")

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
            "target": target,
            "device": device,
            "gpu": gpu_name,
            "precision": precision,
            "method": args.method,
            "levers": levers,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
