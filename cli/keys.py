"""``silotune keys``: silo identities (Ed25519) and the federation's shared CKKS key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import console, fail, load_config_file

keys_app = typer.Typer(no_args_is_help=True, help="Key material: silo identities, the shared CKKS key.")


@keys_app.command("setup")
def keys_setup(config: Annotated[Path, typer.Argument(help="Federation config (YAML).")]) -> None:
    """One machine holds every silo (embedded default, demos): create every key the config needs."""
    from silotune.keys import setup_local_keys  # imports torch (about 2.5 s)

    done = setup_local_keys(load_config_file(config))
    for line in done or ["nothing to do: every key already exists"]:
        console.print(line)


@keys_app.command("silo")
def keys_silo(
    silo: str,
    config: Annotated[Path, typer.Option(help="Federation config (YAML).")],
    overwrite: bool = False,
) -> None:
    """At a silo: create its Ed25519 signing key; give the printed public key file to the coordinator."""
    from silotune.keys import create_silo_identity  # imports torch (about 2.5 s)

    cfg = load_config_file(config)
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
    from silotune.keys import SiloVault, create_ckks_secret  # imports torch (about 2.5 s)

    cfg = load_config_file(config)
    vault = SiloVault.for_silo(cfg.silo(silo))
    try:
        create_ckks_secret(vault.ckks_path, cfg.security.ckks_preset)
    except FileExistsError as exc:
        fail(str(exc))
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
    from silotune.keys import CoordinatorKeys, SiloVault, export_ckks_public  # imports torch (about 2.5 s)

    cfg = load_config_file(config)
    dest = out or CoordinatorKeys.for_config(cfg).ckks_path
    export_ckks_public(SiloVault.for_silo(cfg.silo(silo)).ckks_path, dest)
    console.print(f"public context: {dest}")
