"""Membership inference against a (federated) adapter.

Two black-box-loss attacks on the final global adapter, each scoring an
example; a higher score means "was in some silo's training data":

- ``loss``: the loss-threshold attack of Yeom, Giacomelli, Fredrikson and Jha,
  "Privacy Risk in Machine Learning", CSF 2018: ``score = -loss``.
- ``reference``: a reference-model attack in the spirit of LiRA's offline
  variant (Carlini, Chien, Nasr, Song, Terzis and Tramèr, "Membership Inference
  Attacks From First Principles", S&P 2022; the difference form of Watson et
  al., ICLR 2022): ``score = reference loss - target loss``. With an open model
  the base model itself (the adapter switched off) is a free, strong reference:
  it calibrates away how hard each example is, leaving what fine-tuning added.

Members are silos' training records, non-members held-out records from the same
distributions. LoRA alone is not a privacy guarantee: a low-rank adapter still
memorises (the reference attack measures how much); only DP-SGD bounds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from silotune.adapters import AdapterModel
from silotune.audit.metrics import roc_auc, tpr_at_fpr
from silotune.data import Example, collate, per_sequence_loss
from silotune.methods import stacked


@dataclass(frozen=True)
class MIAResult:
    attack: str
    auc: float
    tpr_at_1pct_fpr: float
    num_members: int
    num_nonmembers: int
    member_scores: list[float] = field(repr=False)
    nonmember_scores: list[float] = field(repr=False)

    def metrics(self) -> dict[str, float]:
        return {"auc": self.auc, "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr}


@torch.no_grad()
def example_losses(
    adapter: AdapterModel,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    state: Mapping[str, torch.Tensor] | None = None,
    base_model: bool = False,
) -> list[float]:
    """Per-example mean response-token loss; ``base_model=True`` switches the adapter off (the reference)."""
    if state is not None:
        adapter.load_state(state)
    model = adapter.model
    model.eval()
    pad_id = adapter.tokenizer.pad_token_id
    losses: list[float] = []
    with model.disable_adapter() if base_model else nullcontext():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i : i + batch_size], pad_id)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            seq_loss, _, _ = per_sequence_loss(out.logits, batch["labels"], with_exact=False)
            losses.extend(float(x) for x in seq_loss)
    return losses


def score_attack(attack: str, members: Sequence[float], nonmembers: Sequence[float]) -> MIAResult:
    return MIAResult(
        attack=attack,
        auc=roc_auc(members, nonmembers),
        tpr_at_1pct_fpr=tpr_at_fpr(members, nonmembers, 0.01),
        num_members=len(members),
        num_nonmembers=len(nonmembers),
        member_scores=list(members),
        nonmember_scores=list(nonmembers),
    )


def membership_inference(
    adapter: AdapterModel,
    state: Mapping[str, torch.Tensor],
    members: Sequence[Example],
    nonmembers: Sequence[Example],
    *,
    batch_size: int = 16,
) -> dict[str, MIAResult]:
    """Run the loss-threshold and the reference-model attack on ``state``; keyed by attack name."""
    state, target = stacked.applied(adapter, state)  # a stacked federation's merged global, too
    with target:
        tm = example_losses(adapter, members, batch_size=batch_size, state=state)
        tn = example_losses(adapter, nonmembers, batch_size=batch_size)
    rm = example_losses(adapter, members, batch_size=batch_size, base_model=True)
    rn = example_losses(adapter, nonmembers, batch_size=batch_size, base_model=True)
    return {
        "loss": score_attack("loss", [-x for x in tm], [-x for x in tn]),
        "reference": score_attack(
            "reference",
            [r - t for r, t in zip(rm, tm, strict=True)],
            [r - t for r, t in zip(rn, tn, strict=True)],
        ),
    }
