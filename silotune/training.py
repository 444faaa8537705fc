"""The local post-training recipe a silo runs each round (SFT by default; any method).

Reads top to bottom: seed, fresh optimizer, ``local_steps`` AdamW steps on
per-sequence losses, then the delta against the global adapter it started from.
The optimizer state is not carried across rounds: every round starts from the
broadcast global, as in FedAvg.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from silotune.adapters import AdapterModel, TensorDict, delta, global_norm, tensor_bytes
from silotune.config import TrainSpec
from silotune.data import Example, batches, collate, per_sequence_loss


@dataclass(frozen=True)
class TrainResult:
    """What a silo reports about its local training (small, serialisable)."""

    num_examples: int
    steps: int
    tokens: int
    first_loss: float
    final_loss: float
    mean_loss: float
    seconds: float
    tokens_per_second: float
    update_norm: float
    update_bytes: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def silo_seed(seed: int, round_: int, silo_index: int) -> int:
    """A distinct, reproducible seed per (federation seed, round, silo)."""
    return (seed * 1_000_003 + round_ * 10_007 + silo_index) % (2**31 - 1)


def train_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    max_grad_norm: float | None,
) -> float:
    """One optimizer step on the mean per-sequence loss; returns that loss."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    seq_loss, _, _ = per_sequence_loss(out.logits, batch["labels"], with_exact=False)
    loss = seq_loss.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def train_local(
    adapter: AdapterModel,
    global_state: TensorDict,
    examples: Sequence[Example],
    spec: TrainSpec,
    *,
    seed: int,
    desc: str = "local training",
    progress: bool = True,
    objective: Any | None = None,
) -> tuple[TensorDict, TrainResult]:
    """Train the adapter from ``global_state`` on ``examples``; return (delta, report).

    ``objective`` (from :func:`silotune.methods.objectives.build_objective`) replaces the SFT
    batch and step, e.g. DPO on preference pairs; None is SFT.
    """
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    adapter.load_state(global_state)
    model = adapter.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout, if configured
    pad_id = adapter.tokenizer.pad_token_id
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=spec.local_steps, desc=desc, unit="step", disable=not progress, leave=False)
    for batch_examples in batches(examples, spec.batch_size, steps=spec.local_steps, generator=gen):
        if objective is None:
            batch = collate(batch_examples, pad_id)
            tokens += int(batch["attention_mask"].sum())
            losses.append(train_step(model, batch, optimizer, params, spec.max_grad_norm))
        else:
            batch = objective.collate(batch_examples, pad_id)
            tokens += int(batch["attention_mask"].sum())
            losses.append(objective.step(adapter, batch, optimizer, params, spec.max_grad_norm))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    d = delta(adapter.state(), global_state)
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"{desc}: training loss became non-finite ({losses[-1]})")
    result = TrainResult(
        num_examples=len(examples),
        steps=len(losses),
        tokens=tokens,
        first_loss=losses[0],
        final_loss=losses[-1],
        mean_loss=sum(losses) / len(losses),
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else float("nan"),
        update_norm=global_norm(d),
        update_bytes=tensor_bytes(d),
    )
    return d, result
