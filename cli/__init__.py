"""The ``silotune`` command line. It starts flows, so it sits beside them, above the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from silotune.report import history_table, ledger_table


def _offline() -> None:
    """Nothing leaves the machine: no hub downloads, no telemetry (set before Prefect is imported)."""
    import os

    from silotune.modeling import OFFLINE_ENV

    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    # The embedded API starts in-process; on a busy 2-core machine its first start
    # (database migrations) can take longer than Prefect's default wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


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
    console.print(history_table(out["history"]))
    console.print(f"final adapter (PEFT format): [bold]{out['adapter']}[/]")
    console.print(f"MLflow run {out['tracking_run_id']} at {out['tracking_uri']}")


def _run_on_stack(cfg: Any, state_dir: Path) -> dict[str, Any]:
    import contextlib
    import os

    from ops.prefect_server import prefect_api
    from ops.state import Stack

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
    """Write the deterministic, non-IID demo silos (train + holdout each, a union holdout, a DPO silo)."""
    from silotune.demo import make_demo_silos

    paths = make_demo_silos(out, seed=seed, preferences=True)
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
    from silotune.federation.commit import load_state
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
    console.print(history_table(state.history, state.initial_eval))


keys_app = typer.Typer(no_args_is_help=True, help="Key material: silo identities, the shared CKKS key.")
app.add_typer(keys_app, name="keys")


def _load(config: Path) -> Any:
    from silotune.config import load_config
    from silotune.errors import SilotuneError

    try:
        return load_config(config)
    except SilotuneError as exc:
        _fail(str(exc))


@keys_app.command("setup")
def keys_setup(config: Annotated[Path, typer.Argument(help="Federation config (YAML).")]) -> None:
    """One machine holds every silo (embedded default, demos): create every key the config needs."""
    from silotune.keys import setup_local_keys

    done = setup_local_keys(_load(config))
    for line in done or ["nothing to do: every key already exists"]:
        console.print(line)


@keys_app.command("silo")
def keys_silo(
    silo: str,
    config: Annotated[Path, typer.Option(help="Federation config (YAML).")],
    overwrite: bool = False,
) -> None:
    """At a silo: create its Ed25519 signing key; give the printed public key file to the coordinator."""
    from silotune.keys import create_silo_identity

    cfg = _load(config)
    pub = create_silo_identity(cfg, silo, overwrite=overwrite)
    console.print(
        f"public key: {pub}\ncopy it to the coordinator as {cfg.security.keys_dir}/silos/{silo}.pem"
    )


@keys_app.command("ckks")
def keys_ckks(
    silo: str,
    config: Annotated[Path, typer.Option(help="Federation config (YAML).")],
) -> None:
    """At one silo: create the federation's CKKS secret context (copy it to every silo out of band)."""
    from silotune.keys import SiloVault, create_ckks_secret

    cfg = _load(config)
    vault = SiloVault.for_silo(cfg.silo(silo))
    try:
        create_ckks_secret(vault.ckks_path, cfg.security.ckks_preset)
    except FileExistsError as exc:
        _fail(str(exc))
    console.print(
        f"secret context: {vault.ckks_path} (mode 0600). Copy it to every silo's private folder; "
        f"never to the coordinator. Then run `silotune keys ckks-public {silo} --config {config}`."
    )


@keys_app.command("ckks-public")
def keys_ckks_public(
    silo: str,
    config: Annotated[Path, typer.Option(help="Federation config (YAML).")],
    out: Annotated[Path | None, typer.Option(help="Where to write it (default: the coordinator's).")] = None,
) -> None:
    """At a silo: export the public context (no secret key) for the coordinator."""
    from silotune.keys import CoordinatorKeys, SiloVault, export_ckks_public

    cfg = _load(config)
    dest = out or CoordinatorKeys.for_config(cfg).ckks_path
    export_ckks_public(SiloVault.for_silo(cfg.silo(silo)).ckks_path, dest)
    console.print(f"public context: {dest}")


@app.command()
def ledger(
    federation: Annotated[str, typer.Argument(help="Federation id, or the federation's config (YAML).")],
    store: Annotated[
        Path, typer.Option(help="Root of the local object store (with a federation id).")
    ] = Path(".silotune/store"),
) -> None:
    """A federation's privacy ledger: ε spent per silo per round, DP settings, protection, bytes."""
    from silotune.errors import StoreError
    from silotune.federation.commit import load_state
    from silotune.store import LocalStore, open_store

    if Path(federation).is_file():  # a config: its id and its store (local or S3)
        cfg = _load(Path(federation))
        federation_id, where, object_store = (
            cfg.federation_id,
            f"the store of {federation}",
            open_store(cfg.store),
        )
    else:
        federation_id, object_store, where = federation, LocalStore(store), str(store)
    try:
        state = load_state(object_store, federation_id)
    except StoreError as exc:
        _fail(f"{federation!r} is neither a federation id nor a config file ({exc})")
    if state is None:
        _fail(f"no federation {federation_id!r} in {where}")
    assert state is not None
    console.print(ledger_table(federation_id, state.history))


