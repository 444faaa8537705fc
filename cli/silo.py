"""``silotune silo``: commands run at a silo: its policy (init, show, check), ``accept``, its own
``ledger``, and ``join`` (serve the silo's pool against the coordinator's Prefect API)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import console, fail, load_config_file
from silotune.errors import SilotuneError

silo_app = typer.Typer(no_args_is_help=True, help="Commands run at a silo.")


policy_app = typer.Typer(
    no_args_is_help=True,
    help="The silo's own policy file: what this silo agrees to run (kept at the silo, never sent to it).",
)
silo_app.add_typer(policy_app, name="policy")


def _load_policy(path: Path) -> Any:
    from silotune.policy import PolicyError, load_policy  # imports torch (about 2.5 s)

    try:
        return load_policy(path)
    except PolicyError as exc:
        fail(str(exc))


def _print_policy(policy: Any, source: Path | str) -> None:
    """A human summary of a silo policy (a rich table)."""
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
    from silotune.policy import (  # imports torch (about 2.5 s)
        DPPolicy,
        SiloPolicy,
        StoreKeysPolicy,
        dump_policy,
        model_weights_sha256,
        store_location,
    )

    if out.exists() and not force:
        fail(f"{out} exists; pass --force to replace it")
    cfg = load_config_file(from_config) if from_config is not None else None
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
        fail("pass --federation ID (repeatable; patterns such as 'retrain-*' too) or --from-config CONFIG")
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
        fail(f"cannot build the policy: {exc}")
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
    # silotune.policy imports torch (about 2.5 s): not at every CLI start
    from silotune.policy import Violation, acceptance_fingerprint, accepted_fingerprint, check_config

    pol, cfg = _load_policy(policy), load_config_file(config)
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
    # silotune.policy imports torch (about 2.5 s): not at every CLI start
    from silotune.policy import PolicyRefusal, accept_config, acceptance_fingerprint

    pol, cfg = _load_policy(policy), load_config_file(config)
    try:
        path = accept_config(pol, cfg, replace=replace, create_key=create_key)
    except PolicyRefusal as exc:
        _print_violations(exc.violations, f"silo {pol.silo} refuses federation {cfg.federation_id}:")
        raise typer.Exit(1) from None
    except SilotuneError as exc:
        hint = "" if create_key else " (pass --create-key to create the silo's signing key)"
        fail(f"{exc}{hint if 'no signing key' in str(exc) else ''}")
    console.print(
        f"silo {pol.silo} accepted federation {cfg.federation_id} (fingerprint "
        f"{acceptance_fingerprint(cfg)}): {path}"
    )


@silo_app.command("ledger")
def silo_ledger(
    policy: Annotated[Path, typer.Option(help="The silo's policy file (its private folder has the ledger).")],
) -> None:
    """The silo's own privacy books: every release it made, ε per federation and per dataset (lifetime)."""
    from silotune.privacy.ledger import SiloLedger  # imports torch (about 2.5 s)

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
    device: Annotated[
        str | None,
        typer.Option(
            help="Where this silo trains: auto, cpu, cuda, cuda:N (overrides the policy's and config's)."
        ),
    ] = None,
) -> None:
    """Join a federation from a silo: serve the silo's pool against the coordinator's Prefect API.

    Every run is checked against the silo's policy (--policy) before any data is read; the silo's data
    paths and private folder come from the policy (--train-path/--eval-path override it in this process).
    The silo's S3 keys come from its own environment (the variable names the policy's store_keys allow).
    """
    if policy is None:
        fail(
            "silo join needs the silo's policy: --policy FILE (create one with `silotune silo policy init "
            f"{name} --out FILE`); a silo runs only the configs its own policy allows"
        )
    assert policy is not None
    pol = _load_policy(policy)
    if pol.silo != name:
        fail(f"{policy} is the policy of silo {pol.silo!r}, not {name!r}")
    overrides = {k: v for k, v in (("train_path", train_path), ("eval_path", eval_path)) if v is not None}
    if overrides:
        pol = pol.model_copy(update={k: str(Path(v).resolve()) for k, v in overrides.items()})
    if device is not None:
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+", device):
            fail(f"--device: {device!r} is not a device; use auto, cpu, cuda or cuda:N")
        pol = pol.model_copy(update={"device": device})
    for key in ("train_path", "eval_path"):
        value = getattr(pol, key)
        if value is not None and not Path(value).is_file():
            fail(f"{key}: file not found: {value} (policy {policy})")
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    if not os.environ.get("PREFECT_API_URL"):
        fail("no Prefect API: pass --api-url https://<coordinator>:4200/api or set PREFECT_API_URL")
    from ops.tls import TLSError, probe  # cryptography (about 0.1 s)

    try:  # plain HTTP only to loopback; an HTTPS server must pass the pinned CA ($PREFECT_API_SSL_CERT_FILE)
        api = os.environ["PREFECT_API_URL"].rstrip("/")
        probe(f"{api}/health", os.environ.get("PREFECT_API_SSL_CERT_FILE"), "--api-url / $PREFECT_API_URL")
    except TLSError as exc:
        fail(str(exc))
    from ops.worker import ensure_silo_deployments, serve  # Prefect (about 1 s), after --api-url is set
    from tasks.runtime import register_silo_policy  # Prefect and torch (about 2.7 s)

    _print_policy(pol, policy)
    register_silo_policy(pol)
    pool = pool or f"silo-{name}"
    created = ensure_silo_deployments(pool)
    if created:
        console.print(f"registered {', '.join(created)}")
    console.print(f"silo {name}: serving pool {pool} at {os.environ['PREFECT_API_URL']}")
    serve(pool, query_seconds=query_seconds)
