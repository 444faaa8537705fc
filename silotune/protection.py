"""Filters on what leaves a silo and what the coordinator may read back.

Silo side, in order (each optional, chosen by the federation config):

1. DP-SGD during training (:mod:`silotune.training`), accounted in the silo's ledger;
2. client-level DP: clip the delta's L2 norm, add the silo's share of Gaussian noise;
3. protection: CKKS encryption under the silos' shared key, or secure-aggregation masking;
4. signing: Ed25519 over the payload, the federation id, the round and the silo id.

Coordinator side: verify the signature, then either read the plaintext delta, add
ciphertexts (holding only a public context) or unmask the sum. Every filter fails
closed: an update that should be protected and is not raises, it is never uploaded
in plaintext.

Aggregation under protection is a mean with equal silo weights: a silo cannot weight
itself by example count without knowing everyone's counts, and client-level DP
bounds each silo's share of a sum in any case. Each silo scales its delta by
``1/len(silos)``; whoever reads the sum divides by the weight it carries, so the
result is the mean over the silos that made it into the round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from silotune.adapters import TensorDict, apply_delta
from silotune.config import FederationConfig
from silotune.errors import SilotuneError, UpdateError
from silotune.keys import CoordinatorKeys, SiloVault, write_private
from silotune.privacy import ClientNoise, PrivacyLedger, privatize_update
from silotune.store import FederationLayout, ObjectStore, get_json, put_json, save_tensors, sha256

EXTENSIONS = {"none": "safetensors", "ckks": "ckks", "secagg": "masked"}


class PrivacyBudgetExhausted(SilotuneError):
    """The silo's next contribution would take its ε past the configured budget."""


def uniform_weight(config: FederationConfig) -> float:
    return 1.0 / len(config.silos)


# -- privacy ledger (silo side) ---------------------------------------------------------------------


def _ledger_of(rounds: Mapping[str, Any], silo: str, fid: str, accountant: str, before: int) -> PrivacyLedger:
    ledger = PrivacyLedger(silo=silo, federation_id=fid, accountant=accountant)
    for key in sorted(rounds, key=int):
        if int(key) < before:
            entry = rounds[key]
            ledger.record(noise_multiplier=entry["sigma"], sample_rate=entry["q"], steps=entry["steps"])
    return ledger


def sample_dp_plan(config: FederationConfig, silo: str, round_: int, num_examples: int) -> dict[str, Any]:
    """σ, q and steps of this silo's DP-SGD round, after checking its budget.

    Raises :class:`PrivacyBudgetExhausted` when this round would take ε past
    ``target_epsilon``: the silo sits the round out and says so.
    """
    dp = config.privacy.sample_dp
    assert dp is not None
    dp.check_against_dataset(num_examples)
    q = min(1.0, config.train.batch_size / num_examples)
    steps = config.train.local_steps
    sigma = dp.resolve_noise_multiplier(sample_rate=q, steps=steps * config.rounds)
    vault = SiloVault.for_silo(config.silo(silo))
    doc = vault.read_ledger(config.federation_id)
    ledger = _ledger_of(doc["rounds"], silo, config.federation_id, dp.accountant, round_)
    if dp.target_epsilon is not None and ledger.would_exceed(
        target_epsilon=dp.target_epsilon, delta=dp.delta, noise_multiplier=sigma, sample_rate=q, steps=steps
    ):
        raise PrivacyBudgetExhausted(
            f"silo {silo!r}: privacy budget spent: ε={ledger.epsilon(dp.delta):.3f} after {round_} round(s); "
            f"round {round_ + 1} would exceed target_epsilon={dp.target_epsilon} (δ={dp.delta}); "
            "the silo stops contributing"
        )
    return {"sigma": sigma, "q": q, "steps": steps}


