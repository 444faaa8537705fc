"""The silo's signed acceptance of one federation config.

:func:`accept_config` signs the config's fingerprint (:func:`acceptance_fingerprint`, which leaves
out :data:`MUTABLE_FIELDS`) into ``<private_dir>/accepted/<federation_id>.json``;
:func:`accepted_fingerprint` reads it back, verified; :func:`acceptance_violations` is what
:func:`~silotune.policy.enforcement.enforce` checks on every run.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from silotune.config import FederationConfig, ModelSpec
from silotune.crypto.signing import SignatureError, SiloKeyPair
from silotune.errors import SilotuneError
from silotune.keys import write_private
from silotune.policy.check import PolicyRefusal, Violation, check_config, rule_line
from silotune.policy.model import PolicyError, SiloPolicy

# Config fields outside the acceptance fingerprint: they may change between runs of an accepted
# federation (e.g. on resume) and are still checked against the policy on every run.
MUTABLE_FIELDS: tuple[str, ...] = (
    "rounds",
    "tracking",
    "evaluation",
    "tags",
    "store",
    "orchestration",
    "silos[].train_path",
    "silos[].eval_path",
    "silos[].private_dir",
    "silos[].work_pool",
)
# Per-silo fields every silo replaces by its own (its policy's) and that resolve per machine.
_PER_MACHINE_SILO_FIELDS = {"train_path": "", "eval_path": None, "private_dir": None, "work_pool": None}

ACCEPTANCE_PREFIX = b"silotune/config-acceptance/v1\x00"


def acceptance_fingerprint(config: FederationConfig) -> str:
    """The fingerprint a silo accepts: ``config.fingerprint()`` with each silo's per-machine fields
    (train_path, eval_path, private_dir, work_pool) cleared.

    Every silo replaces those by its own, and a relative data path in a YAML config resolves
    against each machine's folder, so the coordinator and every silo get the same value from
    their own copy of the config.
    """
    silos = [s.model_copy(update=_PER_MACHINE_SILO_FIELDS) for s in config.silos]
    return config.model_copy(update={"silos": silos}).fingerprint()


def acceptance_message(silo: str, federation_id: str, fingerprint: str) -> bytes:
    """The bytes a silo signs to accept a config.

    ``b"silotune/config-acceptance/v1\\x00"`` then, for each of silo, federation id and
    fingerprint, its UTF-8 length as a big-endian u32 followed by its UTF-8 bytes.
    """
    parts = [ACCEPTANCE_PREFIX]
    for value in (silo, federation_id, fingerprint):
        raw = value.encode()
        parts += [struct.pack(">I", len(raw)), raw]
    return b"".join(parts)


def acceptance_path(policy: SiloPolicy, federation_id: str) -> Path:
    return Path(policy.private_dir) / "accepted" / f"{federation_id}.json"


def _create_signing_key(policy: SiloPolicy) -> None:
    vault = policy.vault()
    if not vault.signing_path.exists():
        vault.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        SiloKeyPair.generate().save(vault.signing_path, vault.root / "signing.pub.pem")


def accept_config(
    policy: SiloPolicy,
    config: FederationConfig,
    *,
    replace: bool = False,
    create_key: bool = False,
    model_sha256: Callable[[ModelSpec], str] | None = None,
) -> Path:
    """Sign ``config``'s acceptance fingerprint with the silo's key; returns the acceptance file.

    Raises :class:`PolicyRefusal` when the config breaks the policy, and :class:`PolicyError`
    when the federation was accepted with another fingerprint (unless ``replace``). The silo's
    signing key is ``<private_dir>/signing.pem``; ``create_key`` creates it when missing (its
    public half goes to ``signing.pub.pem``, to register with the coordinator).
    """
    violations = check_config(policy, config, model_sha256=model_sha256)
    if violations:
        raise PolicyRefusal(policy.silo, config.federation_id, violations)
    fid, fp = config.federation_id, acceptance_fingerprint(config)
    path = acceptance_path(policy, fid)
    if path.exists() and not replace:
        try:
            previous = accepted_fingerprint(policy, fid)
        except SilotuneError:
            previous = None  # unreadable or tampered: replacing it is the fix
        if previous is not None and previous != fp:
            raise PolicyError(
                f"silo {policy.silo}: federation {fid} was accepted with fingerprint {previous}; accepting "
                f"{fp} instead changes what this silo runs: pass replace=True (--replace) to do so"
            )
    if create_key:
        _create_signing_key(policy)
    key = policy.vault().signing_key()
    signature = key.private_key.sign(acceptance_message(policy.silo, fid, fp))
    doc = {
        "silo": policy.silo,
        "federation_id": fid,
        "fingerprint": fp,
        "signature": signature.hex(),
        "accepted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_private(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    return path


def accepted_fingerprint(policy: SiloPolicy, federation_id: str) -> str | None:
    """The fingerprint this silo accepted for ``federation_id``, verified; None if never accepted.

    A file that is unreadable, for another silo or federation, or whose signature does not
    verify with the silo's own key raises :class:`~silotune.crypto.signing.SignatureError`.
    """
    path = acceptance_path(policy, federation_id)
    if not path.is_file():
        return None

    def bad(why: str) -> SignatureError:
        return SignatureError(
            policy.silo, "invalid", f"acceptance file {path} {why}; re-run `silotune silo accept`"
        )

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise bad(f"is unreadable ({exc})") from None
    if not isinstance(doc, dict):
        raise bad("is not a JSON object")
    fp, sig = doc.get("fingerprint"), doc.get("signature")
    if doc.get("federation_id") != federation_id or doc.get("silo", policy.silo) != policy.silo:
        raise bad("is for another silo or federation")
    if not isinstance(fp, str) or not isinstance(sig, str):
        raise bad("has no fingerprint or signature")
    try:
        signature = bytes.fromhex(sig)
    except ValueError:
        raise bad("has a signature that is not hex") from None
    public = policy.vault().signing_key().public_key
    try:
        public.verify(signature, acceptance_message(policy.silo, federation_id, fp))
    except InvalidSignature:
        raise bad("does not verify with this silo's key (altered, or signed with another key)") from None
    return fp


# flows/retraining.py: <federation_id>-<%Y%m%d-%H%M%S> (runs before seconds were added: %Y%m%d-%H%M)
_RETRAIN_STAMP = re.compile(r"-\d{8}-\d{4}(?:\d{2})?$")


def retraining_base(config: FederationConfig) -> str | None:
    """The base federation id of a scheduled retraining run, or None when ``config`` is not one."""
    base = config.tags.get("silotune.retraining_of")
    stamp = _RETRAIN_STAMP.search(config.federation_id)
    if not base or stamp is None:
        return None
    prefix = config.federation_id[: stamp.start()]
    return base if base.startswith(prefix) and prefix else None


def acceptance_violations(policy: SiloPolicy, config: FederationConfig) -> list[Violation]:
    rule = rule_line("require_accepted_config", True)
    fid = config.federation_id
    try:
        accepted = accepted_fingerprint(policy, fid)
        base = retraining_base(config)
        if accepted is None and base is not None:
            # A scheduled retraining run (a new id, ``<base>-<UTC stamp>``) runs under the acceptance of
            # its base federation, but only with exactly the accepted config: the fingerprint is
            # compared with the id set back to the base. ε still composes per dataset in the ledger.
            base_accepted = accepted_fingerprint(policy, base)
            if base_accepted is not None:
                config = config.model_copy(update={"federation_id": base})
                fid, accepted = base, base_accepted
    except SilotuneError as exc:
        return [Violation("fingerprint", rule, str(exc))]
    if accepted is None:
        return [
            Violation(
                "federation_id",
                rule,
                f"this silo has not accepted federation {fid} "
                "(run `silotune silo accept CONFIG --policy FILE`)",
            )
        ]
    fp = acceptance_fingerprint(config)
    if fp != accepted:
        return [
            Violation(
                "fingerprint",
                rule,
                f"config fingerprint {fp} differs from the one this silo accepted ({accepted})",
            )
        ]
    return []