@app.command()
def aggregators() -> None:
    """List the registered aggregators and server optimizers."""
    from silotune.aggregation import AGGREGATORS, SERVER_OPTIMIZERS

    console.print("aggregators: " + ", ".join(AGGREGATORS.names()))
    sums = [n for n in AGGREGATORS.names() if not getattr(AGGREGATORS.get(n), "needs_plaintext", True)]
    console.print(
        "  work on encrypted/masked updates (sums only): "
        + ", ".join(sums)
        + "; every other rule needs each silo's update in plaintext"
    )
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


@app.command()
def audit(
    config: Annotated[Path, typer.Argument(help="Config (YAML) of a finished federation.")],
    max_examples: Annotated[
        int, typer.Option(help="Members and non-members each subsampled to this many (0: all).")
    ] = 200,
    out: Annotated[Path | None, typer.Option(help="Also write audit.json/.md/_roc.png here.")] = None,
) -> None:
    """Audit a finished federation: membership inference (loss and reference-model attacks: ROC AUC,
    TPR at 1% FPR) and backdoor success of poisoned silos; logged to the federation's MLflow run."""
    from silotune.config import check_local_paths, load_config
    from silotune.errors import SilotuneError

    try:
        cfg = load_config(config)
        check_local_paths(cfg)
    except SilotuneError as exc:
        _fail(str(exc))
    from flows.audit import audit_federation_flow

    try:
        res = audit_federation_flow(cfg, max_examples or None, str(out) if out else None)
    except SilotuneError as exc:
        _fail(str(exc))
    table = Table(title=f"Audit of {cfg.federation_id} after {res['rounds']} round(s)")
    for c in ("membership attack", "ROC AUC", "TPR @ 1% FPR", "members / non-members"):
        table.add_column(c, justify="right")
    for name, r in res["mia"].items():
        table.add_row(
            name,
            f"{r['auc']:.3f}",
            f"{r['tpr_at_1pct_fpr']:.3f}",
            f"{r['num_members']} / {r['num_nonmembers']}",
        )
    console.print(table)
    for silo, b in res["backdoor"].items():
        console.print(
            f"backdoor of silo {silo}: attack success {b['attack_success_rate']:.3f}, "
            f"false trigger {b['false_trigger_rate']:.3f} on {int(b['num_prompts'])} prompts"
        )
    if res["clean"]:
        console.print("clean holdout utility: " + ", ".join(f"{k} {v:.4f}" for k, v in res["clean"].items()))
    console.print(f"logged to MLflow run {res['tracking_run_id']} ({cfg.tracking.uri})")