def record_sample_dp(
    config: FederationConfig, silo: str, round_: int, plan: Mapping[str, Any]
) -> dict[str, float]:
    """Write this round into the silo's ledger (replacing an earlier try of the same round).

    A retried round re-releases the same update (its noise is seeded by the silo's
    secret), so it is counted once. Returns what the silo reports: ε so far and the settings.
    """
    dp = config.privacy.sample_dp
    assert dp is not None
    vault = SiloVault.for_silo(config.silo(silo))
    doc = vault.read_ledger(config.federation_id)
    rounds = {k: v for k, v in doc["rounds"].items() if int(k) < round_}
    rounds[str(round_)] = {"sigma": plan["sigma"], "q": plan["q"], "steps": plan["steps"]}
    doc["rounds"] = rounds
    doc["accountant"] = dp.accountant
    vault.write_ledger(config.federation_id, doc)
    eps = _ledger_of(rounds, silo, config.federation_id, dp.accountant, round_ + 1).epsilon(dp.delta)
    return {
        "dp.epsilon": eps,
        "dp.delta": dp.delta,
        "dp.noise_multiplier": float(plan["sigma"]),
        "dp.sample_rate": float(plan["q"]),
        "dp.max_grad_norm": dp.max_grad_norm,
        "dp.steps_total": float(sum(r["steps"] for r in rounds.values())),
    }


def client_noise(config: FederationConfig) -> ClientNoise:
    dp = config.privacy.client_dp
    assert dp is not None
    return dp.resolve(rounds=config.rounds, client_sample_rate=1.0, cohort_size=config.client_noise_cohort())


def client_epsilon(config: FederationConfig, rounds_done: int) -> float:
    """Client-level ε after ``rounds_done`` rounds (every silo takes part in every round)."""
    dp = config.privacy.client_dp
    assert dp is not None
    ledger = PrivacyLedger(silo="(all silos)", federation_id=config.federation_id, accountant=dp.accountant)
    ledger.record(noise_multiplier=client_noise(config).noise_multiplier, sample_rate=1.0, steps=rounds_done)
    return ledger.epsilon(dp.delta)


def apply_client_dp(
    config: FederationConfig, silo: str, round_: int, d: TensorDict
) -> tuple[TensorDict, dict[str, float]]:
    """Clip ``d`` to the configured norm and add this silo's share of the noise."""
    dp = config.privacy.client_dp
    assert dp is not None
    noise = client_noise(config)
    vault = SiloVault.for_silo(config.silo(silo))
    gen = torch.Generator().manual_seed(vault.noise_seed(config.federation_id, round_, "client-dp"))
    private, norm = privatize_update(
        d, clip_norm=noise.clip_norm, noise_std=noise.per_client_std, generator=gen, silo=silo
    )
    return private, {
        "client_dp.norm_before_clip": norm,
        "client_dp.clip_norm": noise.clip_norm,
        "client_dp.noise_multiplier": noise.noise_multiplier,
        "client_dp.noise_std": noise.per_client_std,
        "client_dp.cohort": float(noise.cohort_size),
    }


# -- packing (silo side) ------------------------------------------------------------------------------


def pack_update(config: FederationConfig, silo: str, round_: int, d: TensorDict, store: ObjectStore) -> bytes:
    """The bytes that leave the silo: plaintext safetensors, a CKKS ciphertext or a masked update."""
    protection = config.security.protection
    vault = SiloVault.for_silo(config.silo(silo))
    if protection == "none":
        meta = {"federation_id": config.federation_id, "round": str(round_), "silo": silo}
        return save_tensors(d, meta)
    if protection == "ckks":
        from silotune.crypto.ckks import encrypt_update

        return encrypt_update(d, vault.ckks_secret(), weight=uniform_weight(config))
    if protection == "secagg":
        client = _load_secagg(vault, config, round_)
        inbox = _secagg_inbox(config, silo, round_, store)
        blob = client.mask_update(d, inbox, weight=uniform_weight(config))
        write_private(vault.secagg_path(config.federation_id, round_), client.state_bytes())
        return blob
    raise ValueError(f"unknown protection {protection!r}")  # pragma: no cover - config guards this


def sign_payload(config: FederationConfig, silo: str, round_: int, payload: bytes) -> bytes:
    key = SiloVault.for_silo(config.silo(silo)).signing_key()
    return key.sign(payload, federation_id=config.federation_id, round=round_, silo=silo)


