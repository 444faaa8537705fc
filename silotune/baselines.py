"""Comparing adapters on holdouts: the base model, local-only adapters, the federated one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from silotune.adapters import AdapterModel
from silotune.data import encode_dataset, read_records
from silotune.evaluation import EvalResult, evaluate


@dataclass(frozen=True)
class Comparison:
    """``results[adapter_name][holdout_name]`` → EvalResult."""

    results: dict[str, dict[str, EvalResult]]

    def beats(self, a: str, b: str, holdout: str) -> bool:
        """``a`` is better than ``b`` on ``holdout``: lower loss and exact match at least as high."""
        ra, rb = self.results[a][holdout], self.results[b][holdout]
        return ra.loss < rb.loss and ra.exact_match >= rb.exact_match


def compare_adapters(
    adapter: AdapterModel,
    states: Mapping[str, Mapping[str, torch.Tensor]],
    holdouts: Mapping[str, str | Path],
    *,
    max_seq_len: int,
    batch_size: int = 16,
) -> Comparison:
    encoded = {
        name: encode_dataset(read_records(p), adapter.tokenizer, max_seq_len) for name, p in holdouts.items()
    }
    results: dict[str, dict[str, EvalResult]] = {}
    for aname, state in states.items():
        adapter.load_state(state)
        results[aname] = {h: evaluate(adapter, ex, batch_size=batch_size) for h, ex in encoded.items()}
    return Comparison(results)
