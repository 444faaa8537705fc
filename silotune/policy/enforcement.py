"""What a silo flow calls before it reads any data: refuse (and log why), or return the config to run."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from silotune.config import FederationConfig, ModelSpec
from silotune.policy.acceptance import acceptance_fingerprint, acceptance_violations
from silotune.policy.check import PolicyRefusal, Violation, check_config
from silotune.policy.model import SiloPolicy

REFUSALS_LOG = "refusals.log"


def _log_refusal(policy: SiloPolicy, config: FederationConfig, violations: list[Violation]) -> Path:
    path = Path(policy.private_dir) / REFUSALS_LOG
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = json.dumps(
        {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "silo": policy.silo,
            "federation_id": config.federation_id,
            "fingerprint": acceptance_fingerprint(config),
            "violations": [v.to_dict() for v in violations],
        },
        sort_keys=True,
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    return path


def enforce(
    policy: SiloPolicy,
    config: FederationConfig,
    *,
    model_sha256: Callable[[ModelSpec], str] | None = None,
) -> FederationConfig:
    """What a silo flow calls first, before it reads data: refuse, or return the config to run.

    On any violation (the policy's rules, and acceptance when ``require_accepted_config``)
    one JSON line goes to ``<private_dir>/refusals.log`` (time, silo, federation id,
    fingerprint, violations), nothing else is written, and :class:`PolicyRefusal` is raised.
    Otherwise the config comes back with the silo's own ``private_dir``, ``train_path`` and
    ``eval_path`` (and ``device``, if it names one) from the policy.
    """
    violations = check_config(policy, config, model_sha256=model_sha256)
    if policy.require_accepted_config:
        violations.extend(acceptance_violations(policy, config))
    if violations:
        try:
            _log_refusal(policy, config, violations)
        except OSError as exc:  # the refusal stands even when it cannot be logged
            warnings.warn(f"silo {policy.silo}: cannot log the refusal ({exc})", stacklevel=2)
        raise PolicyRefusal(policy.silo, config.federation_id, violations)
    own = {"private_dir": policy.private_dir, "train_path": policy.train_path, "eval_path": policy.eval_path}
    if policy.device is not None:  # the silo's hardware is its own to name
        own["device"] = policy.device
    silos = [s.model_copy(update=own) if s.name == policy.silo else s for s in config.silos]
    return config.model_copy(update={"silos": silos})
