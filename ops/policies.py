"""The silos' policies on the stack, and federation configs made for the stack.

Each silo's worker is ``silotune silo join <silo> --policy <state>/policies/<silo>.yaml``: the policy
is loaded into the worker's process and every run is checked against it before any data is read
(:mod:`silotune.policy`). Each silo has its own folder under the state, ``silos/<silo>/``:
``private/`` is its ``private_dir`` (signing key, CKKS secret, noise secret, ledgers, accepted
configs, ``refusals.log``), shared with no other silo; ``data/`` holds the demo data of the default
policy. The coordinator's keys folder is ``coordinator/keys/``. Where the policies come from:

- ``up(config=...)`` (``silotune stack up --config federation.yaml``, repeatable): each config is
  rewritten for the stack by :func:`stack_config` (store, tracking, orchestration, the silos'
  private folders, the coordinator's keys folder; every key created on this machine and pinned with
  :func:`silotune.keys.pin_local_keys`) and written to ``federations/<federation_id>.yaml``
  (``silotune run`` it). Every silo's policy is then written *strict* from the configs it takes part
  in (:func:`silotune.policy.local_policy`): its federation ids, the configs' protection, signing,
  methods and DP settings as floors, the configs' data paths, this stack's S3 endpoint and key
  variables, the pinned coordinator key and base model; and the silo accepts each config (its signed
  fingerprint in ``private/accepted/``), so it runs each federation exactly as configured. A silo in
  several configs gets the weakest of their floors, while the acceptances still pin each
  federation's exact config. Existing policies are replaced.
- ``up()`` without a config keeps the policy files already in ``policies/`` (a silo's own, or written
  by an earlier ``up --config``) and writes a *default* policy for a silo that has none: any
  federation id and protection, DP optional, no acceptance, but uploads signed with pinned keys, the
  coordinator key of this stack pinned, the store pinned to this stack's S3 bucket and key variables,
  the private folder pinned, and the silo's data in ``silos/<silo>/data/`` (the deterministic demo
  data for the demo silos clinic, bank and lab; another silo's operator puts its files there). Such
  a policy runs only configs made for this stack: :func:`stack_config` (``silotune stack config``)
  pins the keys and folders.

A policy is read when its worker starts: after editing one, restart that silo's worker
(:func:`ops.stack.restart_worker`, or ``stack down`` and ``up``).

The library's config, keys and policy modules are imported inside the functions: they import torch
(about 4 s), which ``stack status`` and ``stack down`` do not need.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ops.state import Stack, StackError
from silotune.demo import DEMO_SILOS, make_demo_silos
from silotune.errors import SilotuneError


def _silo_folder(stack: Stack, silo: str) -> Path:
    """Create the silo's folder and private folder, readable by the owner only."""
    for d in (stack.silo_dir(silo), stack.private_dir(silo)):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
    return stack.private_dir(silo)


def stack_config(stack: Stack, config: Any) -> Any:
    """``config`` (a :class:`~silotune.config.FederationConfig`) as it runs on this stack, keys pinned.

    Replaced: ``store`` (this stack's bucket), ``tracking`` (this stack's MLflow server; the experiment
    and registered model are kept), ``orchestration.mode`` (``workpools``; the timeouts are kept), each
    silo's ``private_dir`` (``silos/<silo>/private``, its own) and ``work_pool`` (the stack's
    ``silo-<silo>``), and ``security.keys_dir`` (``coordinator/keys``). Data paths are made absolute.
    Then :func:`silotune.keys.pin_local_keys` creates what is missing (the silos' signing keys, the
    coordinator's, for CKKS the shared context) and pins the public keys in the config (signing on):
    they are part of the fingerprint every silo accepts.
    """
    # the library imports torch (~4 s): ops.stack imports this module for `stack status`/`down`
    from silotune.config import parse_config
    from silotune.keys import pin_local_keys

    unknown = [s.name for s in config.silos if s.name not in stack.silos]
    if unknown:
        raise StackError(
            f"federation {config.federation_id}: silo(s) {', '.join(unknown)} not on this stack "
            f"(silos {', '.join(stack.silos)}; `stack up --silos` names them)"
        )
    data = config.model_dump(mode="json")
    tracking = stack.tracking_spec(config.tracking.experiment)
    if config.tracking.registered_model:
        tracking["registered_model"] = config.tracking.registered_model
    data.update(
        store=stack.store_spec(),
        tracking=tracking,
        orchestration={**data["orchestration"], "mode": "workpools"},
        security={**data["security"], "keys_dir": str(stack.keys_dir)},
    )
    for silo in data["silos"]:
        silo.update(private_dir=str(_silo_folder(stack, silo["name"])), work_pool=None)
        for key in ("train_path", "eval_path"):
            if silo.get(key):
                silo[key] = str(Path(silo[key]).expanduser().resolve())
    try:
        return pin_local_keys(parse_config(data, source=f"federation {config.federation_id} on the stack"))
    except SilotuneError as exc:
        raise StackError(str(exc)) from None