# -- secure aggregation phases --------------------------------------------------------------------------


def _secagg_params(config: FederationConfig) -> Any:
    from silotune.crypto.secagg import SecAggParams

    return SecAggParams(max_dropout_fraction=config.security.secagg_max_dropout)


def _round_id(config: FederationConfig, round_: int) -> str:
    return f"{config.federation_id}/{round_}"


def _secagg_prefix(config: FederationConfig, round_: int) -> str:
    return f"{FederationLayout(config.federation_id).prefix}/rounds/{round_:05d}/secagg"


def _load_secagg(vault: SiloVault, config: FederationConfig, round_: int) -> Any:
    from silotune.crypto.secagg import SecAggClient

    path = vault.secagg_path(config.federation_id, round_)
    if not path.is_file():
        raise UpdateError(vault.silo, f"no secure-aggregation state for round {round_ + 1}: advertise first")
    return SecAggClient.from_state(path.read_bytes())


def secagg_advertise(config: FederationConfig, silo: str, round_: int, store: ObjectStore) -> str:
    """Phase 0 at a silo: fresh keys for this round; the advert goes to the store."""
    from silotune.crypto.secagg import SecAggClient

    vault = SiloVault.for_silo(config.silo(silo))
    client = SecAggClient(silo, round_id=_round_id(config, round_), params=_secagg_params(config))
    advert = client.advertise()
    write_private(vault.secagg_path(config.federation_id, round_), client.state_bytes())
    key = f"{_secagg_prefix(config, round_)}/adverts/{silo}"
    store.put(key, advert)
    return key


def _adverts(config: FederationConfig, round_: int, store: ObjectStore) -> dict[str, bytes]:
    prefix = f"{_secagg_prefix(config, round_)}/adverts/"
    return {k.removeprefix(prefix): store.get(k) for k in store.list(prefix)}


def secagg_share(config: FederationConfig, silo: str, round_: int, store: ObjectStore) -> list[str]:
    """Phase 1 at a silo: encrypted Shamir shares of its secrets, one per other silo."""
    vault = SiloVault.for_silo(config.silo(silo))
    client = _load_secagg(vault, config, round_)
    out = client.share_keys(_adverts(config, round_, store))
    write_private(vault.secagg_path(config.federation_id, round_), client.state_bytes())
    keys = []
    for peer, blob in out.items():
        key = f"{_secagg_prefix(config, round_)}/shares/{peer}/{silo}"
        store.put(key, blob)
        keys.append(key)
    return keys


def _secagg_inbox(config: FederationConfig, silo: str, round_: int, store: ObjectStore) -> dict[str, bytes]:
    prefix = f"{_secagg_prefix(config, round_)}/shares/{silo}/"
    return {k.removeprefix(prefix): store.get(k) for k in store.list(prefix)}


def secagg_publish_survivors(
    config: FederationConfig, round_: int, store: ObjectStore, survivors: Sequence[str]
) -> None:
    put_json(store, f"{_secagg_prefix(config, round_)}/survivors.json", sorted(survivors))


def secagg_unmask(config: FederationConfig, silo: str, round_: int, store: ObjectStore) -> str | None:
    """Phase 3 at a silo: shares that remove the masks of the survivors' sum (None if not a survivor)."""
    vault = SiloVault.for_silo(config.silo(silo))
    survivors = get_json(store, f"{_secagg_prefix(config, round_)}/survivors.json")
    if silo not in survivors:
        return None
    client = _load_secagg(vault, config, round_)
    response = client.unmask(survivors)
    vault.secagg_path(config.federation_id, round_).unlink(missing_ok=True)  # one round, one use
    key = f"{_secagg_prefix(config, round_)}/unmask/{silo}"
    store.put(key, response)
    return key


