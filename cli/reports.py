"""Reports and planning: ``ledger``, ``aggregators``, ``audit``, ``robustness-grid``, ``methods``,
``models``, ``estimate`` and ``plan``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import console, fail, load_config_file, print_table, stop_on_signals
from silotune.errors import SilotuneError, StoreError
from silotune.report import ledger_table


def ledger(
    federation: Annotated[str, typer.Argument(help="Federation id, or the federation's config (YAML).")],
    store: Annotated[
        Path, typer.Option(help="Root of the local object store (with a federation id).")
    ] = Path(".silotune/store"),
) -> None:
    """A federation's privacy ledger: ε spent per silo per round, DP settings, protection, bytes."""
    from silotune.federation.commit import load_state  # imports torch (about 2.5 s)
    from silotune.store import LocalStore, open_store  # imports torch (about 2.5 s)

    if Path(federation).is_file():  # a config: its id and its store (local or S3)
        cfg = load_config_file(Path(federation))
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
        fail(f"{federation!r} is neither a federation id nor a config file ({exc})")
    if state is None:
        fail(f"no federation {federation_id!r} in {where}")
    assert state is not None
    print_table(ledger_table(federation_id, state.history))


def aggregators() -> None:
    """List the registered aggregators and server optimizers."""
    from silotune.aggregation import AGGREGATORS, SERVER_OPTIMIZERS  # imports torch (about 1.3 s)

    console.print("aggregators: " + ", ".join(AGGREGATORS.names()))
    sums = [n for n in AGGREGATORS.names() if not getattr(AGGREGATORS.get(n), "needs_plaintext", True)]
    console.print(
        "  work on encrypted/masked updates (sums only): "
        + ", ".join(sums)
        + "; every other rule needs each silo's update in plaintext"
    )
    console.print("server optimizers: " + ", ".join(SERVER_OPTIMIZERS.names()))


def audit(
    config: Annotated[Path, typer.Argument(help="Config (YAML) of a finished federation.")],
    max_examples: Annotated[
        int, typer.Option(help="Members and non-members each subsampled to this many (0: all).")
    ] = 200,
    out: Annotated[Path | None, typer.Option(help="Also write audit.json/.md/_roc.png here.")] = None,
) -> None:
    """Audit a finished federation: membership inference (loss and reference-model attacks: ROC AUC,
    TPR at 1% FPR) and backdoor success of poisoned silos; logged to the federation's MLflow run."""
    from silotune.config import check_local_paths, load_config  # imports torch (about 2 s)

    try:
        cfg = load_config(config)
        check_local_paths(cfg)
    except SilotuneError as exc:
        fail(str(exc))
    from flows.audit import audit_federation_flow  # Prefect, torch and transformers (about 4 s)

    try:
        with stop_on_signals("the audit"):
            res = audit_federation_flow(cfg, max_examples or None, str(out) if out else None)
    except SilotuneError as exc:
        fail(str(exc))
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
    from flows.robustness import robustness_grid  # Prefect, torch and transformers (about 4 s)

    with stop_on_signals("the robustness grid"):
        res = robustness_grid(
            str(out), model=model, attacks=attack, rules=rule, rounds=rounds, local_steps=local_steps
        )
    console.print(Path(res["paths"]["markdown"]).read_text())
    for k, p in res["paths"].items():
        console.print(f"{k}: {p}")
    console.print(f"MLflow run {res['mlflow_run_id']}")


def methods() -> None:
    """List the post-training methods: what each trains and exchanges, and which defenses apply."""
    from silotune.methods import METHODS, get_method  # imports torch (about 1 s)

    table = Table(title="Post-training methods (paper Tables 1 and 4)")
    for col in ("method", "trains", "exchanges", "defenses (full / limited)"):
        table.add_column(col)
    for name in METHODS.names():
        m = get_method(name)
        d = ", ".join(k + ("" if v.level == "full" else f" ({v.level})") for k, v in m.defenses.items())
        table.add_row(name, m.trains, m.payload.value, d)
    console.print(table)
    console.print("objectives: sft (instruction tuning), dpo (preference pairs; reference = the frozen base)")


