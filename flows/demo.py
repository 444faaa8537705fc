"""The demo: a real federation of SmolLM2-135M-Instruct over three non-IID demo silos.

It runs the same ``federated-training`` flow a user runs, then trains each silo
alone for the same number of rounds and steps (the local-only baselines, through
the same flow with one silo), and compares base, local-only and federated
adapters on every silo's holdout and on the union of the holdouts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from flows.federated_training import federated_training
from silotune.baselines import compare_adapters
from silotune.config import FederationConfig, dump_config, parse_config
from silotune.demo import DEMO_SILOS, make_demo_silos
from silotune.evaluation import EvalResult, weighted_mean
from silotune.report import comparison_table, history_table, plot_history
from silotune.store import FederationLayout, LocalStore, get_tensors
from tasks.runtime import adapter_for, tracker_for


def demo_config(out: Path, *, rounds: int, local_steps: int, model: str) -> FederationConfig:
    data = out / "data"
    return parse_config(
        {
            "federation_id": f"demo-r{rounds}-s{local_steps}",
            "rounds": rounds,
            "seed": 0,
            "model": {"name_or_path": model, "max_seq_len": 256},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "train": {"local_steps": local_steps, "batch_size": 8, "learning_rate": 2e-3},
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


def _local_only(cfg: FederationConfig, silo: str) -> FederationConfig:
    data = cfg.model_dump(mode="json")
    data.update(
        federation_id=f"{cfg.federation_id}-local-{silo}",
        silos=[s for s in data["silos"] if s["name"] == silo],
        aggregation={**data["aggregation"], "min_silos": 1},
        tags={**cfg.tags, "silotune.kind": "local-only-baseline", "silotune.baseline_of": cfg.federation_id},
    )
    return parse_config(data)


def run_demo(
    *, out: Path, rounds: int, local_steps: int, model: str, baselines: bool, console: Console
) -> bool:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    make_demo_silos(out / "data", seed=0)
    cfg = demo_config(out, rounds=rounds, local_steps=local_steps, model=model)
    dump_config(cfg, out / "federation.yaml")
    console.rule(
        f"[bold]federation {cfg.federation_id}: {len(cfg.silos)} silos × {rounds} rounds"
        f" × {local_steps} steps"
    )
    fed = federated_training(cfg)
    console.print(history_table(fed["history"]))

    store = LocalStore(cfg.store.root)
    states: dict[str, Any] = {"federated": get_tensors(store, fed["global_key"])}
    if baselines:
        for silo in cfg.silos:
            bcfg = _local_only(cfg, silo.name)
            console.rule(f"[bold]local-only baseline: {silo.name} alone, same rounds and steps")
            res = federated_training(bcfg)
            states[f"local-only {silo.name}"] = get_tensors(store, res["global_key"])
    base_state = get_tensors(store, FederationLayout(cfg.federation_id).global_adapter(0))

    console.rule("[bold]comparing adapters on every holdout")
    holdouts = {s.name: s.eval_path for s in cfg.silos if s.eval_path}
    adapter = adapter_for(cfg)
    # Base and federated adapters were already scored on every silo holdout inside the flow (round 0 and
    # the last round); only the local-only adapters still need scoring on the other silos' holdouts.
    initial_eval = fed["initial_eval"]
    scored = {
        "base model": initial_eval.eval if initial_eval is not None else {},
        "federated": fed["history"][-1].eval,
    }
    to_score = {n: st for n, st in states.items() if set(scored.get(n, {})) != set(holdouts)}
    if set(scored["base model"]) != set(holdouts):
        to_score["base model"] = base_state
    comp = compare_adapters(
        adapter, to_score, holdouts, max_seq_len=cfg.model.max_seq_len, batch_size=cfg.evaluation.batch_size
    )
    for name, per in scored.items():
        if name not in to_score:
            comp.results[name] = {h: EvalResult(**per[h].as_dict()) for h in holdouts}
    order = ["base model", "federated", *[n for n in states if n.startswith("local-only")]]
    comp.results.update({n: comp.results.pop(n) for n in order})
    # The union holdout is the disjoint union of the silo holdouts: its metrics are the size-weighted means.
    for name in comp.results:
        comp.results[name]["union"] = weighted_mean([comp.results[name][h] for h in holdouts])

    console.print(comparison_table(comp.results, [*holdouts, "union"]))

    beats_base = {h: comp.beats("federated", "base model", h) for h in holdouts}
    beats_local = {n: comp.beats("federated", n, "union") for n in comp.results if n.startswith("local-only")}
    ok = all(beats_base.values()) and all(beats_local.values())

    report: dict[str, Any] = {
        "federation_id": cfg.federation_id,
        "results": {a: {h: r.as_dict() for h, r in v.items()} for a, v in comp.results.items()},
        "federated_beats_base_on_every_silo_holdout": beats_base,
        "federated_beats_local_only_on_union": beats_local,
        "seconds": time.perf_counter() - t0,
    }
    (out / "comparison.json").write_text(json.dumps(report, indent=2))
    (out / "federation_history.png").write_bytes(plot_history(fed["history"], None, title=cfg.federation_id))
    tracker = tracker_for(cfg)
    tracker.log_file(fed["tracking_run_id"], out / "comparison.json", "comparison")
    _log_comparison_metrics(tracker, fed["tracking_run_id"], comp.results)

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
    return ok


def _log_comparison_metrics(
    tracker: Any, run_id: str | None, results: dict[str, dict[str, EvalResult]]
) -> None:
    client = getattr(tracker, "client", None)
    if client is None or run_id is None:
        return
    for adapter_name, per in results.items():
        slug = adapter_name.replace(" ", "_")
        for h, r in per.items():
            client.log_metric(run_id, f"compare.{slug}.{h}.loss", r.loss)
            client.log_metric(run_id, f"compare.{slug}.{h}.exact_match", r.exact_match)
