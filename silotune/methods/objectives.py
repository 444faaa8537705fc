"""Training objectives beyond plain SFT: direct preference optimisation (DPO).

DPO (Rafailov et al. 2023) aligns a policy to pairwise preferences without a
reward model or sampling: with sequence log-probabilities ``π`` of the policy
and ``r`` of a frozen reference, the per-pair loss is

    -log σ(β [(π(chosen) − r(chosen)) − (π(rejected) − r(rejected))])

It is the practical stand-in for RLHF in federated post-training: the only
auxiliary model is the reference, which is the frozen base (the PEFT model with
its adapter disabled), never leaves the silo and is never exchanged. So what a
DPO silo uploads is an ordinary adapter delta, and every filter that protects
SFT updates (DP clipping and noise, CKKS encryption, secure-aggregation masks,
robust aggregation) protects it unchanged. That answers, for DPO, the paper's
open question of how to protect RLHF's auxiliary reward and policy models.

One pair is one privacy unit: the loss is a mean over pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from silotune.data import PreferenceExample, collate, per_sequence_loss
from silotune.errors import DataError, RegistryError


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities per sequence [B]."""
    seq_loss, counts, _ = per_sequence_loss(logits, labels, with_exact=False)
    return -seq_loss * counts


def collate_pairs(pairs: Sequence[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows: the B chosen sequences, then the B rejected ones (one forward pass)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss and implicit reward margin ``β[(π_c − r_c) − (π_r − r_r)]``."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -torch.nn.functional.logsigmoid(margin), margin


class _Reference(Protocol):
    model: Any

    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def autocast(self) -> AbstractContextManager[Any]: ...


@dataclass(frozen=True)
class DPO:
    """Sigmoid DPO as a training objective: ``collate`` a batch of pairs, then ``step`` on it."""

    beta: float = 0.1

    def collate(self, pairs: Sequence[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
        if pairs and not isinstance(pairs[0], PreferenceExample):
            raise DataError(
                "objective 'dpo' needs preference pairs ({prompt, chosen, rejected} records); "
                "this silo's data holds instruction/chat records"
            )
        return collate_pairs(pairs, pad_id)

    def step(
        self,
        adapter: _Reference,
        batch: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        max_grad_norm: float | None,
    ) -> float:
        """One optimizer step on the mean per-pair DPO loss (``batch`` on the model's device)."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n = ids.size(0) // 2
        with adapter.autocast():
            # The reference pass runs first and without gradients: nothing of it is kept for backward.
            ref = sequence_logps(adapter.reference_logits(ids, mask), labels)
            out = adapter.model(input_ids=ids, attention_mask=mask)
            pol = sequence_logps(out.logits, labels)
        loss, _ = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=self.beta)
        loss = loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        return float(loss.detach())


def build_objective(spec: Any) -> DPO | None:
    """The objective for an :class:`~silotune.config.ObjectiveSpec`; None is plain SFT (the default loop)."""
    if spec is None or spec.name == "sft":
        return None
    if spec.name == "dpo":
        return DPO(beta=spec.beta)

    raise RegistryError(f"unknown objective {spec.name!r}; known: dpo, sft")


@dataclass(frozen=True)
class PreferenceEval:
    """Held-out preference metrics of a policy against the frozen reference."""

    num_pairs: int
    dpo_loss: float
    pref_margin: float  # mean log π(chosen) − log π(rejected), in nats
    pref_accuracy: float  # fraction of pairs with log π(chosen) > log π(rejected)
    reward_margin: float  # mean implicit reward margin β[(π_c − r_c) − (π_r − r_r)]
    reward_accuracy: float  # fraction of pairs with a positive implicit reward margin


@torch.no_grad()
def evaluate_pairs(
    adapter: _Reference, pairs: Sequence[PreferenceExample], *, pad_id: int, beta: float, batch_size: int = 16
) -> PreferenceEval:
    adapter.model.eval()
    losses, margins, rewards = [], [], []
    for i in range(0, len(pairs), batch_size):
        batch = adapter.to_device(collate_pairs(pairs[i : i + batch_size], pad_id))
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n = ids.size(0) // 2
        with adapter.autocast():
            pol = sequence_logps(adapter.model(input_ids=ids, attention_mask=mask).logits, labels)
            ref = sequence_logps(adapter.reference_logits(ids, mask), labels)
        loss, reward = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta=beta)
        losses.append(loss)
        margins.append(pol[:n] - pol[n:])
        rewards.append(reward)
    loss_t, margin_t, reward_t = (torch.cat(x).float().cpu() for x in (losses, margins, rewards))
    return PreferenceEval(
        num_pairs=len(pairs),
        dpo_loss=float(loss_t.mean()),
        pref_margin=float(margin_t.mean()),
        pref_accuracy=float((margin_t > 0).float().mean()),
        reward_margin=float(reward_t.mean()),
        reward_accuracy=float((reward_t > 0).float().mean()),
    )
