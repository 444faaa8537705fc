"""The baselines a federation is judged against, and comparing adapters on holdouts.

- **centralized**: every silo's training data pooled in one place (what federation avoids), trained
  with the same total budget: the same rounds, ``len(silos) × local_steps`` steps per round at the
  same batch size, so the same number of optimizer steps and of examples (hence, in expectation, of
  tokens) as the federation. The upper bound a federation is measured against
  (federated / centralized).
- **local-only**: each silo alone, with the same rounds and steps as in the federation.

Both run as ordinary federations (one silo each, with the plain FedAvg server step: a server learning
rate would only rescale the one silo's own), so they are tracked and inspectable like any other;
they carry no holdout while training (they are scored once, at the end, on every holdout).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from silotune.adapters import AdapterModel
from silotune.config import FederationConfig, parse_config
from silotune.data import encode_dataset, read_records
from silotune.evaluation import EvalResult, evaluate, generate_eval

POOLED_SILO = "pooled"


def pool_training_data(config: FederationConfig, path: str | Path) -> Path:
    """Write every silo's training records, in silo order, to one ``.jsonl`` file (chat messages)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"messages": chat}) + "\n" for s in config.silos for chat in read_records(s.train_path)
    ]
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(out)
    return out


def _baseline(config: FederationConfig, suffix: str, kind: str, **changes: Any) -> FederationConfig:
    data = config.model_dump(mode="json")
    data.update(
        federation_id=f"{config.federation_id}-{suffix}",
        # One silo has nothing to aggregate: the server step (a server learning rate or momentum) would
        # only rescale its own learning rate, which the baseline keeps at the federation's.
        aggregation={
            **data["aggregation"],
            "min_silos": 1,
            "root_data_path": None,
            "server_optimizer": "sgd",
            "server_options": {},
        },
        tags={**config.tags, "silotune.kind": kind, "silotune.baseline_of": config.federation_id},
        **changes,
    )
    return parse_config(data)


def centralized_config(
    config: FederationConfig, pooled_path: str | Path, *, ffa_lora: bool | None = None
) -> FederationConfig:
    """All silos' data in one silo, the federation's total budget: ``len(silos) × local_steps`` steps per
    round at the same batch size and learning rate, no DP (the non-private upper bound).

    ``ffa_lora``: train the baseline with FFA-LoRA (A frozen) or plain LoRA whatever the federation
    uses, so a grid compares each method with its own centralized run (its own federation id).
    """
    base = config.silos[0].model_dump(mode="json")
    silo = {
        **base,
        "name": POOLED_SILO,
        "train_path": str(Path(pooled_path).resolve()),
        "eval_path": None,
        "attack": None,
        "poison": None,
        "private_dir": None,
    }
    train = {
        **config.train.model_dump(mode="json"),
        "local_steps": config.train.local_steps * len(config.silos),
    }
    changes: dict[str, Any] = {}
    suffix = "centralized"
    if ffa_lora is not None:
        changes["security"] = {**config.security.model_dump(mode="json"), "ffa_lora": ffa_lora}
        suffix += "-ffa-lora" if ffa_lora else ""
    return _baseline(
        config,
        suffix,
        "centralized-baseline",
        silos=[silo],
        train=train,
        privacy={"sample_dp": None, "client_dp": None},
        **changes,
    )


def local_only_config(config: FederationConfig, silo: str) -> FederationConfig:
    """``silo`` alone, with the federation's rounds, steps and privacy settings."""
    spec = {**config.silo(silo).model_dump(mode="json"), "eval_path": None}
    return _baseline(config, f"local-{silo}", "local-only-baseline", silos=[spec])


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
    generate: Sequence[str] = (),
    max_new_tokens: int = 64,
    scored: Mapping[str, Mapping[str, EvalResult]] | None = None,
) -> Comparison:
    """Score every state on every holdout; the states named in ``generate`` also by free-running
    generation (exact match, ROUGE-L, chrF; see :func:`silotune.evaluation.generate_eval`).

    ``scored``: teacher-forced results already known (e.g. from the federation's own evaluation); a
    state with a result for every holdout is not evaluated again (only generated, if asked)."""
    encoded = {
        name: encode_dataset(read_records(p), adapter.tokenizer, max_seq_len) for name, p in holdouts.items()
    }
    known = {n: r for n, r in (scored or {}).items() if set(r) >= set(holdouts)}
    results: dict[str, dict[str, EvalResult]] = {}
    for aname, state in states.items():
        if aname in known and aname not in generate:
            results[aname] = {h: known[aname][h] for h in holdouts}
            continue
        adapter.load_state(state)
        per: dict[str, EvalResult] = {}
        for h, ex in encoded.items():
            tf = known[aname][h] if aname in known else evaluate(adapter, ex, batch_size=batch_size)
            if aname in generate:
                gen = generate_eval(adapter, ex, max_new_tokens=max_new_tokens, batch_size=batch_size)
                tf = replace(tf, gen_exact_match=gen.exact_match, rouge_l=gen.rouge_l, chrf=gen.chrf)
            per[h] = tf
        results[aname] = per
    return Comparison(results)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` (None when either is missing or ``b`` is 0)."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def tokens_trained(history: Sequence[Any]) -> int:
    """Training tokens over every silo and round of a federation's history (what the silos reported)."""
    return sum(int(t.get("tokens", 0)) for h in history for t in h.train.values())
