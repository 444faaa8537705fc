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
    from silotune.federation import load_state
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
    table = Table(title=f"Privacy ledger of {federation_id}")
    for col in (
        "round",
        "silo",
        "sample ε (δ)",
        "σ",
        "q",
        "C",
        "client ε",
        "client z",
        "protection",
        "up / down",
    ):
        table.add_column(col, justify="right")
    for h in state.history:
        for silo in sorted(h.get("train", {})):
            pv = h.get("privacy", {}).get(silo, {})
            b = h.get("bytes", {}).get(silo, {})
            table.add_row(
                str(h["round"]),
                silo,
                f"{pv['dp.epsilon']:.3f} ({pv['dp.delta']:g})" if "dp.epsilon" in pv else "-",
                f"{pv['dp.noise_multiplier']:.3f}" if "dp.noise_multiplier" in pv else "-",
                f"{pv['dp.sample_rate']:.3f}" if "dp.sample_rate" in pv else "-",
                f"{pv.get('dp.max_grad_norm', pv.get('client_dp.clip_norm', 0)):g}" if pv else "-",
                f"{h['client_dp_epsilon']:.3f}" if "client_dp_epsilon" in h else "-",
                f"{pv['client_dp.noise_multiplier']:.3f}" if "client_dp.noise_multiplier" in pv else "-",
                h.get("protection", "none"),
                f"{b.get('up', 0):,} / {b.get('down', 0):,}" if b else "-",
            )
    console.print(table)


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
    """Estimated peak training memory of every silo of a federation (see silotune/memory.py)."""
    from silotune.config import load_config
    from silotune.errors import SilotuneError
    from silotune.methods.memory_model import estimate_silo, model_shape

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
    silos: Annotated[
        str | None, typer.Option(help="Comma-separated silo names (first start; default clinic,bank,lab).")
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
    """Start SeaweedFS, the Prefect server, MLflow and one worker per pool; return when all are healthy."""
    from flows.stack import StackError, up

    try:
        names = silos.split(",") if silos else None
        st = up(
            state_dir,
            silos=names,
            auto_ports=auto_ports,
            database=database,
            redeploy=redeploy,
            echo=console.print,
        )
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
