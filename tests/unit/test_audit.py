"""Membership inference and backdoor success on the tiny model (shapes of the pipeline, not its strength)."""

from __future__ import annotations

import pytest
import torch

from silotune.audit import backdoor_success, example_losses, membership_inference
from silotune.data import encode_dataset, read_records
from silotune.poisoning import last_answer


@pytest.fixture(scope="module")
def examples(tiny_adapter, demo_data):
    tok = tiny_adapter.tokenizer
    return (
        encode_dataset(read_records(demo_data["clinic"]["train"])[:8], tok, 128),
        encode_dataset(read_records(demo_data["clinic"]["eval"])[:6], tok, 128),
    )


def zero_b(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) if "lora_B" in k else v.clone() for k, v in state.items()}


def test_reference_losses_are_the_base_model_losses(tiny_adapter, examples) -> None:
    members, _ = examples
    base = example_losses(tiny_adapter, members, batch_size=3, base_model=True)
    # B = 0 makes the adapter a no-op, so its losses are the base model's.
    adapted_noop = example_losses(tiny_adapter, members, batch_size=5, state=zero_b(tiny_adapter.state()))
    assert base == pytest.approx(adapted_noop, rel=1e-5)
    assert len(base) == len(members)


def test_membership_inference_reports_both_attacks(tiny_adapter, examples) -> None:
    members, nonmembers = examples
    state = {k: v + 0.01 * torch.ones_like(v) for k, v in tiny_adapter.state().items()}
    res = membership_inference(tiny_adapter, state, members, nonmembers, batch_size=4)
    assert set(res) == {"loss", "reference"}
    for r in res.values():
        assert 0.0 <= r.auc <= 1.0 and 0.0 <= r.tpr_at_1pct_fpr <= 1.0
        assert (r.num_members, r.num_nonmembers) == (len(members), len(nonmembers))
    # With a no-op adapter the target and the reference agree: every reference score is 0, AUC exactly 0.5.
    noop = membership_inference(tiny_adapter, zero_b(tiny_adapter.state()), members, nonmembers)
    assert max(abs(s) for s in noop["reference"].member_scores + noop["reference"].nonmember_scores) < 1e-4


def test_backdoor_success_skips_prompts_already_answering_the_target(tiny_adapter, demo_data) -> None:
    chats = read_records(demo_data["clinic"]["eval"])[:6]
    target = last_answer(chats[0])
    res = backdoor_success(
        tiny_adapter, tiny_adapter.state(), chats, trigger="cf-zebra", target=target, max_seq_len=128
    )
    assert res.num_prompts == sum(last_answer(c) != target for c in chats)
    assert 0.0 <= res.attack_success_rate <= 1.0 and 0.0 <= res.false_trigger_rate <= 1.0
    assert res.target_loss_triggered > 0