def _stack_store(stack: Stack) -> Any:
    # the library imports torch (~4 s): ops.stack imports this module for `stack status`/`down`
    from silotune.config import StoreSpec

    return StoreSpec(**stack.store_spec())


def _coordinator_public_key(stack: Stack) -> Path:
    """The coordinator's public key file (its signing key created once, kept)."""
    # the library imports torch (~4 s): ops.stack imports this module for `stack status`/`down`
    from silotune.keys import CoordinatorKeys

    return CoordinatorKeys(stack.keys_dir).create_signing_key()


def _default_data(stack: Stack, silo: str) -> tuple[Path, Path]:
    """The data of a silo's default policy: ``silos/<silo>/data/{train,eval}.jsonl`` (demo data written
    for the demo silos when missing)."""
    d = stack.data_dir(silo)
    train, holdout = d / "train.jsonl", d / "eval.jsonl"
    if train.is_file() and holdout.is_file():
        return train, holdout
    if silo not in {s.name for s in DEMO_SILOS}:
        raise StackError(
            f"silo {silo}: no data for its default policy; put its training data in {train} and its "
            f"holdout in {holdout}, or start the stack with `--config` (a federation config naming its data)"
        )
    _silo_folder(stack, silo)
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=stack.root) as tmp:
        made = make_demo_silos(tmp, seed=0)[silo]
        shutil.copyfile(made["train"], train)
        shutil.copyfile(made["eval"], holdout)
    return train, holdout


def default_policy(stack: Stack, silo: str) -> Any:
    """A silo's policy on this stack when no config names it (see the module docstring).

    Pinned: the silo's private folder and data, this stack's S3 bucket and key variables, signed
    uploads (so the config must pin every silo's public key) and the coordinator key of this stack.
    Open: the federation id, the protection, the method, DP; no acceptance needed.
    """
    # the library imports torch (~4 s): ops.stack imports this module for `stack status`/`down`
    from silotune.policy import PROTECTION_ORDER, DPPolicy, SiloPolicy, StoreKeysPolicy, store_location

    train, holdout = _default_data(stack, silo)
    store = _stack_store(stack)
    return SiloPolicy(
        silo=silo,
        private_dir=str(_silo_folder(stack, silo)),
        train_path=str(train),
        eval_path=str(holdout),
        federations=["*"],
        coordinator_key=str(_coordinator_public_key(stack)),
        methods=None,
        protection=list(PROTECTION_ORDER),
        require_signing=True,
        dp=DPPolicy(require_sample_dp=False),
        stores=[store_location(store).text],
        store_keys=StoreKeysPolicy.from_spec(store),
        require_accepted_config=False,
    )


def _weakest(values: list[Any], pick: Any) -> Any:
    """None when any value is None (no floor or cap), else ``pick`` of them."""
    return None if any(v is None for v in values) else pick(values)


def merge_policies(policies: list[Any]) -> Any:
    """One policy for a silo that takes part in several federations, from their strict policies.

    Federations, methods and protection schemes: the union; signing: required if every one requires
    it; DP: the weakest floors (a cap or floor only when every policy has one). Data, private folder,
    stores and key variables must agree. Acceptance stays required, so each federation still runs only
    with the exact config its silo accepted.
    """
    # the library imports torch (~4 s): ops.stack imports this module for `stack status`/`down`
    from silotune.policy import PROTECTION_ORDER, DPPolicy, SiloPolicy

    first = policies[0]
    if len(policies) == 1:
        return first
    agreed = ("silo", "private_dir", "train_path", "eval_path", "stores", "store_keys", "coordinator_key")
    for field_ in agreed:
        values = {json.dumps(getattr(p, field_), default=str, sort_keys=True) for p in policies}
        if len(values) > 1:
            raise StackError(
                f"silo {first.silo}: the configs disagree on its {field_} ({', '.join(sorted(values))}); "
                "a silo has one data set, private folder and store"
            )
    dps = [p.dp for p in policies]
    sample = all(d.require_sample_dp for d in dps)
    client = all(d.require_client_dp for d in dps)
    dp = DPPolicy(
        require_sample_dp=sample,
        max_epsilon=_weakest([d.max_epsilon for d in dps], max) if sample else None,
        max_lifetime_epsilon=_weakest([d.max_lifetime_epsilon for d in dps], max) if sample else None,
        min_noise_multiplier=_weakest([d.min_noise_multiplier for d in dps], min) if sample else None,
        max_delta=_weakest([d.max_delta for d in dps], max) if sample else None,
        require_client_dp=client,
        max_client_epsilon=_weakest([d.max_client_epsilon for d in dps], max) if client else None,
    )
    federations: list[str] = []
    for p in policies:
        federations += [f for f in p.federations if f not in federations]
    any_method = any(p.methods is None for p in policies)
    methods = None if any_method else sorted({m for p in policies for m in p.methods or []})
    shas = {p.base_model_sha256 for p in policies}
    return SiloPolicy(
        **{
            **first.model_dump(),
            "federations": federations,
            "methods": methods,
            "protection": [x for x in PROTECTION_ORDER if any(x in p.protection for p in policies)],
            "require_signing": all(p.require_signing for p in policies),
            "dp": dp,
            "base_model_sha256": shas.pop() if len(shas) == 1 else None,
            "allow_attack_simulation": any(p.allow_attack_simulation for p in policies),
            "require_accepted_config": True,
        }
    )


