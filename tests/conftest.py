"""Shared fixtures: one process-wide tiny model, the SmolLM2 tokenizer, demo data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a hub, and the local Prefect server sends no telemetry.
from silotune.modeling import OFFLINE_ENV

for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def tokenizer():
    from silotune.modeling import load_tokenizer, smollm2_path

    return load_tokenizer(smollm2_path(with_weights=False))


@pytest.fixture(scope="session")
def tiny_adapter():
    """The tiny random Llama with LoRA attached, shared by every test that needs a model."""
    from silotune.adapters import AdapterModel
    from silotune.config import LoraSpec, ModelSpec

    return AdapterModel.create(ModelSpec(name_or_path="tiny-llama", max_seq_len=128), LoraSpec(r=4), seed=0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, dict[str, Path]]:
    from silotune.demo import make_demo_silos

    return make_demo_silos(tmp_path_factory.mktemp("demo"), seed=0, scale=0.1)
