"""Run a federation: ``run`` (embedded or on the stack), ``demo``, ``summary``, ``config-json`` and
``make-demo-data``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import console, fail, load_config_file, print_table, stop_on_signals
from ops.prefect_server import prefect_api
from ops.state import Stack
from silotune.demo import make_demo_silos
from silotune.errors import SilotuneError
from silotune.modeling import BUILTIN_MODELS, resolve_model_path
from silotune.report import history_table


def run(
    config: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    rounds: Annotated[int | None, typer.Option(help="Override the number of rounds.")] = None,
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Stack state folder (workpools mode, no $PREFECT_API_URL).")
    ] = Path(".silotune/stack"),
) -> None:
    """Run (or resume) a federation from a YAML config.

    ``orchestration.mode: embedded`` (default) runs it in this process; ``workpools`` submits it to the
    ``federated-training`` deployment of the stack at $PREFECT_API_URL (or the one in --state-dir) and
    waits: silos run on their own pools.
    """
    from silotune.config import check_local_paths, load_config, parse_config  # imports torch (about 2 s)

    try:
        cfg = load_config(config)
        if rounds is not None:
            cfg = parse_config({**cfg.model_dump(mode="json"), "rounds": rounds})
        if cfg.orchestration.mode == "embedded":
            # Everything this machine must hold, checked before a Prefect server or a model starts.
            check_local_paths(cfg)
            if cfg.model.name_or_path not in BUILTIN_MODELS:
                resolve_model_path(cfg.model.name_or_path)  # a local folder: only checked, nothing loaded
    except SilotuneError as exc:
        fail(str(exc))
    if cfg.orchestration.mode == "workpools":
        out = _run_on_stack(cfg, state_dir)
    else:
        from flows.federated_training import federated_training  # Prefect and torch (about 4 s)

        try:
            with stop_on_signals(f"federation {cfg.federation_id}"):
                out = federated_training(cfg)
        except SilotuneError as exc:  # bad input found during the run: Prefect has logged it; one line here
            fail(str(exc))
    print_table(history_table(out["history"], out.get("initial_eval")))
    console.print(f"final adapter (PEFT format): [bold]{out['adapter']}[/]")
    console.print(f"MLflow run {out['tracking_run_id']} at {out['tracking_uri']}")


def _run_on_stack(cfg: Any, state_dir: Path) -> dict[str, Any]:
    ctx: Any = contextlib.nullcontext()
    if not os.environ.get("PREFECT_API_URL"):
        st = Stack.load(state_dir)
        if not st.ports:
            fail(f"orchestration.mode is 'workpools' but no $PREFECT_API_URL and no stack in {state_dir}")
        ctx = prefect_api(st)
    with ctx:
        from prefect.deployments import run_deployment  # Prefect (about 1 s), after offline()

        fr = run_deployment(
            "federated-training/federated-training", parameters={"config": cfg}, timeout=None, poll_interval=2
        )
        console.print(f"flow run {fr.name} ({fr.id}): {fr.state.name if fr.state else '?'}")
        if fr.state is None or not fr.state.is_completed():
            fail(f"federation {cfg.federation_id} did not complete: {fr.state.message if fr.state else ''}")
        return fr.state.result()


def config_json(config: Annotated[Path, typer.Argument(help="Federation config (YAML).")]) -> None:
    """Print a validated config as JSON (e.g. for `prefect deployment run ... --param config=...`)."""
    print(load_config_file(config).model_dump_json())


def make_demo_data(
    out: Annotated[Path, typer.Argument(help="Folder for the demo silos.")] = Path("silotune-demo/data"),
    seed: int = 0,
    scale: Annotated[
        float, typer.Option(help="Multiply the training sets (10: at least 1,000 records per silo).")
    ] = 1.0,
) -> None:
    """Write the deterministic, non-IID demo silos (train, validation and holdout each, union holdouts,
    a DPO silo)."""
    paths = make_demo_silos(out, seed=seed, scale=scale, preferences=True)
    for silo, p in paths.items():
        console.print(f"{silo}: " + "  ".join(str(v) for v in p.values()))
    console.print(f"union holdout: {out / 'union_eval.jsonl'}")


def summary(
    federation_id: str,
    store: Annotated[Path, typer.Option(help="Root of the local object store.")] = Path(".silotune/store"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw state as JSON.")] = False,
) -> None:
    """Show a federation's rounds and metrics from its stored state."""
    from silotune.federation.commit import load_state  # imports torch (about 2.5 s)
    from silotune.store import LocalStore  # imports torch (about 2.5 s)

    try:
        state = load_state(LocalStore(store), federation_id)
    except SilotuneError as exc:
        fail(str(exc))
    if state is None:
        fail(f"no federation {federation_id!r} in {store}")
    assert state is not None
    if as_json:
        console.print_json(state.model_dump_json())
        return
    console.print(
        f"federation [bold]{federation_id}[/]: {state.completed_rounds} round(s) completed; "
        f"global adapter {state.global_ref.key} (sha256 {state.global_ref.sha256[:12]}…); "
        f"MLflow run {state.tracking_run_id}"
    )
    print_table(history_table(state.history, state.initial_eval))