def models() -> None:
    """List the built-in model descriptors: openness class, licence, usage limits, open data."""
    from silotune.openness import BUILTIN_DESCRIPTORS  # imports torch (about 1 s)

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


def estimate(config: Annotated[Path, typer.Argument(help="Federation config (YAML).")]) -> None:
    """Estimated peak training memory of every silo of a federation (see silotune/memory_estimate.py)."""
    from silotune.config import load_config  # imports torch (about 2 s)
    from silotune.silo_memory import estimate_silo, model_shape  # imports torch (about 2.5 s)

    try:
        cfg = load_config(config)
        shape = model_shape(cfg)
    except SilotuneError as exc:
        fail(str(exc))
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
    from silotune.plan import load_answers, make_plan, parse_answers  # imports torch (about 2 s)
    from silotune.plan import write_config as write  # imports torch (about 2 s)

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
        fail(str(exc))


def compare(
    config: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    out: Annotated[Path, typer.Option(help="Folder for the pooled data and comparison.json.")] = Path(
        "silotune-compare"
    ),
    baselines: Annotated[bool, typer.Option(help="Train the centralized and local-only baselines.")] = True,
    max_new_tokens: Annotated[int, typer.Option(help="Generation limit of the free-running metrics.")] = 64,
) -> None:
    """Run (or resume) a federation and its baselines (centralized: all silos' data pooled, the same steps
    and examples; local-only: each silo alone), and compare them on every holdout, teacher-forced and by
    free-running generation (ROUGE-L, chrF); federated / centralized as ratios."""
    from silotune.config import check_local_paths, load_config  # imports torch (about 2 s)

    try:
        cfg = load_config(config)
        check_local_paths(cfg)
    except SilotuneError as exc:
        fail(str(exc))
    from flows.demo import compare_federation  # Prefect, torch and transformers (about 4 s)

    try:
        compare_federation(cfg, out, console=console, baselines=baselines, max_new_tokens=max_new_tokens)
    except SilotuneError as exc:
        fail(str(exc))
    console.print(f"comparison: {out / 'comparison.json'}")


report_app = typer.Typer(
    no_args_is_help=True, help="Reports that run experiments: the privacy–utility frontier."
)


@report_app.command("privacy-utility")
def privacy_utility_cmd(
    config: Annotated[
        Path, typer.Argument(help="Federation config (YAML): the non-private recipe and data.")
    ],
    out: Annotated[Path, typer.Option(help="Folder of the table and plots.")] = Path(
        "results/privacy-utility"
    ),
    validation: Annotated[
        list[Path] | None,
        typer.Option(
            help="Validation files (repeatable; kept apart from the holdouts) for the DP recipe; default: "
            "val.jsonl beside each silo's training file."
        ),
    ] = None,
    epsilon: Annotated[
        list[float] | None, typer.Option(help="Target ε (repeatable); default 1 2 4 8.")
    ] = None,
    method: Annotated[
        list[str] | None, typer.Option(help="lora | ffa_lora (repeatable); default both.")
    ] = None,
    privacy: Annotated[
        list[str] | None, typer.Option(help="none | sample_dp | client_dp (repeatable); default all.")
    ] = None,
    baselines: Annotated[bool, typer.Option(help="Also the centralized and local-only baselines.")] = True,
    local_only: Annotated[bool, typer.Option(help="With --baselines: also each silo alone.")] = True,
    mia_examples: Annotated[int, typer.Option(help="Members and non-members of the MIA, each.")] = 100,
    max_new_tokens: Annotated[int, typer.Option(help="Generation limit of the free-running metrics.")] = 64,
    note: Annotated[list[str] | None, typer.Option(help="A note for the report (repeatable).")] = None,
    validation_examples: Annotated[
        int, typer.Option(help="Validation records behind the per-example clip norm.")
    ] = 32,
    dp_batch_multiplier: Annotated[
        int | None, typer.Option(help="DP-SGD expected batch = this × the config's batch (default 4).")
    ] = None,
    dp_step_fraction: Annotated[
        float | None, typer.Option(help="DP-SGD local steps = this × the config's steps (default 0.5).")
    ] = None,
    dp_lr_multiplier: Annotated[
        float | None,
        typer.Option(
            help="DP-SGD learning rate = this × the config's (default 20, chosen on validation data by "
            "bench/dp_recipe_search.py; run it on your own validation files to choose yours)."
        ),
    ] = None,
) -> None:
    """Grid of real federations: no DP, DP-SGD and client-level DP at each ε, LoRA and FFA-LoRA, plus the
    baselines; utility, membership inference, ε, bytes and seconds; table and plots to OUT, MLflow and
    Prefect. Identical work is computed once across cells."""
    from silotune.config import check_local_paths, load_config  # imports torch (about 2 s)

    try:
        cfg = load_config(config)
        check_local_paths(cfg)
    except SilotuneError as exc:
        fail(str(exc))
    if validation:
        val = [str(p) for p in validation]
    else:
        val = [str(Path(s.train_path).with_name("val.jsonl")) for s in cfg.silos]
    missing = [p for p in val if not Path(p).is_file()]
    if missing:
        fail(f"--validation: no file {missing[0]} (give validation files apart from the holdouts)")
    from flows.privacy_utility import privacy_utility  # Prefect, torch and transformers (about 4 s)

    try:
        res = privacy_utility(
            cfg,
            str(out),
            val,
            epsilons=epsilon,
            methods=method,
            privacies=privacy,
            baselines=baselines,
            local_only=local_only,
            mia_examples=mia_examples,
            max_new_tokens=max_new_tokens,
            notes=note,
            validation_examples=validation_examples,
            recipe_knobs={
                k: v
                for k, v in {
                    "dp_batch_multiplier": dp_batch_multiplier,
                    "dp_step_fraction": dp_step_fraction,
                    "dp_lr_multiplier": dp_lr_multiplier,
                }.items()
                if v is not None
            },
        )
    except (SilotuneError, ValueError) as exc:
        fail(str(exc))
    console.print(Path(res["paths"]["markdown"]).read_text())
    for k, p in res["paths"].items():
        console.print(f"{k}: {p}")
    console.print(f"MLflow run {res['mlflow_run_id']}")


