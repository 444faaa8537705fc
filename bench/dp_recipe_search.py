"""Which DP-SGD recipe keeps the most of the non-private gain, measured on validation data only.

Run: ``PYTHONPATH=. nice .venv/bin/python bench/dp_recipe_search.py CONFIG --epsilon 8
[--candidate "batch=32 steps=3 lr=8e-3"] ... [--out results/dp-recipe-search.jsonl]``

CONFIG is the privacy–utility report's federation config (the non-private recipe and the silos). Every
candidate trains the federation in this one process: each round, every silo runs DP-SGD from the global
adapter (Poisson sampling at ``batch / records``, σ from the RDP accountant for the target ε over all of
the run's steps, the per-example clip C at the median base-model gradient norm on validation records,
as :func:`silotune.privacy_utility.choose_recipe` sets it), and the global moves by the
example-weighted mean of the silos' deltas, as FedAvg does. After each round the global is scored on the
union of the silos' ``val.jsonl`` files (teacher-forced loss and exact match): never on the holdouts the
report scores, so the choice does not tune to the test set.

The baseline, in the same run, is the config's own non-private recipe on the same validation records.
Each candidate prints the share of the non-private validation-loss gain over the base model it keeps,
so the ratio holds on any machine. A candidate is a space-separated list of ``key=value``:
``batch`` (expected Poisson batch), ``steps`` (local steps per round), ``lr``, ``r`` and ``targets``
(``v_proj,q_proj``: the DP cells' LoRA shape), ``ffa`` (1: FFA-LoRA, A frozen), ``server_lr`` (the
global moves by ``server_lr`` × the weighted mean delta: a plain SGD server step,
``aggregation.server_options.lr``; default the config's) and ``dp`` (0: a non-private candidate,
e.g. ``--candidate "dp=0 ffa=0 server_lr=2"`` to choose a server learning rate for plain LoRA).

Cost: about 0.5 s per sampled training record on this 2-core CPU (SmolLM2-135M, 65–100 tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from silotune.config import FederationConfig, load_config, parse_config
from silotune.data import Example, encode_dataset, read_records
from silotune.evaluation import evaluate
from silotune.privacy.accountant import compute_noise_multiplier
from silotune.privacy_utility import per_example_grad_norms
from silotune.protection.none import exchanged_keys
from silotune.training import DPSGD, train_local
from tasks.runtime import adapter_for


def candidate_config(base: FederationConfig, spec: dict[str, str], *, dp: bool) -> FederationConfig:
    data = base.model_dump(mode="json")
    train = dict(data["train"])
    if "batch" in spec:
        train["batch_size"] = int(spec["batch"])
    if "steps" in spec:
        train["local_steps"] = int(spec["steps"])
    if "lr" in spec:
        train["learning_rate"] = float(spec["lr"])
    if dp:  # Opacus takes one row per example through the model's own forward
        train.update(packing=False, response_logits_only=False)
    lora = dict(data["lora"])
    if "r" in spec:
        lora.update(r=int(spec["r"]), alpha=2.0 * int(spec["r"]))
    if "targets" in spec:
        lora["target_modules"] = spec["targets"].split(",")
    ffa = spec.get("ffa")
    security = {
        **data["security"],
        "ffa_lora": bool(int(ffa)) if ffa is not None else data["security"]["ffa_lora"],
    }
    aggregation = dict(data["aggregation"])
    if "server_lr" in spec:
        aggregation["server_options"] = {**aggregation["server_options"], "lr": float(spec["server_lr"])}
    data.update(train=train, lora=lora, security=security, aggregation=aggregation)
    return parse_config(data)


def server_lr(config: FederationConfig) -> float:
    """The plain SGD server step this search applies; other server optimizers are not modelled."""
    agg = config.aggregation
    if agg.server_optimizer != "sgd" or set(agg.server_options) - {"lr"}:
        raise SystemExit(
            f"aggregation: server optimizer {agg.server_optimizer!r} with options {agg.server_options} "
            "is not modelled by this search (only plain SGD with a learning rate)"
        )
    return float(agg.server_options.get("lr", 1.0))


def run(
    config: FederationConfig,
    val: list[Any],
    epsilon: float | None,
    delta: float,
    tag: str,
    *,
    clip_examples: list[Any],
) -> dict[str, Any]:
    adapter = adapter_for(config)
    encoded_val: list[Example] = encode_dataset(val, adapter.tokenizer, config.model.max_seq_len)
    state = adapter.initial_state(config.seed)
    keys = exchanged_keys(config, state)
    frozen = sorted(set(state) - set(keys))
    silos = [
        (s.name, encode_dataset(read_records(s.train_path), adapter.tokenizer, config.model.max_seq_len))
        for s in config.silos
    ]
    clip = sigma = None
    if epsilon is not None:
        clip_ex = encode_dataset(clip_examples, adapter.tokenizer, config.model.max_seq_len)
        clip = statistics.median(per_example_grad_norms(adapter, clip_ex, state))
        sigma = {
            name: compute_noise_multiplier(
                target_epsilon=epsilon,
                delta=delta,
                sample_rate=config.train.batch_size / len(ex),
                steps=config.rounds * config.train.local_steps,
            )
            for name, ex in silos
        }
    eta = server_lr(config)
    t0 = time.perf_counter()
    curve = []
    for r in range(config.rounds):
        deltas = []
        for i, (name, ex) in enumerate(silos):
            dp = None
            if epsilon is not None:
                assert clip is not None and sigma is not None
                dp = DPSGD(
                    noise_multiplier=sigma[name],
                    max_grad_norm=clip,
                    sample_rate=config.train.batch_size / len(ex),
                    noise_seed=1000 * r + i,
                )
            d, _ = train_local(
                adapter,
                state,
                ex,
                config.train,
                seed=10 * r + i,
                progress=False,
                dp=dp,
                frozen=frozen,
                exchanged=keys,
            )
            deltas.append((len(ex), d))
        total = sum(n for n, _ in deltas)
        state = {
            k: v + eta * sum(n / total * d[k] for n, d in deltas) if k in keys else v
            for k, v in state.items()
        }
        ev = evaluate(adapter, encoded_val, state=state, batch_size=20)
        curve.append({"round": r + 1, "val_loss": round(ev.loss, 4), "val_em": round(ev.exact_match, 4)})
        print(json.dumps({"tag": tag, **curve[-1], "s": round(time.perf_counter() - t0)}), flush=True)
    trainable = sum(state[k].numel() for k in keys)
    return {
        "tag": tag,
        "epsilon": epsilon,
        "server_lr": eta,
        "clip": clip,
        "sigma": sigma,
        "trainable": trainable,
        "curve": curve,
        "val_loss": curve[-1]["val_loss"],
        "val_em": curve[-1]["val_em"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=None, help="default: 1 / (10 × the smallest silo)")
    ap.add_argument("--candidate", action="append", default=[], help='e.g. "batch=32 steps=3 lr=8e-3"')
    ap.add_argument(
        "--validation-examples", type=int, default=16, help="records behind the clip norm (the report's)"
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per run")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = load_config(a.config)
    per_silo = [read_records(Path(s.train_path).with_name("val.jsonl")) for s in base.silos]
    val = [c for records in per_silo for c in records]
    # The clip norm's records, round-robin over the silos, as choose_recipe takes them.
    clip_examples = [c for group in zip(*per_silo, strict=False) for c in group][: a.validation_examples]
    delta = a.delta or 1.0 / (10 * min(len(read_records(s.train_path)) for s in base.silos))
    adapter = adapter_for(base)
    base_eval = evaluate(
        adapter,
        encode_dataset(val, adapter.tokenizer, base.model.max_seq_len),
        state=adapter.initial_state(base.seed),
        batch_size=20,
    )
    results = []
    if not a.no_baseline:
        results.append(run(base, val, None, delta, "non-private", clip_examples=clip_examples))
    for text in a.candidate:
        spec = dict(kv.split("=", 1) for kv in text.split())
        private = spec.pop("dp", "1") != "0"
        results.append(
            run(
                candidate_config(base, spec, dp=private),
                val,
                a.epsilon if private else None,
                delta,
                text,
                clip_examples=clip_examples,
            )
        )
    nodp = next((r for r in results if r["epsilon"] is None), None)  # the first non-private run
    print(f"base model: validation loss {base_eval.loss:.3f}, exact match {base_eval.exact_match:.3f}")
    for r in results:
        kept = ""
        if nodp is not None and r is not nodp:
            gain = base_eval.loss - nodp["val_loss"]
            kept = f", keeps {(base_eval.loss - r['val_loss']) / gain:.0%} of the non-private loss gain"
        print(
            f"{r['tag']}: validation loss {r['val_loss']:.3f}, exact match {r['val_em']:.3f}{kept} "
            f"({r['seconds']:.0f} s)"
        )
        if a.out is not None:
            with a.out.open("a") as f:
                f.write(json.dumps({**r, "base_val_loss": base_eval.loss, "delta": delta}) + "\n")


if __name__ == "__main__":
    main()
