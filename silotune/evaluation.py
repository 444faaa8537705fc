"""Holdout evaluation: response-token loss and greedy exact match; free-running generation with
ROUGE-L and chrF.

Exact match is computed teacher-forced in the same forward pass as the loss: a
greedy decoder reproduces the reference answer (through its end-of-turn token)
exactly when, at every answer position, the reference token is the argmax given
the reference prefix. So the metric equals "greedy generation == reference"
without running a token-by-token generation loop (ties aside).

Free-running generation (:func:`generate_eval`) decodes greedily from the chat-templated prompt, as
a user of the adapter would, up to ``max_new_tokens``: its exact match (the generated tokens are the
reference answer through its end-of-turn token) equals the teacher-forced one whenever the limit
covers the answer, and its text is scored against the reference with ROUGE-L (``rouge-score``) and
chrF (``sacrebleu``), computed locally. Those give partial credit on free-text answers.

On a preference silo (``{prompt, chosen, rejected}`` holdout) the loss and exact
match are those of the chosen answers, so they stay comparable across silos,
and the preference metrics of :mod:`silotune.methods.objectives` come on top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

from silotune.adapters import AdapterModel
from silotune.data import IGNORE_INDEX, Example, PreferenceExample, collate, per_sequence_loss
from silotune.methods.objectives import evaluate_pairs
from silotune.training import response_head

_PREF_FIELDS = ("dpo_loss", "pref_margin", "pref_accuracy", "reward_margin", "reward_accuracy")
_GEN_FIELDS = ("gen_exact_match", "rouge_l", "chrf")


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
    # Free-running generation only (see generate_eval): exact match, ROUGE-L F1 (0-1), chrF (0-100).
    gen_exact_match: float | None = None
    rouge_l: float | None = None
    chrf: float | None = None

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
    head_rows = response_head(model)
    total_loss = 0.0
    total_exact = 0
    for i in range(0, len(examples), batch_size):
        batch = adapter.to_device(collate(examples[i : i + batch_size], pad_id))  # batched on the device
        with adapter.autocast():
            if head_rows is None:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                seq_loss, _, exact = per_sequence_loss(out.logits, batch["labels"])
            else:
                seq_loss, exact = _response_loss(*head_rows, batch)
        total_loss += float(seq_loss.sum())
        total_exact += int(exact.sum())
    n = len(examples)
    return EvalResult(num_examples=n, loss=total_loss / n, exact_match=total_exact / n)


def _response_loss(
    decoder: torch.nn.Module, head: torch.nn.Module, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean answer-token loss and greedy exact match [B], as :func:`per_sequence_loss`
    gives them, with the LM head applied to the answer positions only.

    Most positions of a chat example are prompt: on SmolLM2-135M the head is ~1/5 of the FLOPs
    and the full [B, T, vocab] logits (49,152 columns) dominate the memory of an evaluation batch."""
    labels = batch["labels"]
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    mask = shift_labels != IGNORE_INDEX
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = head(hidden[mask]).float()
    targets = shift_labels[mask]
    tok = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    row = mask.nonzero()[:, 0]
    n = labels.size(0)
    sums = torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, row, tok)
    counts = mask.sum(dim=1)
    wrong = torch.zeros(n, dtype=torch.long, device=tok.device).index_add(
        0, row, (logits.argmax(dim=-1) != targets).long()
    )
    return sums / counts.clamp_min(1), (wrong == 0) & (counts > 0)


def weighted_mean(results: Sequence[EvalResult]) -> EvalResult:
    """Combine per-silo results weighted by holdout size."""
    n = sum(r.num_examples for r in results)
    if n == 0:
        raise ValueError("no evaluation results to combine")
    extra: dict[str, float] = {}
    for f in fields(EvalResult):
        if f.name in _PREF_FIELDS or f.name in _GEN_FIELDS:
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


@dataclass(frozen=True)
class GenerationResult:
    """Free-running greedy generation scored against the references."""

    num_examples: int
    exact_match: float
    rouge_l: float
    chrf: float
    per_example_exact: list[bool]
    predictions: list[str]
    references: list[str]
    per_example_rouge_l: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {"gen_exact_match": self.exact_match, "rouge_l": self.rouge_l, "chrf": self.chrf}


def split_answer(example: Example) -> tuple[list[int], list[int]]:
    """The prompt (chat template through the generation prompt) and the reference answer tokens (through
    the end-of-turn token) of a single-turn example."""
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return example.input_ids[:first], [t for t in example.labels[first:] if t != IGNORE_INDEX]


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]


def chrf_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (``sacrebleu``) of ``predictions`` against ``references``."""
    return float(CHRF().corpus_score(list(predictions), [list(references)]).score)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """(mean ROUGE-L F1, corpus chrF) of ``predictions`` against ``references``."""
    rouge = rouge_l_scores(predictions, references)
    return sum(rouge) / max(1, len(rouge)), chrf_score(predictions, references)


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (sample standard deviation / sqrt(n), as
    lm-evaluation-harness reports it); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def binary_standard_error(rate: float, n: int) -> float:
    """:func:`standard_error` of ``n`` 0/1 values whose mean is ``rate``, from the mean alone."""
    return math.sqrt(rate * (1 - rate) / (n - 1)) if n >= 2 else 0.0


@torch.no_grad()
def generate_eval(
    adapter: AdapterModel,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    state: Mapping[str, torch.Tensor] | None = None,
) -> GenerationResult:
    """Greedy generation from each example's chat-templated prompt (left-padded batches), scored by
    exact match (generated tokens == reference tokens through end of turn), ROUGE-L and chrF."""
    if state is not None:
        adapter.load_state(state)
    model, tok = adapter.model, adapter.tokenizer
    model.eval()
    pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
    exact: list[bool] = []
    preds: list[str] = []
    refs: list[str] = []
    for i in range(0, len(examples), batch_size):
        parts = [split_answer(e) for e in examples[i : i + batch_size]]
        width = max(len(p) for p, _ in parts)
        ids = torch.full((len(parts), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(parts), width), dtype=torch.long)
        for j, (p, _) in enumerate(parts):
            ids[j, width - len(p) :] = torch.tensor(p)
            attn[j, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        for j, (_, ref) in enumerate(parts):
            gen = out[j, width:].tolist()
            if eos_id in gen:
                gen = gen[: gen.index(eos_id) + 1]
            exact.append(gen[: len(ref)] == ref)
            preds.append(tok.decode(gen, skip_special_tokens=True).strip())
            refs.append(tok.decode(ref, skip_special_tokens=True).strip())
    rouge_each = rouge_l_scores(preds, refs)
    chrf = chrf_score(preds, refs)
    n = len(exact)
    return GenerationResult(
        num_examples=n,
        exact_match=sum(exact) / n if n else 0.0,
        rouge_l=sum(rouge_each) / max(1, n),
        chrf=chrf,
        per_example_exact=exact,
        predictions=preds,
        references=refs,
        per_example_rouge_l=rouge_each,
    )


def evaluate_with_generation(
    adapter: AdapterModel,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    state: Mapping[str, torch.Tensor] | None = None,
) -> EvalResult:
    """Teacher-forced loss and exact match, and beside them the free-running generation metrics."""
    tf = evaluate(adapter, examples, batch_size=batch_size, state=state)
    gen = generate_eval(adapter, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return replace(tf, gen_exact_match=gen.exact_match, rouge_l=gen.rouge_l, chrf=gen.chrf)
