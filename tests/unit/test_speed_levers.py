"""Each CPU speed lever (response-only logits, packing) trains like the plain path on the tiny model."""

from __future__ import annotations

import pytest
import torch

from silotune.config import TrainSpec
from silotune.data import encode_dataset, read_records
from silotune.federation import initial_adapter
from silotune.training import train_local

# fp32 on the CPU: the levers change which positions the LM head sees and how the batch is laid out,
# not the arithmetic of the kept positions, so losses agree to float rounding (1e-5 relative).
TOLERANCE = 1e-5


LEVERS = {
    "response_only": {"response_logits_only": True},
    "packing": {"packing": True},
    "both": {"response_logits_only": True, "packing": True},
}


def test_each_lever_gives_the_plain_loss_and_update(tiny_adapter, demo_data) -> None:
    ex = encode_dataset(read_records(demo_data["lab"]["train"]), tiny_adapter.tokenizer, 128)
    g = initial_adapter(tiny_adapter.state(), seed=0)
    plain = TrainSpec(local_steps=2, batch_size=4, learning_rate=5e-2)
    d0, r0 = train_local(tiny_adapter, g, ex, plain, seed=3, progress=False)
    for name, lever in LEVERS.items():
        d1, r1 = train_local(tiny_adapter, g, ex, plain.model_copy(update=lever), seed=3, progress=False)
        assert r1.first_loss == pytest.approx(r0.first_loss, rel=TOLERANCE), name
        assert r1.final_loss == pytest.approx(r0.final_loss, rel=1e-4), name  # after one AdamW step
        for k in d0:
            torch.testing.assert_close(d1[k], d0[k], rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert r1.tokens == r0.tokens  # packing drops padding only: the real tokens are the same


def test_response_only_refuses_prompt_tuning() -> None:
    from silotune.adapters import AdapterModel
    from silotune.config import LoraSpec, MethodSpec, ModelSpec
    from silotune.errors import ConfigError
    from silotune.training import SequenceLoss

    pt = AdapterModel.create(
        ModelSpec(name_or_path="tiny-llama"),
        LoraSpec(r=4),
        seed=0,
        method=MethodSpec(name="prompt_tuning", options={"num_virtual_tokens": 2}),
    )
    with pytest.raises(ConfigError, match="prompt tuning"):
        SequenceLoss(pt.model, response_only=True)
