"""``silotune stack``: the one-machine stack on loopback (up, down, status, config), and ``worker``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import console, fail, load_config_file
from ops.policies import stack_config as make_stack_config
from ops.state import Stack, StackError

stack_app = typer.Typer(
    no_args_is_help=True, help="The real stack on loopback: S3, Prefect server, MLflow, workers."
)


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
    host: Annotated[
        str | None,
        typer.Option(
            help="Address the Prefect API, MLflow and S3 listen on (default 127.0.0.1; others need --tls)."
        ),
    ] = None,
    tls: Annotated[
        bool | None,
        typer.Option(
            "--tls/--no-tls",
            help="HTTPS on every service with the stack's CA (STATE/tls/ca.pem, made once; clients pin it), "
            "MLflow basic auth (one user per role, STATE/mlflow/users.json).",
        ),
    ] = None,
    remote_silos: Annotated[
        bool | None,
        typer.Option(
            "--remote-silos/--local-silos",
            help="The silos' workers run on their own hosts (`stack admit`, then `silo join` there).",
        ),
    ] = None,
) -> None:
    """Start SeaweedFS, the Prefect server, MLflow and one worker per pool; return when all are healthy.

    Each silo's worker is `silotune silo join SILO --policy STATE/policies/SILO.yaml`: every run is
    checked against that policy before the silo reads any data. Each silo's private folder is
    STATE/silos/SILO/private (its own). Edit a policy, then restart the stack, to change what a silo runs.
    """
    from ops.stack import up  # boto3 (about 0.15 s): not at every CLI start

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
            host=host,
            tls=tls,
            remote_silos=remote_silos,
        )
    except StackError as exc:
        fail(str(exc))
    console.print(f"Prefect UI: [bold]{st.prefect_ui}[/]   MLflow UI: [bold]{st.mlflow_uri}[/]")
    for c in config or []:
        fid = load_config_file(c).federation_id
        console.print(f"run {fid} with: silotune run {st.config_path(fid)} --state-dir {state_dir}")
    console.print(f"stop with: silotune stack down --state-dir {state_dir}")


@stack_app.command("admit")
def stack_admit(
    silo: Annotated[str, typer.Argument(help="The silo to admit (one of the stack's silos).")],
    out: Annotated[Path, typer.Option(help="A new folder: what the silo's host needs to join.")],
    train_path: Annotated[str | None, typer.Option(help="The silo's training data, on its host.")] = None,
    eval_path: Annotated[str | None, typer.Option(help="The silo's holdout, on its host.")] = None,
    state_dir: _STATE = Path(".silotune/stack"),
) -> None:
    """Write a silo's folder for its own host: its policy, private folder (moved out of the stack's
    state), the CA and silo.env (its S3 identity, the Prefect API and auth string); see ops/admission.py.
    """
    from ops.admission import admit  # imports the policy module (torch, about 2.5 s)

    st = Stack.load(state_dir)
    if not st.ports:
        fail(f"no stack in {state_dir} (`silotune stack up --remote-silos` first)")
    try:
        admit(st, silo, out, train_path=train_path, eval_path=eval_path, echo=console.print)
    except StackError as exc:
        fail(str(exc))


@stack_app.command("down")
def stack_down(state_dir: _STATE = Path(".silotune/stack")) -> None:
    """Stop every part of the stack; data stays in the state folder."""
    from ops.stack import down  # boto3 (about 0.15 s): not at every CLI start

    try:
        down(state_dir, echo=console.print)
    except StackError as exc:
        fail(str(exc))


@stack_app.command("status")
def stack_status(state_dir: _STATE = Path(".silotune/stack")) -> None:
    """Which parts run, and where the UIs are."""
    from ops.stack import status  # boto3 (about 0.15 s): not at every CLI start

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
    from silotune.config import dump_config  # imports torch (about 2 s)

    st = Stack.load(state_dir)
    if not st.ports:
        fail(f"no stack in {state_dir} (`silotune stack up` first)")
    try:
        dump_config(make_stack_config(st, load_config_file(config)), out)
    except StackError as exc:
        fail(str(exc))
    console.print(f"wrote {out}")


def worker(
    pool: Annotated[str, typer.Argument(help="The work pool to serve (e.g. 'coordinator').")],
    query_seconds: Annotated[
        float, typer.Option(help="Fallback polling interval (runs start on their Scheduled event).")
    ] = 5.0,
    role: Annotated[
        str | None,
        typer.Option(
            help="'coordinator' (federation and retraining flows too) or 'silo' (the silo flows only); "
            "default: 'coordinator' for the pool named coordinator, else 'silo'. No other flow is run."
        ),
    ] = None,
) -> None:
    """Serve a work pool in this process (flow runs execute in-process; models stay loaded)."""
    from ops.worker import serve  # Prefect (about 1 s), after offline()

    role = role or ("coordinator" if pool == "coordinator" else "silo")
    if role not in ("coordinator", "silo"):
        fail(f"--role: {role!r} is not 'coordinator' or 'silo'")
    serve(pool, role=role, query_seconds=query_seconds)  # type: ignore[arg-type]


ca_app = typer.Typer(
    no_args_is_help=True,
    help="The consortium's small certificate authority: every link between hosts is HTTPS and pins it.",
)


@ca_app.command("init")
def ca_init(
    folder: Annotated[Path, typer.Option("--dir", help="Where the CA lives (ca.pem; ca.key, mode 0600).")],
    host: Annotated[
        list[str] | None,
        typer.Option(help="Also make server.pem/server.key for this address or DNS name (repeatable)."),
    ] = None,
) -> None:
    """Make the CA (kept if it exists) and, with --host, a server certificate signed by it."""
    from ops.tls import TLSError, make_ca, make_server_cert

    try:
        console.print(
            f"CA: {make_ca(folder)} (its key {folder / 'ca.key'} stays with the consortium's admin)"
        )
        if host:
            cert, key = make_server_cert(folder, host)
            console.print(f"server certificate for {', '.join(host)}: {cert} (key {key})")
    except TLSError as exc:
        fail(str(exc))


@ca_app.command("cert")
def ca_cert(
    host: Annotated[list[str], typer.Option(help="Address or DNS name the certificate names (repeatable).")],
    folder: Annotated[Path, typer.Option("--dir", help="The CA's folder.")],
    name: Annotated[str, typer.Option(help="File name: NAME.pem and NAME.key in --dir.")] = "server",
    days: Annotated[int, typer.Option(help="Validity in days.")] = 397,
) -> None:
    """Issue a server certificate signed by the CA (e.g. to renew the coordinator's, or for a new name)."""
    from ops.tls import TLSError, make_server_cert

    try:
        cert, key = make_server_cert(folder, host, name=name, days=days)
    except TLSError as exc:
        fail(str(exc))
    console.print(f"server certificate for {', '.join(host)}: {cert} (key {key})")