def eval_cmd(
    config: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    harness: Annotated[
        str,
        typer.Option(
            help="Comma-separated lm-eval tasks: 'holdouts' (one task per silo holdout, generated locally), "
            "silotune_<silo>, or any task of the harness by name (needs its data, e.g. from the hub)."
        ),
    ] = "holdouts",
    adapter: Annotated[
        Path | None, typer.Option(help="PEFT adapter folder (default: the federation's final adapter).")
    ] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="The base model without adapter.")] = False,
    out: Annotated[Path, typer.Option(help="Folder of the generated tasks and harness.json.")] = Path(
        "silotune-eval"
    ),
    limit: Annotated[int | None, typer.Option(help="At most this many examples per task.")] = None,
    max_gen_toks: Annotated[int, typer.Option(help="Generation limit of the generated tasks.")] = 64,
) -> None:
    """Run EleutherAI's lm-evaluation-harness on the base model plus the federation's adapter; results to
    the federation's MLflow run and a Prefect artifact."""
    from silotune.config import check_local_paths, load_config  # imports torch (about 2 s)
    from silotune.federation.commit import load_state  # imports torch (about 2.5 s)
    from silotune.harness import final_adapter_dir
    from silotune.store import open_store

    try:
        cfg = load_config(config)
        check_local_paths(cfg)
        state = load_state(open_store(cfg.store), cfg.federation_id)
    except SilotuneError as exc:
        fail(str(exc))
    adapter_dir = None if base_only else (adapter or final_adapter_dir(cfg))
    if adapter_dir is None and not base_only:
        fail(f"no final adapter of {cfg.federation_id} in a local store: name one with --adapter")
    from flows.harness import harness_eval  # Prefect, lm-eval, torch and transformers (seconds)

    try:
        res = harness_eval(
            cfg,
            [t.strip() for t in harness.split(",") if t.strip()],
            str(adapter_dir) if adapter_dir else None,
            str(out),
            state.tracking_run_id if state else None,
            limit,
            max_gen_toks,
        )
    except SilotuneError as exc:
        fail(str(exc))
    from silotune.harness import harness_markdown

    console.print(harness_markdown(res["results"], title=f"lm-evaluation-harness on {cfg.federation_id}"))
    console.print(f"results: {res['path']}")
