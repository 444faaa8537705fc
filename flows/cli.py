"""The ``silotune`` command line. It starts flows, so it sits beside them, above the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table


def _offline() -> None:
    """Nothing leaves the machine: no hub downloads, no telemetry (set before Prefect is imported)."""
    import os

    from silotune.modeling import OFFLINE_ENV

    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


app = typer.Typer(
    callback=_offline,
    add_completion=False,
    no_args_is_help=True,
    help="Federated post-training of open-source language models across data silos.",
)
console = Console()


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


def _print_history(history: list[dict[str, Any]], initial: dict[str, Any] | None) -> None:
    table = Table(title="Rounds (holdout metrics of the global adapter, evaluated at each silo)")
    silos = sorted({s for h in history for s in h.get("eval", {})})
    table.add_column("round", justify="right")
    for s in silos:
        table.add_column(f"{s} loss / EM", justify="right")
    table.add_column("weighted loss / EM", justify="right", style="bold")
    table.add_column("silos in / out", justify="right")
    rows = ([{"round": 0, **initial, "included": [], "excluded": {}}] if initial else []) + history
    for h in rows:
        cells = [str(h["round"]) if h["round"] else "0 (initial)"]
        for s in silos:
            ev = h.get("eval", {}).get(s)
            cells.append(f"{ev['loss']:.3f} / {ev['exact_match']:.2f}" if ev else "-")
        g = h.get("global_eval") or {}
        cells.append(f"{g['loss']:.3f} / {g['exact_match']:.2f}" if g else "-")
        cells.append(f"{len(h.get('included', []))} / {len(h.get('excluded', {}))}" if h["round"] else "")
        table.add_row(*cells)
    console.print(table)


@app.command()
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
    from silotune.config import check_local_paths, load_config, parse_config
    from silotune.errors import SilotuneError

    try:
        cfg = load_config(config)
        if rounds is not None:
            cfg = parse_config({**cfg.model_dump(mode="json"), "rounds": rounds})
        if cfg.orchestration.mode == "embedded":
            check_local_paths(cfg)
    except SilotuneError as exc:
        _fail(str(exc))
    if cfg.orchestration.mode == "workpools":
        out = _run_on_stack(cfg, state_dir)
    else:
        from flows.federated_training import federated_training

        out = federated_training(cfg)
    _print_history(out["history"], None)
    console.print(f"final adapter (PEFT format): [bold]{out['adapter']}[/]")
    console.print(f"MLflow run {out['tracking_run_id']} at {out['tracking_uri']}")


def _run_on_stack(cfg: Any, state_dir: Path) -> dict[str, Any]:
    import contextlib
    import os

    from flows.stack import Stack, prefect_api

    ctx: Any = contextlib.nullcontext()
    if not os.environ.get("PREFECT_API_URL"):
        st = Stack.load(state_dir)
        if not st.ports:
            _fail(f"orchestration.mode is 'workpools' but no $PREFECT_API_URL and no stack in {state_dir}")
        ctx = prefect_api(st)
    with ctx:
        from prefect.deployments import run_deployment

        fr = run_deployment(
            "federated-training/federated-training", parameters={"config": cfg}, timeout=None, poll_interval=2
        )
        console.print(f"flow run {fr.name} ({fr.id}): {fr.state.name if fr.state else '?'}")
        if fr.state is None or not fr.state.is_completed():
            _fail(f"federation {cfg.federation_id} did not complete: {fr.state.message if fr.state else ''}")
        return fr.state.result()


@app.command("config-json")
def config_json(config: Annotated[Path, typer.Argument(help="Federation config (YAML).")]) -> None:
    """Print a validated config as JSON (e.g. for `prefect deployment run ... --param config=...`)."""
    from silotune.config import load_config
    from silotune.errors import SilotuneError

    try:
        print(load_config(config).model_dump_json())
    except SilotuneError as exc:
        _fail(str(exc))


@app.command("make-demo-data")
def make_demo_data(
    out: Annotated[Path, typer.Argument(help="Folder for the demo silos.")] = Path("silotune-demo/data"),
    seed: int = 0,
) -> None:
    """Write the deterministic, non-IID demo silos (train + holdout per silo, and a union holdout)."""
    from silotune.demo import make_demo_silos

    paths = make_demo_silos(out, seed=seed)
    for silo, p in paths.items():
        console.print(f"{silo}: {p['train']}  {p['eval']}")
    console.print(f"union holdout: {out / 'union_eval.jsonl'}")


@app.command()
def summary(
    federation_id: str,
    store: Annotated[Path, typer.Option(help="Root of the local object store.")] = Path(".silotune/store"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw state as JSON.")] = False,
) -> None:
    """Show a federation's rounds and metrics from its stored state."""
    from silotune.errors import SilotuneError
    from silotune.federation import load_state
    from silotune.store import LocalStore

    try:
        state = load_state(LocalStore(store), federation_id)
    except SilotuneError as exc:
        _fail(str(exc))
    if state is None:
        _fail(f"no federation {federation_id!r} in {store}")
    assert state is not None
    if as_json:
        console.print_json(state.model_dump_json())
        return
    console.print(
        f"federation [bold]{federation_id}[/]: {state.completed_rounds} round(s) completed; "
        f"global adapter {state.global_ref.key} (sha256 {state.global_ref.sha256[:12]}…); "
        f"MLflow run {state.tracking_run_id}"
    )
    _print_history(state.history, state.initial_eval)