@app.command("robustness-grid")
def robustness_grid_cmd(
    out: Annotated[Path, typer.Option(help="Working folder (data, store, MLflow, results).")] = Path(
        "silotune-robustness"
    ),
    model: Annotated[
        str,
        typer.Option(
            help="'tiny-llama' (2 rounds, ~35 min) or 'smollm2-135m-instruct' (1 round x 16 steps, ~1 h "
            "on 2 cores)."
        ),
    ] = "tiny-llama",
    attack: Annotated[
        list[str] | None, typer.Option(help="Only these attacks (repeat the option); default: the preset's.")
    ] = None,
    rule: Annotated[
        list[str] | None,
        typer.Option(help="Only these aggregation rules (repeatable); default: the preset's."),
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Override the preset's rounds.")] = None,
    local_steps: Annotated[int | None, typer.Option(help="Override the preset's local steps.")] = None,
) -> None:
    """Attacks × aggregation rules on 4 demo silos (1 malicious): results table (CSV, markdown), plot,
    MLflow run and Prefect artifact. EVALUATION ONLY: the malicious silo is simulated."""
    from flows.robustness import robustness_grid

    res = robustness_grid(
        str(out), model=model, attacks=attack, rules=rule, rounds=rounds, local_steps=local_steps
    )
    console.print(Path(res["paths"]["markdown"]).read_text())
    for k, p in res["paths"].items():
        console.print(f"{k}: {p}")
    console.print(f"MLflow run {res['mlflow_run_id']}")


@app.command()
def methods() -> None:
    """List the post-training methods: what each trains and exchanges, and which defenses apply."""
    from silotune.methods import METHODS, get_method

    table = Table(title="Post-training methods (paper Tables 1 and 4)")
    for col in ("method", "trains", "exchanges", "defenses (full / limited)"):
        table.add_column(col)
    for name in METHODS.names():
        m = get_method(name)
        d = ", ".join(k + ("" if v.level == "full" else f" ({v.level})") for k, v in m.defenses.items())
        table.add_row(name, m.trains, m.payload.value, d)
    console.print(table)
    console.print("objectives: sft (instruction tuning), dpo (preference pairs; reference = the frozen base)")


@app.command()
def models() -> None:
    """List the built-in model descriptors: openness class, licence, usage limits, open data."""
    from silotune.openness import BUILTIN_DESCRIPTORS

    table = Table(title="Model descriptors")
    for col in ("name", "openness", "licence", "open data", "weights", "usage limits"):
        table.add_column(col)
    for d in BUILTIN_DESCRIPTORS.values():
        table.add_row(
            d.name,
            d.openness.value,
            d.licence,
            "yes" if d.open_training_data else "no",
            d.weights.value,
            "; ".join(u.text for u in d.usage_limits) or "-",
        )
    console.print(table)


@app.command()
def estimate(config: Annotated[Path, typer.Argument(help="Federation config (YAML).")]) -> None:
    """Estimated peak training memory of every silo of a federation (see silotune/memory_estimate.py)."""
    from silotune.config import load_config
    from silotune.errors import SilotuneError
    from silotune.silo_memory import estimate_silo, model_shape

    try:
        cfg = load_config(config)
        shape = model_shape(cfg)
    except SilotuneError as exc:
        _fail(str(exc))
    table = Table(
        title=f"Peak training memory per silo ({shape.name}, batch {cfg.train.batch_size} × "
        f"seq {cfg.model.max_seq_len})"
    )
    for col in ("silo", "method", "objective", "trainable", "estimate", "breakdown"):
        table.add_column(col)
    for s in cfg.silos:
        e = estimate_silo(cfg, s.name, shape=shape)
        table.add_row(
            s.name,
            cfg.method_for(s.name).name,
            cfg.objective_for(s.name).name,
            f"{e.trainable_params:,}",
            f"{e.total / 2**30:.2f} GiB",
            e.summary(),
        )
    console.print(table)


def _silo_option(text: str) -> dict[str, Any]:
    """NAME:VRAM_GB[:RAM_GB] (VRAM 0: no GPU; RAM default 16), or NAME:none (no local compute)."""
    parts = text.split(":")
    if len(parts) == 2 and parts[1] == "none":
        return {"name": parts[0], "local_compute": False, "vram_gb": 0, "ram_gb": 0}
    if len(parts) not in (2, 3):
        raise typer.BadParameter(f"--silo {text!r}: use NAME:VRAM_GB[:RAM_GB] or NAME:none")
    try:
        out: dict[str, Any] = {"name": parts[0], "vram_gb": float(parts[1])}
        if len(parts) == 3:
            out["ram_gb"] = float(parts[2])
    except ValueError:
        raise typer.BadParameter(f"--silo {text!r}: sizes must be numbers (GB)") from None
    return out


def print_plan(plan: Any) -> None:
    console.print(f"[bold]openness class:[/] {plan.openness.value}  [dim]{plan.openness_reason}[/]")
    console.print(f"[bold]model:[/] {plan.model or '-'}  [dim]{plan.model_reason}[/]")
    table = Table(title="Method per silo")
    for col in ("silo", "memory", "method", "bits", "rank", "ckpt", "estimate", "reason"):
        table.add_column(col)
    for s in plan.silos:
        table.add_row(
            s.name,
            f"{s.device} ({s.budget_gb:g} GB usable)" if s.budget_gb else s.device,
            s.method,
            str(s.bits or "-"),
            str(s.rank or "-"),
            "yes" if s.gradient_checkpointing else "-",
            f"{s.estimate_gb:.2f} GB" if s.estimate_gb is not None else "-",
            s.reason,
        )
    console.print(table)
    table = Table(title="Defenses")
    for col in ("defense", "recommended", "reason"):
        table.add_column(col)
    for d in plan.defenses:
        table.add_row(d.item, "yes" if d.recommended else "no", d.reason)
    console.print(table)
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}")


