"""Secure aggregation by pairwise masking, with dropout recovery through Shamir shares.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017
(the semi-honest protocol of its section 4). Data only: every step consumes and
produces bytes; moving them (object store, Prefect tasks) and signing them
(:mod:`silotune.crypto.signing`) is the caller's job.

One round, for silos ``U0`` (names, ordered as strings)::

    silo u                                      coordinator
    0 advertise()          -> two X25519 public keys (channel c_u, mask s_u)
                              and a commitment to a fresh self-mask seed b_u
    1 share_keys(adverts)  -> Shamir shares (threshold t) of s_u's private key
                              and of b_u, one per silo, each AEAD-encrypted to
                              its recipient (ChaCha20-Poly1305 under an X25519
                              key agreement on the channel keys)
                                                routes share v->u to u; U1 = who shared
    2 mask_update(delta, inbox)
                           -> y_u = enc(w*x_u) + PRG(b_u)
                                    + sum_{v in U1, v != u} ±PRG(KA(s_u, s_v))  mod 2^32
                              (+ when u < v, - when u > v, so the pairwise masks
                              cancel in the sum)
                                                U2 = who sent y; tells survivors U2
    3 unmask(U2)           -> for each v in U1: its b_v share if v survived,
                              its s_v share if v dropped (never both)
                                                unmask_sum(): rebuild b_v for v in U2 and
                                                s_v for v in U1\\U2 from t shares, remove
                                                the self masks and the dropped silos'
                                                pairwise masks -> sum of enc(w*x) -> floats

Threshold ``t = n - floor(n * max_dropout_fraction)`` (default a third) of the
``n = |U0|`` silos: up to a third may drop out after sharing keys, and, since
``t > n/2``, the coordinator can never gather t shares of both ``b_v`` and
``s_v`` from honest silos in one round.

Encoding. Each value of ``weight * delta`` (``|delta| <= value_bound`` is
enforced, ``weight`` in (0, 1]) becomes ``round(w*x * 2^frac_bits)`` in the ring
Z_(2^32); the sum is read back as a signed 32-bit integer. ``frac_bits`` is the
largest value for which ``max_silos`` such numbers (plus half a unit each for
rounding) cannot leave ``±2^31``, whatever the weights: with the defaults
(``value_bound=0.125``, ``max_silos=64``) that is 27 bits, a step of 7.5e-9 and
an error of at most 3.7e-9 per summed update. The sum of the encoded integers is
exact; masked updates are 4 bytes per value plus a small header.

PRG: the ChaCha20 keystream under a key derived with HKDF-SHA256 from the seed
(or X25519 shared secret), the round id, the purpose and the silo pair.
Shamir sharing is over GF(2^521 - 1), one field element per 32-byte secret.

Threat model and its limits.

- Coordinator honest but curious (follows the protocol, reads everything): it
  learns the sum over ``U2`` and who dropped, nothing about one silo's update
  beyond that. Silos colluding with it learn nothing more about the others
  than the sum of the others' updates, as long as fewer than ``t`` collude.
- An *actively* malicious coordinator is not covered. Without the paper's
  consistency-check round and signed messages it can, for example, tell some
  silos that u dropped and others that u survived and collect both of u's
  shares; it can also impersonate silos whose adverts it forges. Sign adverts
  and updates with :mod:`silotune.crypto.signing` and pin the roster; the
  residual active attacks remain.
- The sum itself is revealed. With two silos each learns the other's update;
  with very few silos or a fixed cohort over many rounds, differences of sums
  leak individual updates: add client-level DP noise before masking.
- Integrity: a malicious silo can submit any in-range garbage (a poisoned
  update) and nobody can tell; robust aggregation is impossible on masked data,
  only client-side clipping and the value bound apply. A silo that lies in its
  shares makes reconstruction fail (detected: the rebuilt key must match the
  advertised public key, the rebuilt seed its commitment), not silently wrong.
- Fresh keys every round: a :class:`SecAggClient` serves one round. Reusing
  masks across rounds would let differences of masked updates cancel them.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, model_validator

from silotune.errors import SilotuneError

TensorDict = dict[str, torch.Tensor]

_DOMAIN = b"silotune/secagg/v1/"
_MASK_MAGIC = b"STSAMSK1"
_FORMAT_VERSION = 1
_RING_BITS = 32
_PRIME = 2**521 - 1  # Mersenne prime: Shamir field for 256-bit secrets
_FLOAT_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


class SecAggError(SilotuneError):
    """A secure-aggregation step was refused or failed; the message names the silo and the reason."""


# -- parameters and encoding ---------------------------------------------------------------


class SecAggParams(BaseModel):
    """Fixed-point encoding and dropout tolerance; every participant must use the same values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value_bound: float = Field(
        default=0.125, description="Largest |delta| value accepted; larger values are refused."
    )
    max_silos: int = Field(default=64, description="Most silos in one round; sizes the overflow headroom.")
    max_dropout_fraction: float = Field(
        default=1 / 3, description="Fraction of silos that may drop out after sharing keys (must be < 1/2)."
    )

    @model_validator(mode="after")
    def _check(self) -> SecAggParams:
        problems = []
        if not (math.isfinite(self.value_bound) and self.value_bound > 0):
            problems.append(f"value_bound={self.value_bound} must be a finite number > 0")
        if not 2 <= self.max_silos <= 2**20:
            problems.append(f"max_silos={self.max_silos} must be in 2..2^20")
        if not 0 <= self.max_dropout_fraction < 0.5:
            problems.append(f"max_dropout_fraction={self.max_dropout_fraction} must be in [0, 0.5)")
        if not problems and self.frac_bits < 1:
            problems.append(
                f"value_bound={self.value_bound} with max_silos={self.max_silos} leaves no fractional bits "
                f"in a {_RING_BITS}-bit ring"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def frac_bits(self) -> int:
        """Largest f with max_silos * (value_bound * 2^f + 1/2) < 2^31: sums of encodings cannot wrap."""
        limit = 2.0 ** (_RING_BITS - 1)
        f = math.floor(math.log2((limit / self.max_silos - 1) / self.value_bound))
        while f > 0 and self.max_silos * (self.value_bound * 2.0**f + 0.5) >= limit:
            f -= 1
        return f

    def threshold(self, n: int) -> int:
        """Shares needed to reconstruct a secret among ``n`` silos."""
        return n - math.floor(n * self.max_dropout_fraction)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[
            :32
        ]


@dataclass(frozen=True)
class EncodedUpdate:
    """``weight * delta`` as signed fixed-point integers (flattened in sorted key order)."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    values: np.ndarray  # int64, |v| <= value_bound * 2^frac_bits + 1/2


def encode_update(
    delta: Mapping[str, torch.Tensor], *, weight: float = 1.0, params: SecAggParams | None = None
) -> EncodedUpdate:
    """Fixed-point ``weight * delta``; refuses empty, non-float, non-finite or out-of-range input."""
    params = params or SecAggParams()
    if (
        not isinstance(weight, numbers.Real)
        or isinstance(weight, bool)
        or not (math.isfinite(weight) and 0 < weight <= 1)
    ):
        raise SecAggError(f"weight={weight!r} must be in (0, 1]")
    weight = float(weight)
    if not isinstance(delta, Mapping) or not delta:
        raise SecAggError("nothing to mask: the update has no tensors")
    keys = tuple(sorted(delta))
    shapes, dtypes, parts = [], [], []
    for key in keys:
        t = delta[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or str(t.dtype) not in _FLOAT_DTYPES:
            raise SecAggError(f"tensor {key!r}: expected a floating-point tensor")
        flat = t.detach().to("cpu", torch.float64).reshape(-1).numpy()
        if not np.isfinite(flat).all():
            raise SecAggError(f"tensor {key!r}: {int((~np.isfinite(flat)).sum())} non-finite value(s)")
        if flat.size and float(np.abs(flat).max()) > params.value_bound:
            raise SecAggError(
                f"tensor {key!r}: |value| up to {float(np.abs(flat).max()):.4g} exceeds value_bound="
                f"{params.value_bound}; clip the delta first or raise value_bound"
            )
        shapes.append(tuple(t.shape))
        dtypes.append(str(t.dtype))
        parts.append(flat)
    x = np.concatenate(parts)
    if x.size == 0:
        raise SecAggError("nothing to mask: every tensor is empty")
    values = np.rint(x * weight * 2.0**params.frac_bits).astype(np.int64)
    return EncodedUpdate(keys, tuple(shapes), tuple(dtypes), values)


def decode_sum(encoded: EncodedUpdate, params: SecAggParams | None = None) -> TensorDict:
    """Integers (a sum of encodings) back to tensors with the original keys, shapes and dtypes."""
    params = params or SecAggParams()
    x = encoded.values.astype(np.float64) * 2.0**-params.frac_bits
    out: TensorDict = {}
    pos = 0
    for key, shape, dtype in zip(encoded.keys, encoded.shapes, encoded.dtypes, strict=True):
        n = math.prod(shape)
        out[key] = torch.from_numpy(x[pos : pos + n].copy()).reshape(shape).to(_FLOAT_DTYPES[dtype])
        pos += n
    return out


# -- primitives ----------------------------------------------------------------------------


def _kdf(ikm: bytes, purpose: str, round_id: str, *parts: str) -> bytes:
    info = _DOMAIN + json.dumps([purpose, round_id, *parts]).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


def _prg(key: bytes, n: int) -> np.ndarray:
    """n pseudorandom uint32 values: the ChaCha20 keystream under a single-use key."""
    enc = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * n)), dtype="<u4").astype(np.uint32)


def _pair(u: str, v: str) -> tuple[str, str]:
    return (u, v) if u < v else (v, u)


def _pairwise_key(private: X25519PrivateKey, peer_public: bytes, round_id: str, u: str, v: str) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _kdf(shared, "pairwise-mask", round_id, *_pair(u, v))


def _self_mask_key(seed: bytes, round_id: str, silo: str) -> bytes:
    return _kdf(seed, "self-mask", round_id, silo)


def _commit(seed: bytes, round_id: str, silo: str) -> str:
    return hashlib.sha256(_DOMAIN + b"commit" + json.dumps([round_id, silo]).encode() + seed).hexdigest()


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _shamir_split(secret: bytes, n: int, t: int) -> list[int]:
    """Shares at x = 1..n of a degree t-1 polynomial with constant term ``secret``."""
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(_PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % _PRIME
        shares.append(acc)
    return shares


def _shamir_combine(points: Mapping[int, int]) -> bytes:
    """Lagrange interpolation at 0."""
    secret = 0
    xs = list(points)
    for xi in xs:
        num, den = 1, 1
        for xj in xs:
            if xj != xi:
                num = num * (-xj) % _PRIME
                den = den * (xi - xj) % _PRIME
        secret = (secret + points[xi] * num * pow(den, -1, _PRIME)) % _PRIME
    if secret >= 2**256:
        raise SecAggError("reconstructed secret is out of range (inconsistent shares)")
    return secret.to_bytes(32, "big")


def _loads(blob: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(blob)
    except (ValueError, TypeError) as exc:
        raise SecAggError(f"unreadable {what}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != _FORMAT_VERSION:
        raise SecAggError(f"unreadable {what}: not a version-{_FORMAT_VERSION} secagg message")
    return doc


def _dumps(doc: Mapping[str, Any]) -> bytes:
    return json.dumps({"v": _FORMAT_VERSION, **doc}, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Advert:
    """A silo's public keys for one round."""

    silo: str
    round_id: str
    channel_key: bytes
    mask_key: bytes
    commitment: str

    @classmethod
    def parse(cls, blob: bytes) -> Advert:
        d = _loads(blob, "advert")
        try:
            adv = cls(
                silo=str(d["silo"]),
                round_id=str(d["round"]),
                channel_key=bytes.fromhex(d["channel_pk"]),
                mask_key=bytes.fromhex(d["mask_pk"]),
                commitment=str(d["commitment"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise SecAggError(f"malformed advert: {exc!r}") from None
        if len(adv.channel_key) != 32 or len(adv.mask_key) != 32 or not adv.silo:
            raise SecAggError(f"malformed advert from {adv.silo!r}: bad key length or empty silo name")
        return adv


def _roster(
    adverts: Mapping[str, bytes] | Sequence[bytes], round_id: str, params: SecAggParams
) -> dict[str, Advert]:
    items = list(adverts.items()) if isinstance(adverts, Mapping) else [(None, b) for b in adverts]
    roster: dict[str, Advert] = {}
    for name, blob in items:
        adv = Advert.parse(blob)
        if name is not None and name != adv.silo:
            raise SecAggError(f"advert filed under {name!r} is from {adv.silo!r}")
        if adv.round_id != round_id:
            raise SecAggError(f"advert from {adv.silo!r} is for round {adv.round_id!r}, not {round_id!r}")
        if adv.silo in roster:
            raise SecAggError(f"two adverts for silo {adv.silo!r}")
        roster[adv.silo] = adv
    if not 2 <= len(roster) <= params.max_silos:
        raise SecAggError(f"{len(roster)} silos; secure aggregation needs 2..max_silos={params.max_silos}")
    keys = [a.mask_key for a in roster.values()] + [a.channel_key for a in roster.values()]
    if len(set(keys)) != len(keys):
        raise SecAggError("two adverts share a public key")
    return dict(sorted(roster.items()))


# -- silo side -----------------------------------------------------------------------------


class SecAggClient:
    """One silo's side of one round. Each method runs once, in order; state stays in this object.

    ``state_bytes()`` / ``from_state()`` carry the state between processes; they contain the
    round's private keys, so keep them at the silo.
    """

    def __init__(self, silo: str, *, round_id: str, params: SecAggParams | None = None) -> None:
        if not silo or not isinstance(silo, str):
            raise SecAggError("silo must be a non-empty string")
        if not round_id or not isinstance(round_id, str):
            raise SecAggError("round_id must be a non-empty string, unique per round")
        self.silo = silo
        self.round_id = round_id
        self.params = params or SecAggParams()
        self._channel = X25519PrivateKey.generate()
        self._mask = X25519PrivateKey.generate()
        self._seed = secrets.token_bytes(32)
        self._roster: dict[str, Advert] | None = None
        self._own_shares: tuple[int, int] | None = None  # (mask-key share, seed share) for myself
        self._received: dict[str, tuple[int, int]] | None = None  # sender -> shares of its secrets
        self._phase = 0

    # round 0
    def advertise(self) -> bytes:
        """This silo's public keys and self-mask commitment, for every other silo."""
        return _dumps(
            {
                "silo": self.silo,
                "round": self.round_id,
                "channel_pk": _raw_public(self._channel).hex(),
                "mask_pk": _raw_public(self._mask).hex(),
                "commitment": _commit(self._seed, self.round_id, self.silo),
            }
        )

    def _advance(self, expected: int, step: str) -> None:
        if self._phase != expected:
            raise SecAggError(
                f"silo {self.silo!r}: {step} called out of order or twice (phase {self._phase})"
            )
        self._phase += 1

    def _share_key(self, peer: str) -> bytes:
        assert self._roster is not None
        shared = self._channel.exchange(X25519PublicKey.from_public_bytes(self._roster[peer].channel_key))
        return _kdf(shared, "share-encryption", self.round_id, *_pair(self.silo, peer))

    # round 1
    def share_keys(self, adverts: Mapping[str, bytes] | Sequence[bytes]) -> dict[str, bytes]:
        """Encrypted Shamir shares of this silo's mask key and self-mask seed, keyed by recipient."""
        roster = _roster(adverts, self.round_id, self.params)
        mine = roster.get(self.silo)
        if (
            mine is None
            or mine.mask_key != _raw_public(self._mask)
            or mine.channel_key != _raw_public(self._channel)
        ):
            raise SecAggError(f"silo {self.silo!r}: the roster does not carry this silo's own advert")
        self._advance(0, "share_keys")
        self._roster = roster
        names = list(roster)
        t = self.params.threshold(len(names))
        key_shares = _shamir_split(_raw_private(self._mask), len(names), t)
        seed_shares = _shamir_split(self._seed, len(names), t)
        out: dict[str, bytes] = {}
        for i, peer in enumerate(names):
            if peer == self.silo:
                self._own_shares = (key_shares[i], seed_shares[i])
                continue
            msg = json.dumps({"key": hex(key_shares[i]), "seed": hex(seed_shares[i])}).encode()
            nonce = secrets.token_bytes(12)
            aad = json.dumps(["share", self.round_id, self.silo, peer]).encode()
            ct = ChaCha20Poly1305(self._share_key(peer)).encrypt(nonce, msg, aad)
            out[peer] = _dumps(
                {"from": self.silo, "to": peer, "round": self.round_id, "ct": (nonce + ct).hex()}
            )
        return out

    def _open_shares(self, inbox: Mapping[str, bytes]) -> dict[str, tuple[int, int]]:
        assert self._roster is not None
        got: dict[str, tuple[int, int]] = {}
        for sender, blob in inbox.items():
            d = _loads(blob, f"share message from {sender!r}")
            if d.get("from") != sender or d.get("to") != self.silo or d.get("round") != self.round_id:
                raise SecAggError(
                    f"share message filed under {sender!r} is not from it, to {self.silo!r}, this round"
                )
            if sender not in self._roster or sender == self.silo:
                raise SecAggError(f"share message from {sender!r}, who is not another silo of the roster")
            try:
                raw = bytes.fromhex(d["ct"])
                aad = json.dumps(["share", self.round_id, sender, self.silo]).encode()
                plain = ChaCha20Poly1305(self._share_key(sender)).decrypt(raw[:12], raw[12:], aad)
                doc = json.loads(plain)
                got[sender] = (int(doc["key"], 16), int(doc["seed"], 16))
            except (InvalidTag, KeyError, ValueError, TypeError):
                raise SecAggError(f"share message from {sender!r} does not decrypt or is malformed") from None
        return got

    # round 2
    def mask_update(
        self, delta: Mapping[str, torch.Tensor], inbox: Mapping[str, bytes], *, weight: float = 1.0
    ) -> bytes:
        """The masked update: ``enc(weight * delta)`` plus self mask plus pairwise masks, mod 2^32.

        ``inbox``: the share messages other silos addressed to this one (sender -> bytes); their
        senders, with this silo, are the silos masked against (U1). Fails closed: raises rather
        than return anything unmasked.
        """
        if self._roster is None:
            raise SecAggError(f"silo {self.silo!r}: mask_update before share_keys")
        encoded = encode_update(delta, weight=weight, params=self.params)
        received = self._open_shares(inbox)
        partners = sorted([*received, self.silo])
        t = self.params.threshold(len(self._roster))
        if len(partners) < t:
            raise SecAggError(
                f"silo {self.silo!r}: only {len(partners)} silos shared keys, below the threshold {t}"
            )
        self._advance(1, "mask_update")
        self._received = received
        n = encoded.values.size
        y = encoded.values.astype(np.uint32)  # two's complement: mod 2^32
        y += _prg(_self_mask_key(self._seed, self.round_id, self.silo), n)
        for peer in partners:
            if peer == self.silo:
                continue
            mask = _prg(
                _pairwise_key(self._mask, self._roster[peer].mask_key, self.round_id, self.silo, peer), n
            )
            if self.silo < peer:
                y += mask
            else:
                y -= mask
        if n and np.array_equal(y, encoded.values.astype(np.uint32)):  # cannot happen unless the PRG failed
            raise SecAggError("masking produced the plaintext encoding; refusing to return it")
        header = {
            "round": self.round_id,
            "silo": self.silo,
            "partners": partners,
            "keys": list(encoded.keys),
            "shapes": [list(s) for s in encoded.shapes],
            "dtypes": list(encoded.dtypes),
            "numel": n,
            "weight": float(weight),
            "params": self.params.fingerprint,
        }
        payload = y.astype("<u4").tobytes()
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
        head = json.dumps({"v": _FORMAT_VERSION, **header}, sort_keys=True).encode()
        return _MASK_MAGIC + struct.pack(">I", len(head)) + head + payload

    # round 3
    def unmask(self, survivors: Sequence[str]) -> bytes:
        """Shares that let the coordinator remove masks: self-mask seeds of ``survivors``, mask keys
        of the silos that shared keys but dropped out. Refuses a survivor set below the threshold,
        one that omits this silo, or a second call (which could reveal both shares of a silo).
        """
        if self._received is None or self._roster is None or self._own_shares is None:
            raise SecAggError(f"silo {self.silo!r}: unmask before mask_update")
        partners = {*self._received, self.silo}
        alive = set(survivors)
        if len(alive) != len(survivors):
            raise SecAggError("survivor list has duplicates")
        if self.silo not in alive:
            raise SecAggError(f"silo {self.silo!r} is not among the survivors it is asked to unmask for")
        if not alive <= partners:
            raise SecAggError(f"survivors {sorted(alive - partners)} never shared keys with {self.silo!r}")
        t = self.params.threshold(len(self._roster))
        if len(alive) < t:
            raise SecAggError(f"only {len(alive)} survivors, below the threshold {t}; refusing to unmask")
        self._advance(2, "unmask")
        seed_shares = {self.silo: hex(self._own_shares[1])}
        key_shares = {}
        for peer, (key_share, seed_share) in self._received.items():
            if peer in alive:
                seed_shares[peer] = hex(seed_share)
            else:
                key_shares[peer] = hex(key_share)
        return _dumps(
            {
                "silo": self.silo,
                "round": self.round_id,
                "survivors": sorted(alive),
                "seed_shares": seed_shares,
                "key_shares": key_shares,
            }
        )

    # checkpointing
    def state_bytes(self) -> bytes:
        """Everything needed to resume this silo's round in another process (holds private keys)."""
        return _dumps(
            {
                "silo": self.silo,
                "round": self.round_id,
                "params": self.params.model_dump(mode="json"),
                "channel_sk": _raw_private(self._channel).hex(),
                "mask_sk": _raw_private(self._mask).hex(),
                "seed": self._seed.hex(),
                "phase": self._phase,
                "roster": None
                if self._roster is None
                else {
                    k: [a.channel_key.hex(), a.mask_key.hex(), a.commitment] for k, a in self._roster.items()
                },
                "own_shares": None if self._own_shares is None else [hex(s) for s in self._own_shares],
                "received": None
                if self._received is None
                else {k: [hex(a), hex(b)] for k, (a, b) in self._received.items()},
            }
        )

    @classmethod
    def from_state(cls, blob: bytes) -> SecAggClient:
        d = _loads(blob, "client state")
        try:
            self = cls(
                str(d["silo"]), round_id=str(d["round"]), params=SecAggParams.model_validate(d["params"])
            )
            self._channel = X25519PrivateKey.from_private_bytes(bytes.fromhex(d["channel_sk"]))
            self._mask = X25519PrivateKey.from_private_bytes(bytes.fromhex(d["mask_sk"]))
            self._seed = bytes.fromhex(d["seed"])
            self._phase = int(d["phase"])
            if d["roster"] is not None:
                self._roster = {
                    k: Advert(k, self.round_id, bytes.fromhex(c), bytes.fromhex(m), str(cm))
                    for k, (c, m, cm) in d["roster"].items()
                }
            if d["own_shares"] is not None:
                a, b = d["own_shares"]
                self._own_shares = (int(a, 16), int(b, 16))
            if d["received"] is not None:
                self._received = {k: (int(a, 16), int(b, 16)) for k, (a, b) in d["received"].items()}
        except (KeyError, ValueError, TypeError) as exc:
            raise SecAggError(f"unreadable client state: {exc!r}") from None
        return self


# -- coordinator side ----------------------------------------------------------------------


@dataclass(frozen=True)
class MaskedUpdate:
    """A parsed masked update (header fields and the masked ring elements)."""

    silo: str
    round_id: str
    partners: tuple[str, ...]
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    weight: float
    params: str
    values: np.ndarray  # uint32

    @property
    def layout(self) -> tuple[Any, ...]:
        return (self.keys, self.shapes, self.dtypes, self.values.size)

    @classmethod
    def parse(cls, blob: bytes) -> MaskedUpdate:
        if (
            not isinstance(blob, bytes | bytearray)
            or blob[: len(_MASK_MAGIC)] != _MASK_MAGIC
            or len(blob) < 12
        ):
            raise SecAggError("not a silotune masked update (bad magic or too short)")
        (n,) = struct.unpack_from(">I", blob, len(_MASK_MAGIC))
        start = len(_MASK_MAGIC) + 4
        if start + n > len(blob):
            raise SecAggError("masked update: truncated header")
        h = _loads(bytes(blob[start : start + n]), "masked update header")
        payload = bytes(blob[start + n :])
        try:
            silo = str(h["silo"])
            numel, digest = int(h["numel"]), str(h["payload_sha256"])
            if len(payload) != 4 * numel or hashlib.sha256(payload).hexdigest() != digest:
                raise SecAggError(f"masked update from {silo!r}: payload truncated or corrupted")
            upd = cls(
                silo=silo,
                round_id=str(h["round"]),
                partners=tuple(str(p) for p in h["partners"]),
                keys=tuple(str(k) for k in h["keys"]),
                shapes=tuple(tuple(int(d) for d in s) for s in h["shapes"]),
                dtypes=tuple(str(d) for d in h["dtypes"]),
                weight=float(h["weight"]),
                params=str(h["params"]),
                values=np.frombuffer(payload, dtype="<u4").astype(np.uint32),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise SecAggError(f"masked update: malformed header ({exc!r})") from None
        if sum(math.prod(s) for s in upd.shapes) != numel or any(d not in _FLOAT_DTYPES for d in upd.dtypes):
            raise SecAggError(f"masked update from {upd.silo!r}: malformed layout")
        return upd


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum over the surviving silos."""

    delta: TensorDict  # sum over survivors of weight_k * delta_k
    encoded_sum: EncodedUpdate  # the exact integer sum it decodes from
    silos: tuple[str, ...]  # survivors whose updates are in the sum (U2)
    dropped: tuple[str, ...]  # shared keys but sent no masked update (U1 minus U2)
    weight: float  # sum of the survivors' weights: divide by it to renormalise FedAvg


def unmask_sum(
    masked: Mapping[str, bytes],
    responses: Mapping[str, bytes],
    *,
    adverts: Mapping[str, bytes] | Sequence[bytes],
    round_id: str,
    params: SecAggParams | None = None,
) -> SecAggResult:
    """Coordinator: remove the masks from the survivors' masked updates and decode their sum.

    ``masked``: silo -> masked update (the survivors U2); ``responses``: silo -> :meth:`SecAggClient.unmask`
    output (at least the threshold of them); ``adverts``: the round's adverts (the roster U0).
    """
    params = params or SecAggParams()
    roster = _roster(adverts, round_id, params)
    index = {name: i + 1 for i, name in enumerate(roster)}  # Shamir x-coordinates
    t = params.threshold(len(roster))
    if not masked:
        raise SecAggError("no masked updates")
    updates: dict[str, MaskedUpdate] = {}
    for name, blob in sorted(masked.items()):
        try:
            upd = MaskedUpdate.parse(blob)
        except SecAggError as exc:
            raise SecAggError(f"silo {name!r}: {exc}") from None
        if upd.silo != name:
            raise SecAggError(f"masked update filed under {name!r} is from {upd.silo!r}")
        if upd.round_id != round_id:
            raise SecAggError(f"silo {name!r}: masked update is for round {upd.round_id!r}, not {round_id!r}")
        if upd.params != params.fingerprint:
            raise SecAggError(f"silo {name!r}: masked under other encoding parameters")
        if name not in roster:
            raise SecAggError(f"silo {name!r} is not in the round's roster")
        updates[name] = upd
    first = next(iter(updates.values()))
    for name, upd in updates.items():
        if upd.partners != first.partners:
            raise SecAggError(
                f"silo {name!r} masked against {list(upd.partners)}, {first.silo!r} against "
                f"{list(first.partners)}: inconsistent key-sharing sets"
            )
        if upd.layout != first.layout:
            raise SecAggError(f"silo {name!r}: tensor layout differs from silo {first.silo!r}")
    partners = set(first.partners)
    alive = sorted(updates)
    if not set(alive) <= partners or not partners <= set(roster):
        raise SecAggError("survivors or key-sharing set outside the roster")
    dropped = sorted(partners - set(alive))
    if len(alive) < t:
        raise SecAggError(f"only {len(alive)} masked updates, below the threshold {t}: cannot unmask")

    seed_points: dict[str, dict[int, int]] = {u: {} for u in alive}
    key_points: dict[str, dict[int, int]] = {u: {} for u in dropped}
    for name, blob in sorted(responses.items()):
        d = _loads(blob, f"unmask response from {name!r}")
        if d.get("silo") != name or d.get("round") != round_id:
            raise SecAggError(f"unmask response filed under {name!r} is not from it for this round")
        if name not in updates:
            raise SecAggError(f"unmask response from {name!r}, which sent no masked update")
        if d.get("survivors") != alive:
            raise SecAggError(f"silo {name!r} unmasked for survivors {d.get('survivors')}, not {alive}")
        try:
            for u, share in dict(d["seed_shares"]).items():
                if u not in seed_points:
                    raise SecAggError(f"silo {name!r} revealed a seed share of {u!r}, who is not a survivor")
                seed_points[u][index[name]] = int(share, 16)
            for u, share in dict(d["key_shares"]).items():
                if u not in key_points:
                    raise SecAggError(f"silo {name!r} revealed a key share of {u!r}, who did not drop out")
                key_points[u][index[name]] = int(share, 16)
        except (KeyError, ValueError, TypeError) as exc:
            raise SecAggError(f"unmask response from {name!r} is malformed ({exc!r})") from None

    n = first.values.size
    total = np.zeros(n, dtype=np.uint32)
    for upd in updates.values():
        total += upd.values
    for u in alive:
        if len(seed_points[u]) < t:
            raise SecAggError(f"only {len(seed_points[u])} shares of silo {u!r}'s self-mask seed, need {t}")
        seed = _shamir_combine(dict(list(seed_points[u].items())[:t]))
        if _commit(seed, round_id, u) != roster[u].commitment:
            raise SecAggError(
                f"silo {u!r}: rebuilt self-mask seed does not match its commitment (bad shares)"
            )
        total -= _prg(_self_mask_key(seed, round_id, u), n)
    for u in dropped:
        if len(key_points[u]) < t:
            raise SecAggError(f"only {len(key_points[u])} shares of dropped silo {u!r}'s mask key, need {t}")
        raw = _shamir_combine(dict(list(key_points[u].items())[:t]))
        key = X25519PrivateKey.from_private_bytes(raw)
        if _raw_public(key) != roster[u].mask_key:
            raise SecAggError(f"dropped silo {u!r}: rebuilt mask key does not match its advert (bad shares)")
        for v in alive:  # v added +PRG if v < u, -PRG otherwise
            mask = _prg(_pairwise_key(key, roster[v].mask_key, round_id, u, v), n)
            if v < u:
                total -= mask
            else:
                total += mask
    ints = total.view(np.int32).astype(np.int64)
    encoded = EncodedUpdate(first.keys, first.shapes, first.dtypes, ints)
    return SecAggResult(
        delta=decode_sum(encoded, params),
        encoded_sum=encoded,
        silos=tuple(alive),
        dropped=tuple(dropped),
        weight=math.fsum(u.weight for u in updates.values()),
    )


__all__ = [
    "Advert",
    "EncodedUpdate",
    "MaskedUpdate",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggResult",
    "decode_sum",
    "encode_update",
    "unmask_sum",
]