@app.command()
def aggregators() -> None:
    """List the registered aggregators and server optimizers."""
    from silotune.aggregation import AGGREGATORS, SERVER_OPTIMIZERS

    console.print("aggregators: " + ", ".join(AGGREGATORS.names()))
    console.print("server optimizers: " + ", ".join(SERVER_OPTIMIZERS.names()))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working folder of the demo.")] = Path("silotune-demo"),
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    local_steps: Annotated[int, typer.Option(help="Local steps per silo per round.")] = 8,
    model: Annotated[
        str, typer.Option(help="Base model (built-in name or local folder).")
    ] = "smollm2-135m-instruct",
    baselines: Annotated[bool, typer.Option(help="Also train local-only adapters to compare.")] = True,
) -> None:
    """A real federation of SmolLM2-135M-Instruct over three demo silos, compared with local-only training."""
    from flows.demo import run_demo

    ok = run_demo(
        out=out, rounds=rounds, local_steps=local_steps, model=model, baselines=baselines, console=console
    )
    if not ok:
        raise typer.Exit(1)


stack_app = typer.Typer(
    no_args_is_help=True, help="The real stack on loopback: S3, Prefect server, MLflow, workers."
)
silo_app = typer.Typer(no_args_is_help=True, help="Commands run at a silo.")
app.add_typer(stack_app, name="stack")
app.add_typer(silo_app, name="silo")

_STATE = Annotated[Path, typer.Option("--state-dir", help="The stack's state folder.")]


@stack_app.command("up")
def stack_up(
    state_dir: _STATE = Path(".silotune/stack"),
    silos: Annotated[
        str | None, typer.Option(help="Comma-separated silo names (first start; default clinic,bank,lab).")
    ] = None,
    auto_ports: Annotated[bool, typer.Option(help="Free ephemeral ports instead of 4200/5000/8333.")] = False,
) -> None:
    """Start SeaweedFS, the Prefect server, MLflow and one worker per pool; return when all are healthy."""
    from flows.stack import StackError, up

    try:
        names = silos.split(",") if silos else None
        st = up(state_dir, silos=names, auto_ports=auto_ports, echo=console.print)
    except StackError as exc:
        _fail(str(exc))
    console.print(f"Prefect UI: [bold]{st.prefect_ui}[/]   MLflow UI: [bold]{st.mlflow_uri}[/]")
    console.print(f"stop with: silotune stack down --state-dir {state_dir}")


@stack_app.command("down")
def stack_down(state_dir: _STATE = Path(".silotune/stack")) -> None:
    """Stop every part of the stack; data stays in the state folder."""
    from flows.stack import StackError, down

    try:
        down(state_dir, echo=console.print)
    except StackError as exc:
        _fail(str(exc))


@stack_app.command("status")
def stack_status(state_dir: _STATE = Path(".silotune/stack")) -> None:
    """Which parts run, and where the UIs are."""
    import json

    from flows.stack import status

    console.print_json(json.dumps(status(state_dir)))


@stack_app.command("config")
def stack_config(
    config: Annotated[Path, typer.Argument(help="A federation config (YAML) to point at the stack.")],
    out: Annotated[Path, typer.Option(help="Where to write the result.")],
    state_dir: _STATE = Path(".silotune/stack"),
) -> None:
    """Rewrite a config's store/tracking/orchestration sections for the running stack."""
    from flows.stack import Stack
    from silotune.config import dump_config, load_config, parse_config

    st = Stack.load(state_dir)
    cfg = load_config(config)
    data = cfg.model_dump(mode="json")
    data.update(store=st.store_spec(), tracking=st.tracking_spec(), orchestration={"mode": "workpools"})
    dump_config(parse_config(data), out)
    console.print(f"wrote {out}")


@app.command()
def worker(
    pool: Annotated[str, typer.Argument(help="The work pool to serve (e.g. 'coordinator').")],
    query_seconds: Annotated[
        float, typer.Option(help="Fallback polling interval (runs start on their Scheduled event).")
    ] = 5.0,
) -> None:
    """Serve a work pool in this process (flow runs execute in-process; models stay loaded)."""
    from flows.agent import serve

    serve(pool, query_seconds=query_seconds)


@silo_app.command("join")
def silo_join(
    name: Annotated[str, typer.Argument(help="The silo's name in the federation config.")],
    api_url: Annotated[
        str | None, typer.Option(help="The coordinator's Prefect API (default: $PREFECT_API_URL).")
    ] = None,
    pool: Annotated[str | None, typer.Option(help="Work pool (default silo-<name>).")] = None,
    train_path: Annotated[str | None, typer.Option(help="Local training data (overrides the config).")] = (
        None
    ),
    eval_path: Annotated[str | None, typer.Option(help="Local holdout (overrides the config).")] = None,
    query_seconds: Annotated[
        float, typer.Option(help="Fallback polling interval (runs start on their Scheduled event).")
    ] = 5.0,
) -> None:
    """Join a federation from a silo: serve the silo's pool against the coordinator's Prefect API.

    The silo's S3 keys come from its own environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the
    variable names the federation config's store section gives); its data paths from the options here.
    """
    import os

    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    if not os.environ.get("PREFECT_API_URL"):
        _fail("no Prefect API: pass --api-url http://<coordinator>:4200/api or set PREFECT_API_URL")
    from flows.agent import ensure_silo_deployments, serve
    from tasks.runtime import register_local_silo

    pool = pool or f"silo-{name}"
    if train_path or eval_path:
        register_local_silo(name, train_path=train_path, eval_path=eval_path)
    created = ensure_silo_deployments(pool)
    if created:
        console.print(f"registered {', '.join(created)}")
    console.print(f"silo {name}: serving pool {pool} at {os.environ['PREFECT_API_URL']}")
    serve(pool, query_seconds=query_seconds)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
