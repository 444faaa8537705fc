"""Run a federation: ``run`` (embedded or on the stack), ``demo``, ``summary``, ``config-json`` and
``make-demo-data``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import console, fail, load_config_file
from ops.prefect_server import prefect_api
from ops.state import Stack
from silotune.demo import make_demo_silos
from silotune.errors import SilotuneError
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
            check_local_paths(cfg)
    except SilotuneError as exc:
        fail(str(exc))
    if cfg.orchestration.mode == "workpools":
        out = _run_on_stack(cfg, state_dir)
    else:
        from flows.federated_training import federated_training  # Prefect and torch (about 4 s)

        out = federated_training(cfg)
    console.print(history_table(out["history"]))
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
    console.print(history_table(state.history, state.initial_eval))


def demo(
    out: Annotated[Path, typer.Option(help="Working folder of the demo.")] = Path("silotune-demo"),
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    local_steps: Annotated[int, typer.Option(help="Local steps per silo per round.")] = 8,
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
