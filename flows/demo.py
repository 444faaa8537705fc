"""The demo: a real federation of SmolLM2-135M-Instruct over three non-IID demo silos.

It runs the same ``federated-training`` flow a user runs, then the baselines through the same flow
(:mod:`silotune.baselines`): the centralized one (every silo's data pooled, the same total steps and
examples) and each silo alone (local-only, the same rounds and steps). It compares the base model,
the federated, centralized and local-only adapters on every silo's holdout and on their union,
teacher-forced and by free-running generation (ROUGE-L, chrF), and reports federated / centralized.

``compare_federation`` is the part any federation config can use (``silotune compare``); the demo adds
its data, its config and the closing lines. More adapters join the comparison through ``extra``: a
name and a function of (config, federation result) returning the adapter's exchanged tensors.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from flows.federated_training import federated_training
from silotune.baselines import (
    centralized_config,
    compare_adapters,
    local_only_config,
    pool_training_data,
    ratio,
    tokens_trained,
)
from silotune.config import FederationConfig, dump_config, parse_config
from silotune.demo import DEMO_SILOS, REALISTIC_SCALE, make_demo_silos
from silotune.evaluation import EvalResult, weighted_mean
from silotune.privacy_utility import dp_cost_line
from silotune.report import comparison_table, history_table, plot_history
from silotune.store import FederationLayout, get_tensors, open_store
from tasks import runtime
from tasks.personalize import personalize
from tasks.runtime import adapter_for
from tasks.utility import publish_comparison

# Adapters scored by free-running generation too (a decode loop per holdout example; the base model,
# which does not answer in the tasks' format, would run every one to the limit).
GENERATED = ("federated", "centralized")
ExtraAdapter = Callable[[FederationConfig, Mapping[str, Any]], Mapping[str, Any]]


def demo_config(out: Path, *, rounds: int, local_steps: int, model: str) -> FederationConfig:
    data = out / "data"
    return parse_config(
        {
            "federation_id": f"demo-r{rounds}-s{local_steps}",
            "rounds": rounds,
            "seed": 0,
            "model": {"name_or_path": model, "max_seq_len": 256},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            # The LM head only where a label is: no number changes (tests/unit/test_speed_levers.py), and
            # bench/train_throughput.py measured 1.17x the bare loop's tokens/s on these records. Packing
            # is left off: on them (similar lengths, little padding) it measured 0.92x with it on.
            "train": {
                "local_steps": local_steps,
                "batch_size": 8,
                "learning_rate": 4e-3,
                "response_logits_only": True,
            },
            "silos": [
                {
                    "name": s.name,
                    "train_path": str((data / s.name / "train.jsonl").resolve()),
                    "eval_path": str((data / s.name / "eval.jsonl").resolve()),
                }
                for s in DEMO_SILOS
            ],
            "aggregation": {"name": "fedavg", "min_silos": 2},
            "evaluation": {"batch_size": 20},
            "store": {"root": str((out / "store").resolve())},
            "tracking": {
                "uri": f"sqlite:///{(out / 'mlflow.db').resolve()}",
                "artifact_root": str((out / "mlartifacts").resolve()),
                "experiment": "silotune-demo",
            },
            "tags": {"silotune.kind": "demo"},
        }
    )


def compare_federation(
    cfg: FederationConfig,
    out: Path,
    *,
    console: Console,
    baselines: bool = True,
    extra: Mapping[str, ExtraAdapter] | None = None,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """Run (or resume) the federation, its centralized and local-only baselines, and compare them all
    on every silo's holdout and their union. Writes ``comparison.json`` under ``out``, logs to the
    federation's MLflow run and a Prefect artifact; returns the comparison record."""
    out.mkdir(parents=True, exist_ok=True)
    reuse = f"compare-{cfg.federation_id}"  # base-model evaluations and identical training run once
    runtime.work_memo(reuse)
    try:
        console.rule(f"[bold]federation {cfg.federation_id}: {len(cfg.silos)} silos × {cfg.rounds} rounds")
        fed = federated_training(cfg, reuse)
        console.print(history_table(fed["history"], fed["initial_eval"]))
        store = open_store(cfg.store)
        states: dict[str, Any] = {"federated": get_tensors(store, fed["global_key"])}
        tokens = {"federated": tokens_trained(fed["history"])}
        if baselines:
            pooled = pool_training_data(cfg, out / "pooled" / "train.jsonl")
            runs = {"centralized": centralized_config(cfg, pooled)}
            runs.update({f"local-only {s.name}": local_only_config(cfg, s.name) for s in cfg.silos})
            for name, bcfg in runs.items():
                console.rule(f"[bold]{name} baseline ({bcfg.train.local_steps} steps per round)")
                res = federated_training(bcfg, reuse)
                states[name] = get_tensors(open_store(bcfg.store), res["global_key"])
                tokens[name] = tokens_trained(res["history"])
        for name, make in (extra or {}).items():
            states[name] = make(cfg, fed)
        base_state = get_tensors(store, FederationLayout(cfg.federation_id).global_adapter(0))
    finally:
        runtime.drop_work_memo(reuse)

    console.rule("[bold]comparing adapters on every holdout")
    holdouts = {s.name: s.eval_path for s in cfg.silos if s.eval_path}
    # The flow already scored the base model (round 0) and the federated adapter (its last round) on every
    # holdout, teacher-forced: those are reused.
    initial, last = fed["initial_eval"], fed["history"][-1]
    scored = {
        name: {h: EvalResult(**m.as_dict()) for h, m in ev.eval.items()}
        for name, ev in (("base model", initial), ("federated", last))
        if ev is not None
    }
    comp = compare_adapters(
        adapter_for(cfg),
        {"base model": base_state, **states},
        holdouts,
        max_seq_len=cfg.model.max_seq_len,
        batch_size=cfg.evaluation.batch_size,
        generate=GENERATED,
        max_new_tokens=max_new_tokens,
        scored=scored,
    )
    # The union holdout is the disjoint union of the silo holdouts: its metrics are the size-weighted means.
    for name in comp.results:
        comp.results[name]["union"] = weighted_mean([comp.results[name][h] for h in holdouts])
    console.print(comparison_table(comp.results, [*holdouts, "union"]))

    union = {n: r["union"] for n, r in comp.results.items()}
    ratios = {}
    if "centralized" in union:
        f, c = union["federated"], union["centralized"]
        ratios = {
            "exact_match": ratio(f.exact_match, c.exact_match),
            "gen_exact_match": ratio(f.gen_exact_match, c.gen_exact_match),
            "rouge_l": ratio(f.rouge_l, c.rouge_l),
            "chrf": ratio(f.chrf, c.chrf),
            "tokens": ratio(tokens["federated"], tokens["centralized"]),
        }
    beats_base = {h: comp.beats("federated", "base model", h) for h in holdouts}
    beats_local = {n: comp.beats("federated", n, "union") for n in comp.results if n.startswith("local-only")}
    record: dict[str, Any] = {
        "federation_id": cfg.federation_id,
        "results": {a: {h: r.as_dict() for h, r in v.items()} for a, v in comp.results.items()},
        "tokens_trained": tokens,
        "federated_over_centralized": ratios,
        "federated_beats_base_on_every_silo_holdout": beats_base,
        "federated_beats_local_only_on_union": beats_local,
    }
    (out / "comparison.json").write_text(json.dumps(record, indent=2))
    plot = plot_history(fed["history"], fed["initial_eval"], title=cfg.federation_id)
    (out / "federation_history.png").write_bytes(plot)
    publish_comparison(cfg, fed["tracking_run_id"], str(out / "comparison.json"))
    if ratios:
        console.print(
            "federated / centralized on the union holdout: "
            + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items() if v is not None)
        )
    return {**record, "fed": fed, "comparison": comp}