def demo(
    out: Annotated[Path, typer.Option(help="Working folder of the demo.")] = Path("silotune-demo"),
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    local_steps: Annotated[int, typer.Option(help="Local steps per silo per round.")] = 6,
    model: Annotated[
        str, typer.Option(help="Base model (built-in name or local folder).")
    ] = "smollm2-135m-instruct",
    baselines: Annotated[
        bool, typer.Option(help="Also train the centralized and local-only adapters to compare.")
    ] = True,
    scale: Annotated[
        float, typer.Option(help="Demo data scale (10: at least 1,000 training records per silo).")
    ] = 10.0,
) -> None:
    """A real federation of SmolLM2-135M-Instruct over three demo silos, compared with centralized and
    local-only training."""
    from flows.demo import run_demo  # torch and transformers (about 3 s)

    with stop_on_signals("the demo"):
        ok = run_demo(
            out=out,
            rounds=rounds,
            local_steps=local_steps,
            model=model,
            baselines=baselines,
            console=console,
            scale=scale,
        )
    if not ok:
        raise typer.Exit(1)


def export(
    config: Annotated[Path, typer.Argument(help="Config (YAML) of the federation to export.")],
    fmt: Annotated[
        str, typer.Option("--format", help="peft (adapter folder), merged (HF folder) or gguf.")
    ] = "peft",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("silotune-export"),
    gguf_type: Annotated[str, typer.Option(help="GGUF tensor type: f16 or q8_0.")] = "f16",
    tokenizer_gguf: Annotated[
        Path | None,
        typer.Option(help="GGUF file of the base model, for its tokenizer (default: the built-in model's)."),
    ] = None,
    register: Annotated[
        bool, typer.Option(help="merged: also log it to the federation's MLflow run and register a version.")
    ] = False,
) -> None:
    """Export the federation's final global model: PEFT adapter, merged HF model, or GGUF for llama.cpp."""
    from silotune.export import export_federation, register_merged  # torch, transformers (about 3 s)
    from silotune.store import open_store
    from silotune.tracking import open_tracker

    cfg = load_config_file(config)
    if register and fmt != "merged":
        fail("--register applies to --format merged")
    try:
        with stop_on_signals("the export"):
            store = open_store(cfg.store)
            path = export_federation(
                cfg,
                store,
                out,
                fmt=fmt,
                tensor_type=gguf_type,
                tokenizer_gguf=tokenizer_gguf,
            )
            version = register_merged(cfg, store, path, open_tracker(cfg.tracking)) if register else None
    except SilotuneError as exc:
        fail(str(exc))
    console.print(f"{fmt} export of {cfg.federation_id}: [bold]{path}[/]")
    if version is not None:
        name = cfg.tracking.registered_model or f"silotune-{cfg.federation_id}"
        console.print(f"registered as version {version} of {name}-merged")


def personalize(
    config: Annotated[Path, typer.Argument(help="Config (YAML) of the finished federation.")],
    silo: Annotated[str, typer.Option(help="The silo (this machine holds its data and private folder).")],
    steps: Annotated[int | None, typer.Option(help="Local steps (default: train.local_steps).")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Default: train.learning_rate.")] = None,
    validation: Annotated[
        Path | None,
        typer.Option(
            help="Validation file that decides whether the personalised adapter is kept "
            "(default: val.jsonl beside the silo's training file)."
        ),
    ] = None,
) -> None:
    """Fine-tune the final global adapter on this silo's own data, kept in its private folder only,
    and compare global and personalised on the silo's holdout. Nothing is uploaded."""
    from silotune.adapters import AdapterModel  # torch, transformers, peft (about 4 s)
    from silotune.personalize import compare_on_holdout, personalize_silo
    from silotune.store import open_store

    cfg = load_config_file(config)
    try:
        with stop_on_signals("personalisation"):
            store = open_store(cfg.store)
            adapter = AdapterModel.create(cfg.model, cfg.lora_for(silo), seed=0, method=cfg.method_for(silo))
            rec = personalize_silo(
                cfg,
                silo,
                store,
                adapter,
                steps=steps,
                learning_rate=learning_rate,
                validation=validation,
                progress=True,
            )
            metrics = compare_on_holdout(cfg, silo, store, adapter) if cfg.silo(silo).eval_path else None
    except SilotuneError as exc:
        fail(str(exc))
    v = rec.validation_loss
    if rec.kept == "global":
        console.print(
            f"personalisation of {silo} did not lower its validation loss ({v['global']:.4f} → "
            f"{v['personalized']:.4f} on {rec.validation_path}): [bold]{rec.folder}[/] holds the global"
        )
    else:
        console.print(
            f"personalised adapter of {silo} ({rec.steps} steps): [bold]{rec.folder}[/] (private, "
            "not uploaded)" + (f"; validation loss {v['global']:.4f} → {v['personalized']:.4f}" if v else "")
        )
    if metrics:
        for name, m in metrics.items():
            console.print(f"  {name}: holdout loss {m['loss']:.4f}, exact match {m['exact_match']:.3f}")
