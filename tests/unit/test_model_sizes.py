"""Real model sizes: the estimator's parameter count of 1B-class shapes (meta device, no weights), and
GPU training on them (tests marked ``gpu`` skip cleanly without CUDA)."""

from __future__ import annotations

import pytest
import torch

from silotune.memory_estimate import SHAPES

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("preset", ["llama-1b", "llama-3.2-1b", "llama-3.1-8b"])
def test_estimator_counts_the_parameters_of_real_shapes(preset) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES[preset]
    with torch.device("meta"):  # the shape alone: no memory, no weights
        model = LlamaForCausalLM(LlamaConfig(**shape.hf_config()))
    assert sum(p.numel() for p in model.parameters()) == shape.num_params()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gpu_one_lora_round_on_a_random_1b_shape(method, demo_data) -> None:
    from silotune.adapters import AdapterModel
    from silotune.compute import placement
    from silotune.config import LoraSpec, MethodSpec, ModelSpec, TrainSpec
    from silotune.data import encode_dataset, read_records
    from silotune.federation import initial_adapter
    from silotune.modeling import random_model_path
    from silotune.training import train_local

    path = random_model_path(SHAPES["llama-3.2-1b"].hf_config(), "llama-3.2-1b")
    spec = TrainSpec(local_steps=3, batch_size=4, learning_rate=1e-3, device="cuda")
    place = placement(spec)
    assert place.device == "cuda:0" and place.precision == "bf16"
    options = {"base_dtype": "bfloat16"} if method == "lora" else {}
    adapter = AdapterModel.create(
        ModelSpec(name_or_path=str(path)),
        LoraSpec(r=8),
        seed=0,
        method=MethodSpec(name=method, options=options),
        placement=place,
    )
    assert adapter.device.type == "cuda"
    if method == "qlora":  # NF4 weights, bf16 compute, double quantisation, on the GPU
        import bitsandbytes as bnb

        layers = [m for m in adapter.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and layers[0].weight.quant_state.nested and layers[0].compute_dtype == torch.bfloat16
    ex = encode_dataset(read_records(demo_data["lab"]["train"]), adapter.tokenizer, 128)
    g = initial_adapter(adapter.state(), seed=0)
    assert all(v.device.type == "cpu" for v in g.values())  # what is exchanged lives in host memory
    d, r = train_local(adapter, g, ex, spec, seed=1, progress=False)
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in d.values())
    assert r.update_norm > 0 and r.final_loss == r.final_loss