def _personal_line(name: str, m: dict[str, Any]) -> str:
    """One line per silo: what its validation file decided, then how the kept adapter does on the holdout
    (the holdout never takes part in the decision)."""
    v = m["validation_loss"]
    if m["kept"] == "global":
        return (
            f"{name} keeps the global: personalisation raised its validation loss "
            f"{v['global']:.3f} → {v['personalized']:.3f}"
        )
    line = f"{name} keeps its personalised adapter (private folder)"
    if v:
        line += f", validation loss {v['global']:.3f} → {v['personalized']:.3f}"
    if m["holdout"]:
        g, p = m["holdout"]["global"], m["holdout"]["personalized"]
        line += (
            f"; on its holdout {'✔' if p['loss'] < g['loss'] else '✘'} loss {g['loss']:.3f} → "
            f"{p['loss']:.3f}, exact match {g['exact_match']:.2f} → {p['exact_match']:.2f}"
        )
    return line


def run_demo(
    *,
    out: Path,
    rounds: int,
    local_steps: int,
    model: str,
    baselines: bool,
    console: Console,
    scale: float = REALISTIC_SCALE,
    extra: Mapping[str, ExtraAdapter] | None = None,
    personalize_steps: int | None = None,
) -> bool:
    """The demo; ``personalize_steps``: each silo's private fine-tune of the final global (default: half
    the local steps; 0: none), reported against the global on the silo's own holdout."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    make_demo_silos(out / "data", seed=0, scale=scale)
    cfg = demo_config(out, rounds=rounds, local_steps=local_steps, model=model)
    dump_config(cfg, out / "federation.yaml")
    # 48 new tokens cover the longest demo answer (a lab sentence, ~35 tokens) through end of turn.
    res = compare_federation(cfg, out, console=console, baselines=baselines, extra=extra, max_new_tokens=48)
    fed, comp = res["fed"], res["comparison"]
    beats_base, beats_local = (
        res["federated_beats_base_on_every_silo_holdout"],
        res["federated_beats_local_only_on_union"],
    )
    ok = all(beats_base.values()) and all(beats_local.values())

    steps = max(1, local_steps // 2) if personalize_steps is None else personalize_steps
    personal: dict[str, Any] = {}
    if steps:
        console.rule(f"[bold]personalised adapters ({steps} private steps per silo from the final global)")
        for s in cfg.silos:
            personal[s.name] = personalize(cfg, s.name, steps=steps)
        (out / "personalized.json").write_text(json.dumps(personal, indent=2))

    console.rule("[bold]what improved")
    for h, good in beats_base.items():
        b, f = comp.results["base model"][h], comp.results["federated"][h]
        console.print(
            f"{'✔' if good else '✘'} {h} holdout: loss {b.loss:.3f} → {f.loss:.3f}, "
            f"exact match {b.exact_match:.2f} → {f.exact_match:.2f} (base → federated)"
        )
    fu = comp.results["federated"]["union"]
    for n, good in beats_local.items():
        lu = comp.results[n]["union"]
        console.print(
            f"{'✔' if good else '✘'} union holdout: federated {fu.loss:.3f} / {fu.exact_match:.2f} vs "
            f"{n} {lu.loss:.3f} / {lu.exact_match:.2f}"
        )
    if "centralized" in comp.results:
        cu: EvalResult = comp.results["centralized"]["union"]
        r = res["federated_over_centralized"]
        share = ", ".join(
            f"{100 * r[k]:.0f}% of its {label}"
            for k, label in (("exact_match", "exact match"), ("rouge_l", "ROUGE-L"))
            if r.get(k) is not None
        )
        console.print(
            f"centralized (all data pooled, same steps): union {cu.loss:.3f} / {cu.exact_match:.2f}, "
            f"ROUGE-L {cu.rouge_l or 0:.3f}; "
            + (f"federated reaches {share}" if share else "no ratio (the centralized scores are 0)")
        )
    for name, m in personal.items():
        console.print(_personal_line(name, m))
    console.rule("[bold]where to look")
    console.print(f"final adapter (PEFT format): {fed['adapter']}")
    console.print(
        f"MLflow run {fed['tracking_run_id']}: mlflow ui --backend-store-uri {cfg.tracking.uri} --port 5000"
    )
    console.print(f"comparison: {out / 'comparison.json'}  plot: {out / 'federation_history.png'}")
    console.print(f"config to re-run or extend: silotune run {out / 'federation.yaml'} --rounds {rounds + 2}")
    console.print(
        f"total {time.perf_counter() - t0:.0f} s; "
        + (
            "[bold green]the federated adapter beat the base model and every local-only adapter"
            if ok
            else "[bold red]the federated adapter did NOT beat every baseline (see above)"
        )
    )
    console.print(dp_cost_line(model, out))
    return ok
