"""Admitting a silo that runs on its own host: the folder its operator needs to ``silotune silo join``.

A stack started with ``remote_silos`` (``stack up --remote-silos --host ADDR --tls``) starts only the
coordinator's worker; each silo's worker runs on the silo's host. :func:`admit` writes, into a new
folder for that host:

- ``policy.yaml``: the silo's policy as the stack wrote it (strict from the federation configs, or the
  stack's default), with the silo's own paths: ``private_dir`` (``private/`` here), its data (its own
  files, given with ``train_path``/``eval_path``), the coordinator's public key (copied here);
- ``private/``: the silo's private folder (its signing key, accepted configs), *moved* out of the
  coordinator's state: the coordinator keeps no silo secret;
- ``ca.pem``: the consortium's CA, which the silo pins for every link;
- ``silo.env`` (mode 0600): the silo's S3 identity (its keys, limited to its own prefixes), the
  Prefect API URL and auth string, and the variables that pin the CA (Prefect, boto3).

The operator of the silo's host then runs ``set -a; . silo.env; set +a; silotune silo join SILO
--policy policy.yaml``. Hand the folder over on a channel you trust (it holds the silo's keys).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ops.credentials import write_secret
from ops.state import REGION, Stack, StackError
from silotune.errors import SilotuneError


def silo_env(stack: Stack, silo: str, folder: Path) -> dict[str, str]:
    """The environment of silo ``silo``'s worker on its own host, its files in ``folder``."""
    c = stack.credentials()[f"silo-{silo}"]
    env = {
        "PREFECT_API_URL": stack.prefect_api,
        "PREFECT_API_AUTH_STRING": stack.prefect_auth_string(),
        "PREFECT_HOME": str(folder / "prefect"),
        "AWS_ACCESS_KEY_ID": c["access_key"],
        "AWS_SECRET_ACCESS_KEY": c["secret_key"],
        "AWS_DEFAULT_REGION": REGION,
    }
    if stack.tls:
        ca = str(folder / "ca.pem")
        env.update(PREFECT_API_SSL_CERT_FILE=ca, AWS_CA_BUNDLE=ca)
    return env


def admit(
    stack: Stack,
    silo: str,
    out: Path | str,
    *,
    train_path: str | None = None,
    eval_path: str | None = None,
    echo: Any = print,
) -> Path:
    """Write silo ``silo``'s folder for its own host into ``out`` (new or empty); returns its policy file."""
    # the policy module imports torch (~4 s): `stack status`/`down` import ops without it
    from silotune.policy import dump_policy, load_policy

    out = Path(out).resolve()
    if silo not in stack.silos:
        raise StackError(f"silo {silo!r} is not on this stack (silos: {', '.join(stack.silos)})")
    if out.exists() and any(out.iterdir()):
        raise StackError(f"{out} is not empty: admit a silo into a new folder")
    try:
        policy = load_policy(stack.policy_path(silo))
    except (SilotuneError, OSError) as exc:
        raise StackError(
            f"silo {silo}: no policy to hand over ({exc}); `silotune stack up` writes it"
        ) from None
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.chmod(0o700)
    private = out / "private"
    if stack.private_dir(silo).is_dir():
        shutil.copytree(stack.private_dir(silo), private)
        shutil.rmtree(stack.silo_dir(silo))  # the coordinator keeps no silo secret
    private.mkdir(mode=0o700, exist_ok=True)
    update: dict[str, Any] = {"private_dir": str(private)}
    if policy.coordinator_key:
        shutil.copyfile(policy.coordinator_key, out / "coordinator.pub.pem")
        update["coordinator_key"] = str(out / "coordinator.pub.pem")
    if train_path is not None:
        update["train_path"] = str(Path(train_path).resolve())
    if eval_path is not None:
        update["eval_path"] = str(Path(eval_path).resolve())
    if stack.tls:
        shutil.copyfile(stack.tls_dir / "ca.pem", out / "ca.pem")
    policy_file = out / "policy.yaml"
    dump_policy(
        policy.model_copy(update=update),
        policy_file,
        header=f"Policy of silo {silo}, admitted to the federation(s) of the stack at {stack.prefect_api}. "
        "Kept at the silo: review it; `silotune silo join` checks every run against it.",
    )
    env = silo_env(stack, silo, out)
    write_secret(out / "silo.env", "".join(f"{k}={v}\n" for k, v in env.items()))
    echo(f"silo {silo}: {out} (policy.yaml, private/, silo.env{', ca.pem' if stack.tls else ''})")
    echo(f"  on its host: set -a; . {out}/silo.env; set +a; silotune silo join {silo} --policy {policy_file}")
    return policy_file


def read_env(path: Path | str) -> dict[str, str]:
    """A ``silo.env`` file as a dict (``KEY=VALUE`` lines)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v
    return out
