"""Policies for one-machine setups (demos, tests, ``stack up``): each silo allows exactly one config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from silotune.config import FederationConfig
from silotune.policy.acceptance import accept_config
from silotune.policy.files import dump_policy
from silotune.policy.model import PROTECTION_ORDER, DPPolicy, SiloPolicy, StoreKeysPolicy
from silotune.policy.stores import store_location


def local_policy(
    config: FederationConfig,
    silo: str,
    *,
    permissive: bool = False,
    coordinator_key: str | None = None,
    base_model_sha256: str | None = None,
) -> SiloPolicy:
    """A policy for ``silo`` that allows exactly ``config`` (demos, tests, ``stack up``).

    Strict (default): the config's own settings become the floors: its federation id, protection,
    signing, methods, DP settings (target ε as the cap, a fixed σ as the floor, δ as the cap) and
    store; acceptance required. ``permissive``: only the federation id, the store and the store's
    key variables are pinned; any protection, method and DP setting passes, and no acceptance is
    needed. Data paths and the private folder are the config's.
    """
    spec = config.silo(silo)
    sample, client = config.privacy.sample_dp, config.privacy.client_dp
    common: dict[str, Any] = {
        "silo": silo,
        "private_dir": spec.private_folder,
        "train_path": spec.train_path,
        "eval_path": spec.eval_path,
        "federations": [config.federation_id],
        "coordinator_key": coordinator_key,
        "base_model_sha256": base_model_sha256,
        "stores": [store_location(config.store).text],
        "store_keys": StoreKeysPolicy.from_spec(config.store),
        "allow_attack_simulation": spec.attack is not None or spec.poison is not None,
    }
    if permissive:
        return SiloPolicy(
            **common,
            methods=None,
            protection=list(PROTECTION_ORDER),
            require_signing=False,
            dp=DPPolicy(require_sample_dp=False),
            require_accepted_config=False,
        )
    dp = DPPolicy(
        require_sample_dp=sample is not None,
        max_epsilon=sample.target_epsilon if sample else None,
        min_noise_multiplier=sample.noise_multiplier if sample else None,
        max_delta=sample.delta if sample else None,
        require_client_dp=client is not None,
        max_client_epsilon=client.target_epsilon if client else None,
    )
    return SiloPolicy(
        **common,
        methods=sorted({config.method.name, config.method_for(silo).name}),
        protection=[config.security.protection],
        require_signing=config.security.signing,
        dp=dp,
        require_accepted_config=True,
    )


def write_local_policies(
    config: FederationConfig,
    folder: str | Path,
    *,
    permissive: bool = False,
    accept: bool = True,
) -> dict[str, Path]:
    """Write ``<folder>/<silo>.yaml`` for every silo of ``config`` (:func:`local_policy`, paths
    made absolute); with ``accept``, each silo also accepts the config when its policy requires
    it (creating the silo's signing key if missing, replacing an earlier acceptance)."""
    folder = Path(folder)
    out: dict[str, Path] = {}
    for s in config.silos:
        policy = local_policy(config, s.name, permissive=permissive)
        absolute = {
            k: str(Path(v).expanduser().resolve())
            for k in ("private_dir", "train_path", "eval_path")
            if (v := getattr(policy, k)) is not None
        }
        policy = policy.model_copy(update=absolute)
        out[s.name] = dump_policy(
            policy,
            folder / f"{s.name}.yaml",
            header=f"Policy of silo {s.name} allowing exactly federation {config.federation_id} "
            f"({'permissive' if permissive else 'strict'}; written by silotune for a one-machine setup).",
        )
        if accept and policy.require_accepted_config:
            accept_config(policy, config, replace=True, create_key=True)
    return out