def secagg_sum(
    config: FederationConfig, round_: int, store: ObjectStore, masked: Mapping[str, bytes]
) -> tuple[TensorDict, float]:
    """Coordinator: unmask the survivors' sum; returns (sum of weighted deltas, total weight)."""
    from silotune.crypto.secagg import unmask_sum

    prefix = f"{_secagg_prefix(config, round_)}/unmask/"
    responses = {k.removeprefix(prefix): store.get(k) for k in store.list(prefix)}
    result = unmask_sum(
        masked,
        responses,
        adverts=_adverts(config, round_, store),
        round_id=_round_id(config, round_),
        params=_secagg_params(config),
    )
    return result.delta, result.weight


# -- CKKS (coordinator side and silo side) ----------------------------------------------------------------


def ckks_sum(config: FederationConfig, blobs: Mapping[str, bytes]) -> bytes:
    """Coordinator: add the silos' ciphertexts with the public context only."""
    from silotune.crypto.ckks import sum_encrypted

    public = CoordinatorKeys.for_config(config).ckks_public()
    names = sorted(blobs)
    return sum_encrypted([blobs[n] for n in names], public, silos=names)


def load_global(
    config: FederationConfig, silo: str, ref_key: str, ref_sha: str, store: ObjectStore
) -> TensorDict:
    return fetch_global(config, silo, ref_key, ref_sha, store)[0]


def fetch_global(
    config: FederationConfig, silo: str, ref_key: str, ref_sha: str, store: ObjectStore
) -> tuple[TensorDict, int]:
    """The global adapter a reference names, as the silo sees it, and the bytes downloaded.

    Plaintext globals are read directly. Under CKKS a global is a pointer
    ``{"base": <previous global>, "aggregate": <encrypted sum>}``: the silo decrypts
    the aggregate with the shared secret, divides by the weight it carries (the
    mean over the round's silos) and adds it to the previous global, which it keeps
    decrypted in its private folder.
    """
    data = store.get(ref_key)
    if sha256(data) != ref_sha:
        raise UpdateError(silo, f"{ref_key}: sha256 mismatch (the global adapter changed or was corrupted)")
    if not ref_key.endswith(".json"):
        try:
            return dict(st_load(data)), len(data)
        except Exception as exc:
            raise UpdateError(silo, f"{ref_key}: not a valid safetensors object ({exc})") from None
    vault = SiloVault.for_silo(config.silo(silo))
    pointer = json.loads(data)
    cache = vault.global_cache(config.federation_id, int(pointer["round"]))
    if cache.is_file():
        cached = cache.read_bytes()
        header = json.loads(cached[8 : 8 + int.from_bytes(cached[:8], "little")])
        if header.get("__metadata__", {}).get("pointer_sha256") == ref_sha:
            return dict(st_load(cached)), len(data)
    from silotune.crypto.ckks import decrypt_update, read_header

    base, down = fetch_global(config, silo, pointer["base"]["key"], pointer["base"]["sha256"], store)
    agg_bytes = store.get(pointer["aggregate"]["key"])
    if sha256(agg_bytes) != pointer["aggregate"]["sha256"]:
        raise UpdateError(silo, f"{pointer['aggregate']['key']}: sha256 mismatch")
    header = read_header(agg_bytes)
    total = decrypt_update(agg_bytes, vault.ckks_secret(), min_count=min(2, config.aggregation.min_silos))
    mean = {k: (v.double() / header.weight).to(v.dtype) for k, v in total.items()}
    out = apply_delta(base, mean)
    write_private(cache, st_save(out, metadata={"pointer_sha256": ref_sha}))
    return out, down + len(data) + len(agg_bytes)


def ckks_pointer(round_next: int, base: Mapping[str, str], aggregate: Mapping[str, str]) -> bytes:
    return json.dumps(
        {"round": round_next, "base": dict(base), "aggregate": dict(aggregate)}, sort_keys=True
    ).encode()


def check_weight(total_weight: float, count: int, config: FederationConfig) -> None:
    expected = count * uniform_weight(config)
    if not math.isclose(total_weight, expected, rel_tol=1e-9):
        raise UpdateError(
            "aggregate", f"weights sum to {total_weight}, expected {expected} for {count} silos"
        )
