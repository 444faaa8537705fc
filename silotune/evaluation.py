"""Holdout evaluation: response-token loss and greedy exact match.

Exact match is computed teacher-forced in the same forward pass as the loss: a
greedy decoder reproduces the reference answer (through its end-of-turn token)
exactly when, at every answer position, the reference token is the argmax given
the reference prefix. So the metric equals "greedy generation == reference"
without running a token-by-token generation loop (ties aside).

On a preference silo (``{prompt, chosen, rejected}`` holdout) the loss and exact
match are those of the chosen answers, so they stay comparable across silos,
and the preference metrics of :mod:`silotune.methods.objectives` come on top.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from silotune.adapters import AdapterModel
from silotune.data import Example, PreferenceExample, collate, per_sequence_loss
from silotune.methods.objectives import evaluate_pairs

_PREF_FIELDS = ("dpo_loss", "pref_margin", "pref_accuracy", "reward_margin", "reward_accuracy")


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    exact_match: float
    # Preference silos only (None elsewhere); see silotune.methods.objectives.PreferenceEval.
    dpo_loss: float | None = None
    pref_margin: float | None = None
    pref_accuracy: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None

    def as_dict(self) -> dict[str, float | int]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@torch.no_grad()
def evaluate(
    adapter: AdapterModel,
    examples: Sequence[Example] | Sequence[PreferenceExample],
    *,
    batch_size: int = 16,
    state: Mapping[str, torch.Tensor] | None = None,
    beta: float = 0.1,
) -> EvalResult:
    """Mean per-example loss and exact-match rate of the adapter (``state`` if given).

    Preference pairs are scored on their chosen answers, plus the preference metrics
    (``beta`` scales the implicit DPO reward).
    """
    if state is not None:
        adapter.load_state(state)
    if examples and isinstance(examples[0], PreferenceExample):
        pairs: Sequence[Any] = examples
        base = evaluate(adapter, [p.chosen for p in pairs], batch_size=batch_size)
        pref = evaluate_pairs(
            adapter, pairs, pad_id=adapter.tokenizer.pad_token_id, beta=beta, batch_size=batch_size
        )
        return replace(base, **{k: getattr(pref, k) for k in _PREF_FIELDS})
    model = adapter.model
    model.eval()
    pad_id = adapter.tokenizer.pad_token_id
    total_loss = 0.0
    total_exact = 0
    for i in range(0, len(examples), batch_size):
        batch = adapter.to_device(collate(examples[i : i + batch_size], pad_id))  # batched on the device
        with adapter.autocast():
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
    extra: dict[str, float] = {}
    for f in fields(EvalResult):
        if f.name in _PREF_FIELDS:
            have = [r for r in results if getattr(r, f.name) is not None]
            m = sum(r.num_examples for r in have)
            if m:
                extra[f.name] = sum(getattr(r, f.name) * r.num_examples for r in have) / m
    return EvalResult(
        num_examples=n,
        loss=sum(r.loss * r.num_examples for r in results) / n,
        exact_match=sum(r.exact_match * r.num_examples for r in results) / n,
        **extra,
    )
