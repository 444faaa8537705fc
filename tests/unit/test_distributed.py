"""A silo's round on 2 CPU processes (torchrun, gloo) equals the one-process round on the same global batch."""

from __future__ import annotations

import pytest
import torch

from silotune.config import TrainSpec
from silotune.data import encode_dataset, read_records
from silotune.errors import ConfigError
from silotune.federation import initial_adapter
from silotune.training import train_local

# Each rank pads its own half of the batch and gloo sums fp32 gradients in another order than
# one process does: the updates agree to float rounding. Tolerance: 2e-5 absolute on updates of
# ~0.1 (3 AdamW steps at lr 5e-2; Adam's first steps divide by tiny second moments, which turns
# 1e-7 gradient differences into ~5e-6), and 1e-5 relative on the reported losses.
ATOL = 2e-5
LOSS_RTOL = 1e-5


def test_two_process_ddp_update_equals_one_process(tiny_adapter, demo_data) -> None:
    ex = encode_dataset(read_records(demo_data["lab"]["train"]), tiny_adapter.tokenizer, 128)
    g = initial_adapter(tiny_adapter.state(), seed=0)
    one = TrainSpec(local_steps=3, batch_size=4, learning_rate=5e-2, device="cpu")
    d1, r1 = train_local(tiny_adapter, g, ex, one, seed=3, progress=False)
    two = one.model_copy(update={"processes": 2})
    d2, r2 = train_local(tiny_adapter, g, ex, two, seed=3, progress=False)
    assert set(d2) == set(d1)
    assert max(float((d2[k] - d1[k]).abs().max()) for k in d1) <= ATOL
    assert max(float(d1[k].abs().max()) for k in d1) > 1000 * ATOL  # the update is not ~0
    assert r2.first_loss == pytest.approx(r1.first_loss, rel=LOSS_RTOL)
    assert r2.final_loss == pytest.approx(r1.final_loss, rel=LOSS_RTOL)
    assert r2.tokens == r1.tokens and r2.steps == r1.steps
    # The calling process ends with the trained state loaded, as after a one-process round.
    state = tiny_adapter.state()
    assert all(torch.allclose(state[k], g[k] + d2[k]) for k in d2)


def test_unsupported_multi_process_rounds_are_refused(tiny_adapter) -> None:
    g = tiny_adapter.state()
    with pytest.raises(ConfigError, match="at least one example"):
        train_local(tiny_adapter, g, [], TrainSpec(processes=4, batch_size=2), seed=0, progress=False)
    with pytest.raises(ConfigError, match="fsdp shards full fine-tuning"):
        train_local(tiny_adapter, g, [], TrainSpec(processes=2, parallelism="fsdp"), seed=0, progress=False)


@pytest.mark.integration  # two more processes load torch and the model: ~50 s on 2 busy cores
def test_two_process_fsdp_full_finetuning_equals_one_process(demo_data) -> None:
    """FSDP2 shards full fine-tuning across 2 CPU processes (gloo); the update is the one-process one."""
    from silotune.adapters import AdapterModel
    from silotune.config import LoraSpec, MethodSpec, ModelSpec

    full = AdapterModel.create(
        ModelSpec(name_or_path="tiny-llama"), LoraSpec(r=4), seed=0, method=MethodSpec(name="full")
    )
    ex = encode_dataset(read_records(demo_data["lab"]["train"]), full.tokenizer, 128)
    g = full.state()
    one = TrainSpec(local_steps=2, batch_size=4, learning_rate=1e-3, device="cpu")
    d1, r1 = train_local(full, g, ex, one, seed=3, progress=False)
    d2, r2 = train_local(
        full, g, ex, one.model_copy(update={"processes": 2, "parallelism": "fsdp"}), seed=3, progress=False
    )
    assert set(d2) == set(d1)
    # Same tolerance reasoning as DDP; the updates are ~2e-3 (lr 1e-3, 2 steps), seen to differ by ~7e-7.
    assert max(float((d2[k] - d1[k]).abs().max()) for k in d1) <= 1e-5
    assert max(float(d1[k].abs().max()) for k in d1) > 1e-4
    assert r2.final_loss == pytest.approx(r1.final_loss, rel=LOSS_RTOL)