@app.command()
def plan(
    answers: Annotated[Path | None, typer.Argument(help="Answers file (YAML); options override it.")] = None,
    privacy: Annotated[str | None, typer.Option(help="strict | moderate | none")] = None,
    autonomy: Annotated[
        bool | None,
        typer.Option("--autonomy/--no-autonomy", help="Clients must control training and inference."),
    ] = None,
    silo: Annotated[
        list[str] | None, typer.Option(help="NAME:VRAM_GB[:RAM_GB] or NAME:none; repeat per silo.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Plan for this model descriptor (see `silotune models`).")
    ] = None,
    model_size: Annotated[
        float | None, typer.Option(help="Desired model size, billions of parameters.")
    ] = None,
    permissive_only: Annotated[
        bool | None, typer.Option("--permissive-only", help="Only permissive licences.")
    ] = None,
    open_data: Annotated[
        bool | None, typer.Option("--open-data", help="The training data must be open.")
    ] = None,
    monthly_users: Annotated[
        float | None, typer.Option(help="Expected monthly active users of the product.")
    ] = None,
    objective: Annotated[str | None, typer.Option(help="sft | dpo")] = None,
    untrusted_silos: Annotated[
        bool | None, typer.Option("--untrusted-silos", help="Some silo may poison updates.")
    ] = None,
    provider_api: Annotated[
        str | None, typer.Option(help="none | finetune | chat: closed access the team has.")
    ] = None,
    write_config: Annotated[
        Path | None, typer.Option(help="Write a federation config implementing the plan.")
    ] = None,
) -> None:
    """Walk the paper's Figure 2 decision tree: openness class, method per silo and defenses, with reasons."""
    from silotune.errors import SilotuneError
    from silotune.plan import load_answers, make_plan, parse_answers
    from silotune.plan import write_config as write

    over: dict[str, Any] = {
        "privacy": privacy,
        "autonomy": autonomy,
        "model": model,
        "model_size_b": model_size,
        "objective": objective,
        "untrusted_silos": untrusted_silos,
        "provider_api": provider_api,
    }
    if silo:
        over["silos"] = [_silo_option(s) for s in silo]
    lic = {
        k: v
        for k, v in {
            "permissive_only": permissive_only,
            "open_data_required": open_data,
            "monthly_active_users": monthly_users,
        }.items()
        if v is not None
    }
    try:
        if answers is not None:
            a = load_answers(answers, **over)
            if lic:
                a = parse_answers({**a.model_dump(), "licence": {**a.licence.model_dump(), **lic}})
        else:
            a = parse_answers(
                {**{k: v for k, v in over.items() if v is not None}, "licence": lic}, source="options"
            )
        result = make_plan(a)
        print_plan(result)
        if write_config is not None:
            write(a, result, write_config)
            console.print(f"federation config written: [bold]{write_config}[/]")
    except SilotuneError as exc:
        _fail(str(exc))


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
    config: Annotated[
        list[Path] | None,
        typer.Option(
            help="A federation config (YAML) to run on the stack (repeatable): it is made for the stack "
            "(STATE/federations/<id>.yaml, keys created and pinned) and every silo's policy is written "
            "strict from it (STATE/policies/<silo>.yaml: the config's protection, signing and DP as "
            "floors; the config accepted). Without it, existing policies are kept and a missing one is the "
            "stack's default (signed uploads, this stack's store and coordinator key, any federation).",
        ),
    ] = None,
    silos: Annotated[
        str | None,
        typer.Option(help="Comma-separated silo names (default: the configs' silos, else clinic,bank,lab)."),
    ] = None,
    auto_ports: Annotated[bool, typer.Option(help="Free ephemeral ports instead of 4200/5000/8333.")] = False,
    database: Annotated[
        str | None,
        typer.Option(help="Prefect's database: 'sqlite' (default) or 'postgres' (PostgreSQL installed)."),
    ] = None,
    redeploy: Annotated[
        bool, typer.Option(help="Re-register deployments/prefect.yaml (resets schedules to the file's).")
    ] = False,
) -> None:
    """Start SeaweedFS, the Prefect server, MLflow and one worker per pool; return when all are healthy.

    Each silo's worker is `silotune silo join SILO --policy STATE/policies/SILO.yaml`: every run is
    checked against that policy before the silo reads any data. Each silo's private folder is
    STATE/silos/SILO/private (its own). Edit a policy, then restart the stack, to change what a silo runs.
    """
    from ops.stack import up
    from ops.state import StackError

    try:
        names = silos.split(",") if silos else None
        st = up(
            state_dir,
            silos=names,
            config=list(config) if config else None,
            auto_ports=auto_ports,
            database=database,
            redeploy=redeploy,
            echo=console.print,
        )
    except StackError as exc:
        _fail(str(exc))
    console.print(f"Prefect UI: [bold]{st.prefect_ui}[/]   MLflow UI: [bold]{st.mlflow_uri}[/]")
    for c in config or []:
        from silotune.config import load_config

        fid = load_config(c).federation_id
        console.print(f"run {fid} with: silotune run {st.config_path(fid)} --state-dir {state_dir}")
    console.print(f"stop with: silotune stack down --state-dir {state_dir}")