def write_policies(stack: Stack, configs: list[Any] | None = None, *, echo: Any = print) -> dict[str, Path]:
    """Every silo's policy file, ``policies/<silo>.yaml``; returns them by silo.

    A silo in ``configs`` (configs made for this stack by :func:`stack_config`) gets the strict policy
    of the configs it takes part in (:func:`silotune.policy.local_policy`, merged by
    :func:`merge_policies`), with this stack's coordinator key and the base model's weights pinned, and
    accepts each of those configs. Any other silo keeps its policy file, or gets :func:`default_policy`.
    Each policy must load and its data files must exist, else :class:`StackError` (before any worker
    starts).
    """
    # the library imports torch (~4 s): ops.stack imports this module for `stack status`/`down`
    from silotune.policy import accept_config, dump_policy, load_policy, local_policy, model_weights_sha256

    configs = list(configs or [])
    coordinator_key = str(_coordinator_public_key(stack))
    hashes: dict[str, str | None] = {}

    def model_sha(cfg: Any) -> str | None:
        key = cfg.model.model_dump_json()
        if key not in hashes:
            try:
                hashes[key] = model_weights_sha256(cfg.model)
            except (SilotuneError, OSError) as exc:
                echo(f"policies         base model {cfg.model.name_or_path} not pinned: {exc}")
                hashes[key] = None
        return hashes[key]

    out: dict[str, Path] = {}
    for silo in stack.silos:
        path = stack.policy_path(silo)
        mine = [c for c in configs if silo in {s.name for s in c.silos}]
        try:
            if mine:
                policy = merge_policies(
                    [
                        local_policy(c, silo, coordinator_key=coordinator_key, base_model_sha256=model_sha(c))
                        for c in mine
                    ]
                )
                fids = ", ".join(c.federation_id for c in mine)
                dump_policy(
                    policy,
                    path,
                    header=f"Policy of silo {silo} on this stack: strict, for federation(s) {fids} (the "
                    "configs' protection, signing, methods and DP as floors; each config accepted). Written "
                    "by `silotune stack up --config`; restart the silo's worker after editing it.",
                )
                for c in mine:
                    accept_config(policy, c, replace=True, create_key=True)
            elif not path.is_file():
                dump_policy(
                    default_policy(stack, silo),
                    path,
                    header=f"Default policy of silo {silo} on this stack (no federation config given to "
                    "`silotune stack up`): any federation, protection and DP, but signed uploads, this "
                    "stack's coordinator key and S3 bucket, and the silo's own folders. Tighten it (then "
                    "restart the silo's worker) or start the stack with `--config`.",
                )
            policy = load_policy(path)
        except SilotuneError as exc:
            raise StackError(f"silo {silo}: {exc}") from None
        if policy.silo != silo:
            raise StackError(f"{path} is the policy of silo {policy.silo!r}, not {silo!r}")
        for key in ("train_path", "eval_path"):
            value = getattr(policy, key)
            # A remote silo's data is on its own host (`silo join` checks it there).
            if value is not None and not stack.remote_silos and not Path(value).is_file():
                raise StackError(f"silo {silo}: {key} of its policy {path}: file not found: {value}")
        out[silo] = path
    return out


def as_configs(config: Any) -> list[Any]:
    """``up``'s ``config``: None, a config or a path, or a list of them, as FederationConfigs."""
    # the library imports torch (~4 s): ops.stack imports this module for `stack status`/`down`
    from silotune.config import FederationConfig, load_config

    if config is None:
        return []
    items = [config] if isinstance(config, FederationConfig | str | Path) else list(config)
    out = []
    for item in items:
        try:
            out.append(item if isinstance(item, FederationConfig) else load_config(item))
        except SilotuneError as exc:
            raise StackError(str(exc)) from None
    ids = [c.federation_id for c in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise StackError(f"federation id(s) {', '.join(dup)} given more than once")
    return out


def configure(stack: Stack, configs: list[Any], *, echo: Any = print) -> list[Any]:
    """Make each config for this stack (:func:`stack_config`), write it to ``federations/<id>.yaml``,
    then write every silo's policy (:func:`write_policies`). Returns the configs made for the stack."""
    # the library imports torch (~4 s): ops.stack imports this module for `stack status`/`down`
    from silotune.config import dump_config

    made = [stack_config(stack, c) for c in configs]
    for c in made:
        stack.config_path(c.federation_id).parent.mkdir(parents=True, exist_ok=True)
        dump_config(c, stack.config_path(c.federation_id))
    write_policies(stack, made, echo=echo)
    return made
