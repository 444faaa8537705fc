"""Holdout evaluation: response-token loss and greedy exact match.

Exact match is computed teacher-forced in the same forward pass as the loss: a
greedy decoder reproduces the reference answer (through its end-of-turn token)
exactly when, at every answer position, the reference token is the argmax given
the reference prefix. So the metric equals "greedy generation == reference"
without running a token-by-token generation loop (ties aside).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from silotune.adapters import AdapterModel
from silotune.data import Example, collate, per_sequence_loss


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    exact_match: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def evaluate(
    adapter: AdapterModel,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    state: Mapping[str, torch.Tensor] | None = None,
) -> EvalResult:
    """Mean per-example loss and exact-match rate of the adapter (``state`` if given)."""
    if state is not None:
        adapter.load_state(state)
    model = adapter.model
    model.eval()
    pad_id = adapter.tokenizer.pad_token_id
    total_loss = 0.0
    total_exact = 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        seq_loss, _, exact = per_sequence_loss(out.logits, batch["labels"])
        total_loss += float(seq_loss.sum())
        total_exact += int(exact.sum())
    n = len(examples)
    return EvalResult(num_examples=n, loss=total_loss / n, exact_match=total_exact / n)


def weighted_mean(results: Sequence[EvalResult]) -> EvalResult:
    """Combine per-silo results weighted by holdout size."""
    n = sum(r.num_examples for r in results)
    if n == 0:
        raise ValueError("no evaluation results to combine")
    return EvalResult(
        num_examples=n,
        loss=sum(r.loss * r.num_examples for r in results) / n,
        exact_match=sum(r.exact_match * r.num_examples for r in results) / n,
    )