@stack_app.command("down")
def stack_down(state_dir: _STATE = Path(".silotune/stack")) -> None:
    """Stop every part of the stack; data stays in the state folder."""
    from ops.stack import down
    from ops.state import StackError

    try:
        down(state_dir, echo=console.print)
    except StackError as exc:
        _fail(str(exc))


@stack_app.command("status")
def stack_status(state_dir: _STATE = Path(".silotune/stack")) -> None:
    """Which parts run, and where the UIs are."""
    import json

    from ops.stack import status

    console.print_json(json.dumps(status(state_dir)))


@stack_app.command("config")
def stack_config(
    config: Annotated[Path, typer.Argument(help="A federation config (YAML) to point at the stack.")],
    out: Annotated[Path, typer.Option(help="Where to write the result.")],
    state_dir: _STATE = Path(".silotune/stack"),
) -> None:
    """Make a config for the stack: its store, tracking, orchestration, the silos' private folders and
    the coordinator's keys folder; every key created and pinned (signing on).

    The silos run it if their policies allow it: the stack's default policies do; policies written by
    `stack up --config` allow only those federations (`stack down`, then `stack up --config` this one).
    """
    from ops.policies import stack_config as make
    from ops.state import Stack, StackError
    from silotune.config import dump_config

    st = Stack.load(state_dir)
    if not st.ports:
        _fail(f"no stack in {state_dir} (`silotune stack up` first)")
    try:
        dump_config(make(st, _load(config)), out)
    except StackError as exc:
        _fail(str(exc))
    console.print(f"wrote {out}")


@app.command()
def worker(
    pool: Annotated[str, typer.Argument(help="The work pool to serve (e.g. 'coordinator').")],
    query_seconds: Annotated[
        float, typer.Option(help="Fallback polling interval (runs start on their Scheduled event).")
    ] = 5.0,
) -> None:
    """Serve a work pool in this process (flow runs execute in-process; models stay loaded)."""
    from ops.worker import serve

    serve(pool, query_seconds=query_seconds)


policy_app = typer.Typer(
    no_args_is_help=True,
    help="The silo's own policy file: what this silo agrees to run (kept at the silo, never sent to it).",
)
silo_app.add_typer(policy_app, name="policy")


def _load_policy(path: Path) -> Any:
    from silotune.policy import PolicyError, load_policy

    try:
        return load_policy(path)
    except PolicyError as exc:
        _fail(str(exc))


def _print_policy(policy: Any, source: Path | str) -> None:
    """A human summary of a silo policy (a rich table)."""
    from rich.markup import escape

    dp, rel, keys = policy.dp, policy.release, policy.store_keys

    def cap(value: Any, none: str = "no cap") -> str:
        return none if value is None else f"{value:g}"

    def show(values: list[str] | None, none: str) -> str:
        return escape(", ".join(values)) if values else none

    withheld = [k for k, v in rel.model_dump().items() if not v]
    released = [k for k, v in rel.model_dump().items() if v]
    table = Table(title=escape(f"Policy of silo {policy.silo} ({source})"), show_header=False)
    table.add_column("rule", style="bold")
    table.add_column("value", overflow="fold")
    rows = [
        ("federations", show(policy.federations, "-")),
        ("private folder", escape(policy.private_dir)),
        ("training data", escape(policy.train_path)),
        ("holdout", escape(policy.eval_path or "none")),
        (
            "coordinator key",
            escape(policy.coordinator_key) if policy.coordinator_key else "[yellow]not pinned[/]",
        ),
        ("base model sha256", policy.base_model_sha256 or "[yellow]not pinned[/]"),
        ("methods", show(policy.methods, "any registered")),
        ("protection", ", ".join(policy.protection)),
        ("signed uploads", "required" if policy.require_signing else "optional"),
        (
            "DP-SGD",
            "required" if dp.require_sample_dp else "optional",
        ),
        ("  ε per federation", cap(dp.max_epsilon)),
        ("  lifetime ε of the data", cap(dp.max_lifetime_epsilon)),
        ("  min noise multiplier", cap(dp.min_noise_multiplier, "no floor")),
        ("  max δ", cap(dp.max_delta)),
        ("client DP", "required" if dp.require_client_dp else "optional"),
        ("  client ε per federation", cap(dp.max_client_epsilon)),
        ("stores", show(policy.stores, "-")),
        (
            "S3 keys from",
            f"${keys.access_key_env} / ${keys.secret_key_env}"
            + (f" or profile {keys.profile}" if keys.profile else ""),
        ),
        ("released unnoised", show(released, "nothing")),
        ("never released unnoised", show(withheld, "-")),
        ("accepted config", "required" if policy.require_accepted_config else "[yellow]not required[/]"),
    ]
    if policy.allow_attack_simulation:
        rows.append(("attack simulation", "[red]allowed (evaluation only)[/]"))
    for rule, value in rows:
        table.add_row(rule, value)
    console.print(table)


