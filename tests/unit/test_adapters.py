from __future__ import annotations

from pathlib import Path

import pytest
import torch

from silotune.adapters import apply_delta, delta
from silotune.config import TrainSpec
from silotune.data import encode_dataset, read_records
from silotune.errors import UpdateError
from silotune.evaluation import evaluate
from silotune.federation import initial_adapter
from silotune.training import train_local


def test_delta_apply_round_trip(tiny_adapter) -> None:
    g = initial_adapter(tiny_adapter.state(), seed=1)
    local = {k: v + 0.01 * torch.randn_like(v) for k, v in g.items()}
    back = apply_delta(g, delta(local, g))
    assert all(torch.allclose(back[k], local[k], atol=1e-7) for k in g)


def test_initial_adapter_is_seeded_and_b_is_zero(tiny_adapter) -> None:
    a, b = initial_adapter(tiny_adapter.state(), 7), initial_adapter(tiny_adapter.state(), 7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], initial_adapter(tiny_adapter.state(), 8)[k]) for k in a)
    assert all(float(v.abs().sum()) == 0.0 for k, v in a.items() if "lora_B" in k)


def test_load_state_rejects_foreign_adapters(tiny_adapter) -> None:
    state = tiny_adapter.state()
    k = next(iter(state))
    with pytest.raises(UpdateError, match="keys do not match"):
        tiny_adapter.load_state({kk: v for kk, v in state.items() if kk != k})
    with pytest.raises(UpdateError, match="shape"):
        tiny_adapter.load_state({**state, k: torch.zeros(1)})


def test_training_lowers_loss_and_is_reproducible(tiny_adapter, demo_data) -> None:
    ex = encode_dataset(read_records(demo_data["lab"]["train"]), tiny_adapter.tokenizer, 128)
    g = initial_adapter(tiny_adapter.state(), seed=0)
    spec = TrainSpec(local_steps=6, batch_size=4, learning_rate=5e-2)
    d1, r1 = train_local(tiny_adapter, g, ex, spec, seed=3, progress=False)
    d2, _ = train_local(tiny_adapter, g, ex, spec, seed=3, progress=False)
    assert all(torch.equal(d1[k], d2[k]) for k in d1)  # same seed, same delta, bit for bit
    assert r1.steps == 6 and r1.update_norm > 0 and r1.tokens > 0
    before = evaluate(tiny_adapter, ex, state=g).loss
    after = evaluate(tiny_adapter, ex, state=apply_delta(g, d1)).loss
    assert after < before
    assert r1.update_bytes == sum(v.numel() * 4 for v in d1.values())


def test_saved_adapter_loads_with_peft(tiny_adapter, tmp_path: Path) -> None:
    from peft import PeftModel

    from silotune.modeling import load_base_model

    g = initial_adapter(tiny_adapter.state(), seed=0)
    g = {k: v + 0.05 for k, v in g.items()}  # non-zero B so the adapter changes outputs
    folder = tiny_adapter.save_pretrained(tmp_path / "adapter", g)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = tiny_adapter.model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(load_base_model(tiny_adapter.model_path), folder).eval()
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
