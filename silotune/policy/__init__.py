"""The silo's own policy: what it agrees to run, checked by the silo on every run.

Threat model (issue 11): the coordinator, the Prefect server and the storage
operator may be actively malicious. They may send any :class:`FederationConfig`
as a flow parameter: drop DP, set ``security.protection: none``, move
``private_dir`` (a fresh ledger and noise secret) or point ``store`` at an endpoint
they control. The silo's machine, its private folder and its policy file are
trusted by the silo alone, so the policy file is kept at the silo and is never
read from the coordinator, the store or a flow parameter.

A policy (YAML, see ``examples/silo-policy.yaml`` and
``silotune silo policy init``) holds:

- who the silo is and where its data and private folder are (``silo``,
  ``train_path``, ``eval_path``, ``private_dir``): these *replace* whatever the
  config says, so a coordinator cannot move them;
- which federations it joins (``federations``, fnmatch patterns such as
  ``retrain-*``) and the coordinator's signing key (``coordinator_key``);
- the pinned base model (``base_model_sha256``), the allowed ``methods``,
  the allowed ``protection`` schemes and whether uploads must be signed;
- DP floors (``dp``): DP-SGD required, ε per federation and over the data
  set's lifetime, minimum σ, maximum δ, client DP required and its ε;
- the object stores it may write to (``stores``) and the environment variables
  its S3 keys come from (``store_keys``);
- what per-silo values may leave it unnoised under DP or protection (``release``);
- whether every federation needs the silo's signed acceptance
  (``require_accepted_config``).

:func:`check_config` lists every way a config breaks the policy (a
:class:`Violation` names the config field and the policy line);
:func:`enforce` is what a silo flow calls before it reads any data: it refuses
(raising :class:`PolicyRefusal`, logging the refusal to
``<private_dir>/refusals.log``, writing nothing else) or returns the config with
the silo's own ``private_dir`` and data paths.

One signed federation config. At join time the silo's operator runs
``silotune silo accept CONFIG --policy FILE``: :func:`accept_config` checks the
config against the policy and signs its fingerprint (:func:`acceptance_fingerprint`)
with the silo's Ed25519 key into ``<private_dir>/accepted/<federation_id>.json``.
From then on :func:`enforce` refuses every run of that federation whose
fingerprint differs. The fields that may change between runs (on resume)
without a new acceptance are those outside the fingerprint (:data:`MUTABLE_FIELDS`):
``rounds``, ``tracking``, ``evaluation``, ``tags``, ``store`` and
``orchestration``, plus each silo's ``train_path``, ``eval_path``,
``private_dir`` and ``work_pool`` (every silo replaces those by its own, and a
relative data path resolves differently on each machine). They are still
checked against the policy on every run: the store against ``stores`` and
``store_keys``, and every other policy rule as usual.

By role: :mod:`~silotune.policy.model` (the schema: :class:`SiloPolicy` and its sections),
:mod:`~silotune.policy.files` (read and write the YAML), :mod:`~silotune.policy.stores` and
:mod:`~silotune.policy.weights` (what a config's store and base model are matched by),
:mod:`~silotune.policy.check` (:func:`check_config`), :mod:`~silotune.policy.acceptance` (the signed
acceptance), :mod:`~silotune.policy.enforcement` (:func:`enforce` and the refusal log) and
:mod:`~silotune.policy.local` (policies for one-machine setups). This module re-exports the names
callers use; the code inside the package imports each from its role's module.
"""

from silotune.policy.acceptance import (
    MUTABLE_FIELDS,
    accept_config,
    acceptance_fingerprint,
    acceptance_message,
    acceptance_path,
    accepted_fingerprint,
)
from silotune.policy.check import PolicyRefusal, Violation, check_config
from silotune.policy.enforcement import enforce
from silotune.policy.files import dump_policy, load_policy, parse_policy, policy_yaml
from silotune.policy.local import local_policy, write_local_policies
from silotune.policy.model import (
    PROTECTION_ORDER,
    DPPolicy,
    PolicyError,
    ReleasePolicy,
    SiloPolicy,
    StoreKeysPolicy,
)
from silotune.policy.stores import StoreLocation, store_location
from silotune.policy.weights import model_weights_sha256

__all__ = [
    "MUTABLE_FIELDS",
    "PROTECTION_ORDER",
    "DPPolicy",
    "PolicyError",
    "PolicyRefusal",
    "ReleasePolicy",
    "SiloPolicy",
    "StoreKeysPolicy",
    "StoreLocation",
    "Violation",
    "accept_config",
    "acceptance_fingerprint",
    "acceptance_message",
    "acceptance_path",
    "accepted_fingerprint",
    "check_config",
    "dump_policy",
    "enforce",
    "load_policy",
    "local_policy",
    "model_weights_sha256",
    "parse_policy",
    "policy_yaml",
    "store_location",
    "write_local_policies",
]