def _print_violations(violations: list[Any], title: str) -> None:
    """One line per violation: the config field, the problem, the policy line (not wrapped, for logs)."""
    from rich.markup import escape

    console.print(f"[bold red]{escape(title)}[/]", soft_wrap=True)
    for v in violations:
        console.print(
            f"  - [bold]{escape(v.field)}[/]: {escape(v.message)} [dim]\\[policy: {escape(v.rule)}][/]",
            soft_wrap=True,
        )


@policy_app.command("init")
def silo_policy_init(
    name: Annotated[str, typer.Argument(help="The silo's name (as in the federation configs).")],
    out: Annotated[Path, typer.Option(help="Where to write the policy (YAML).")],
    from_config: Annotated[
        Path | None,
        typer.Option("--from-config", help="Start from this federation config (ids, data, store, model)."),
    ] = None,
    federation: Annotated[
        list[str] | None,
        typer.Option(help="Allowed federation id or pattern such as 'retrain-*' (repeatable)."),
    ] = None,
    store: Annotated[
        list[str] | None,
        typer.Option(help="Allowed store: s3://HOST:PORT/BUCKET or file:///ROOT (repeatable)."),
    ] = None,
    coordinator_key: Annotated[
        Path | None, typer.Option(help="The coordinator's Ed25519 public key (coordinator.pub.pem).")
    ] = None,
    pin_model: Annotated[
        bool, typer.Option(help="With --from-config: pin the sha256 of the base model's weights.")
    ] = True,
    force: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Write a strict starter policy: commented YAML explaining each field; edit it, then `policy show`."""
    from silotune.errors import SilotuneError
    from silotune.policy import (
        DPPolicy,
        SiloPolicy,
        StoreKeysPolicy,
        dump_policy,
        model_weights_sha256,
        store_location,
    )

    if out.exists() and not force:
        _fail(f"{out} exists; pass --force to replace it")
    cfg = _load(from_config) if from_config is not None else None
    fields: dict[str, Any] = {
        "silo": name,
        "private_dir": f".silotune/silos/{name}",
        "train_path": f"data/{name}/train.jsonl",
        "eval_path": f"data/{name}/eval.jsonl",
        "stores": store or ["s3://127.0.0.1:8333/silotune"],
        "methods": ["lora"],
    }
    notes: list[str] = []
    max_eps, max_delta = 8.0, 1e-5
    if cfg is not None:
        if name not in {s.name for s in cfg.silos}:
            notes.append(
                f"{from_config} has no silo {name!r}: data paths and private folder are placeholders"
            )
        else:
            spec = cfg.silo(name)
            fields.update(
                private_dir=str(Path(spec.private_folder).resolve()),
                train_path=spec.train_path,
                eval_path=spec.eval_path,
                methods=sorted({cfg.method.name, cfg.method_for(name).name}),
            )
        fields["federations"] = [cfg.federation_id]
        if not store:
            fields["stores"] = [store_location(cfg.store).text]
        if cfg.store.kind == "s3":
            fields["store_keys"] = StoreKeysPolicy.from_spec(cfg.store)
        sample = cfg.privacy.sample_dp
        if sample is not None:
            max_eps = sample.target_epsilon or max_eps
            max_delta = sample.delta
        if pin_model:
            try:
                fields["base_model_sha256"] = model_weights_sha256(cfg.model)
            except (SilotuneError, OSError) as exc:
                notes.append(f"base model not pinned: {exc}")
    if federation:
        fields["federations"] = federation
    if "federations" not in fields:
        _fail("pass --federation ID (repeatable; patterns such as 'retrain-*' too) or --from-config CONFIG")
    if coordinator_key is not None:
        fields["coordinator_key"] = str(coordinator_key.resolve())
    fields["dp"] = DPPolicy(
        require_sample_dp=True,
        max_epsilon=max_eps,
        max_lifetime_epsilon=max(4 * max_eps, 16.0),
        max_delta=max_delta,
        require_client_dp=cfg is not None and cfg.privacy.client_dp is not None,
    )
    try:
        policy = SiloPolicy(**fields)
    except ValueError as exc:
        _fail(f"cannot build the policy: {exc}")
    header = (
        f"Policy of silo {name}. Kept at the silo, never read from the coordinator: every run's config is "
        "checked against it before any data is read, and a config that asks for less is refused (logged to "
        "<private_dir>/refusals.log). Relative paths resolve against this file's folder. Check a config "
        "with `silotune silo policy check THIS_FILE CONFIG`; accept it with `silotune silo accept CONFIG "
        "--policy THIS_FILE`."
    )
    dump_policy(policy, out, header=header)
    _load_policy(out)  # what was written loads back
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"wrote {out}: review every line (data paths, federations, stores, DP floors)")


@policy_app.command("show")
def silo_policy_show(policy: Annotated[Path, typer.Argument(help="The silo's policy file.")]) -> None:
    """Print a summary of a silo's policy."""
    _print_policy(_load_policy(policy), policy)


@policy_app.command("check")
def silo_policy_check(
    policy: Annotated[Path, typer.Argument(help="The silo's policy file.")],
    config: Annotated[Path, typer.Argument(help="A federation config (YAML or JSON).")],
) -> None:
    """Would this silo run CONFIG? Prints every violation (exit 1), or 'allowed' (exit 0)."""
    from silotune.errors import SilotuneError
    from silotune.policy import Violation, acceptance_fingerprint, accepted_fingerprint, check_config

    pol, cfg = _load_policy(policy), _load(config)
    violations = check_config(pol, cfg)
    fp = acceptance_fingerprint(cfg)
    note = ""
    if pol.require_accepted_config:
        rule = "require_accepted_config: true"
        try:
            accepted = accepted_fingerprint(pol, cfg.federation_id)
        except SilotuneError as exc:  # a tampered or unreadable acceptance, or no signing key
            violations.append(Violation("fingerprint", rule, str(exc)))
        else:
            if accepted is None:
                note = (
                    f"not accepted yet: run `silotune silo accept {config} --policy {policy}` "
                    "before the first round"
                )
            elif accepted != fp:
                violations.append(
                    Violation(
                        "fingerprint",
                        rule,
                        f"config fingerprint {fp} differs from the one this silo accepted ({accepted})",
                    )
                )
            else:
                note = f"accepted (fingerprint {fp})"
    if violations:
        _print_violations(violations, f"silo {pol.silo} refuses federation {cfg.federation_id}:")
        raise typer.Exit(1)
    console.print(f"allowed: silo {pol.silo} runs federation {cfg.federation_id} (fingerprint {fp})")
    if note:
        console.print(note)


@silo_app.command("accept")
def silo_accept(
    config: Annotated[Path, typer.Argument(help="The federation config (YAML or JSON) to accept.")],
    policy: Annotated[Path, typer.Option(help="The silo's policy file.")],
    replace: Annotated[
        bool, typer.Option(help="Replace an acceptance of this federation with another fingerprint.")
    ] = False,
    create_key: Annotated[
        bool, typer.Option(help="Create the silo's signing key in its private folder if missing.")
    ] = False,
) -> None:
    """Sign the config's fingerprint: from now on this silo runs this federation only with this config
    (rounds, tracking, evaluation, tags, store and orchestration may change; the policy still applies)."""
    from silotune.errors import SilotuneError
    from silotune.policy import PolicyRefusal, accept_config, acceptance_fingerprint

    pol, cfg = _load_policy(policy), _load(config)
    try:
        path = accept_config(pol, cfg, replace=replace, create_key=create_key)
    except PolicyRefusal as exc:
        _print_violations(exc.violations, f"silo {pol.silo} refuses federation {cfg.federation_id}:")
        raise typer.Exit(1) from None
    except SilotuneError as exc:
        hint = "" if create_key else " (pass --create-key to create the silo's signing key)"
        _fail(f"{exc}{hint if 'no signing key' in str(exc) else ''}")
    console.print(
        f"silo {pol.silo} accepted federation {cfg.federation_id} (fingerprint "
        f"{acceptance_fingerprint(cfg)}): {path}"
    )


@silo_app.command("ledger")
def silo_ledger(
    policy: Annotated[Path, typer.Option(help="The silo's policy file (its private folder has the ledger).")],
) -> None:
    """The silo's own privacy books: every release it made, ε per federation and per dataset (lifetime)."""
    from silotune.privacy.ledger import SiloLedger

    pol = _load_policy(policy)
    ledger = SiloLedger(Path(pol.private_dir), pol.silo)
    entries = ledger.entries()
    if not entries:
        console.print(f"silo {pol.silo}: no DP release recorded in {ledger.folder}")
        return
    delta = pol.dp.max_delta or 1e-5
    table = Table(title=f"Privacy ledger of silo {pol.silo} (ε at δ={delta:g})")
    cols = ("kind", "federation", "rounds", "σ / z", "ε (federation)", "dataset", "ε (dataset, lifetime)")
    for col in cols:
        table.add_column(col, overflow="fold")
    groups: dict[tuple[str, str], list[Any]] = {}
    for e in entries:
        groups.setdefault((e.kind, e.federation_id), []).append(e)
    for (kind, fid), group in sorted(groups.items()):
        data = group[-1].data_sha256
        table.add_row(
            kind,
            fid,
            str(len(group)),
            ", ".join(sorted({f"{e.noise_multiplier:.3g}" for e in group})),
            f"{ledger.epsilon(kind=kind, delta=delta, federation_id=fid):.3f}",
            (data or "unknown")[:12],
            f"{ledger.epsilon(kind=kind, delta=delta, data_sha256=data):.3f}" if data else "-",
        )
    console.print(table)
    if pol.dp.max_lifetime_epsilon is not None:
        console.print(f"lifetime budget per dataset (policy): ε ≤ {pol.dp.max_lifetime_epsilon:g}")


@silo_app.command("join")
def silo_join(
    name: Annotated[str, typer.Argument(help="The silo's name in the federation config.")],
    policy: Annotated[
        Path | None, typer.Option(help="The silo's policy file (required; see `silotune silo policy init`).")
    ] = None,
    api_url: Annotated[
        str | None, typer.Option(help="The coordinator's Prefect API (default: $PREFECT_API_URL).")
    ] = None,
    pool: Annotated[str | None, typer.Option(help="Work pool (default silo-<name>).")] = None,
    train_path: Annotated[
        str | None, typer.Option(help="Local training data (overrides the policy's, in this process).")
    ] = None,
    eval_path: Annotated[
        str | None, typer.Option(help="Local holdout (overrides the policy's, in this process).")
    ] = None,
    query_seconds: Annotated[
        float, typer.Option(help="Fallback polling interval (runs start on their Scheduled event).")
    ] = 5.0,
) -> None:
    """Join a federation from a silo: serve the silo's pool against the coordinator's Prefect API.

    Every run is checked against the silo's policy (--policy) before any data is read; the silo's data
    paths and private folder come from the policy (--train-path/--eval-path override it in this process).
    The silo's S3 keys come from its own environment (the variable names the policy's store_keys allow).
    """
    import os

    if policy is None:
        _fail(
            "silo join needs the silo's policy: --policy FILE (create one with `silotune silo policy init "
            f"{name} --out FILE`); a silo runs only the configs its own policy allows"
        )
    assert policy is not None
    pol = _load_policy(policy)
    if pol.silo != name:
        _fail(f"{policy} is the policy of silo {pol.silo!r}, not {name!r}")
    overrides = {k: v for k, v in (("train_path", train_path), ("eval_path", eval_path)) if v is not None}
    if overrides:
        pol = pol.model_copy(update={k: str(Path(v).resolve()) for k, v in overrides.items()})
    for key in ("train_path", "eval_path"):
        value = getattr(pol, key)
        if value is not None and not Path(value).is_file():
            _fail(f"{key}: file not found: {value} (policy {policy})")
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    if not os.environ.get("PREFECT_API_URL"):
        _fail("no Prefect API: pass --api-url http://<coordinator>:4200/api or set PREFECT_API_URL")
    from ops.worker import ensure_silo_deployments, serve
    from tasks.runtime import register_silo_policy

    _print_policy(pol, policy)
    register_silo_policy(pol)
    pool = pool or f"silo-{name}"
    created = ensure_silo_deployments(pool)
    if created:
        console.print(f"registered {', '.join(created)}")
    console.print(f"silo {name}: serving pool {pool} at {os.environ['PREFECT_API_URL']}")
    serve(pool, query_seconds=query_seconds)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
