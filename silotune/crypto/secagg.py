"""Secure aggregation by pairwise masking, with dropout recovery through Shamir shares.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017
(the protocol of its section 4, with a pinned roster and answer-at-most-once
unmasking in place of its consistency-check round; see the threat model below).
Data only: every step consumes and produces bytes; moving them (object store,
Prefect tasks) and signing them (:mod:`silotune.crypto.signing`) is the
caller's job.

One round, for the pinned roster ``R`` (the federation's configured silos, from
each silo's own configuration; ``n = |R|``, names ordered as strings; the Shamir
x-coordinate of a silo is its position in ``R`` plus one)::

    silo u                                      coordinator
    0 advertise()          -> two X25519 public keys (channel c_u, mask s_u)
                              and a commitment to a fresh self-mask seed b_u
                                                U0 = the silos of R that advertised
    1 share_keys(adverts)  -> Shamir shares (threshold t) of s_u's private key
                              and of b_u, one per silo of U0, each AEAD-encrypted
                              to its recipient (ChaCha20-Poly1305 under an X25519
                              key agreement on the channel keys); refused unless
                              every advert is from R and |U0| >= t
                                                routes share v->u to u; U1 = who shared
    2 mask_update(delta, inbox)
                           -> y_u = enc(w*x_u) + PRG(b_u)
                                    + sum_{v in U1, v != u} ±PRG(KA(s_u, s_v))  mod 2^32
                              (+ when u < v, - when u > v, so the pairwise masks
                              cancel in the sum); refused unless every sender is
                              in R and U0, and |U1| >= t
                                                U2 = who sent y; tells survivors U2
    3 unmask(U2)           -> for each v in U1: its b_v share if v survived,
                              its s_v share if v dropped (never both); refused
                              unless U2 is a subset of U1 holding u with |U2| >= t,
                              and at most one U2 per round is ever answered
                                                unmask_sum(): rebuild b_v for v in U2 and
                                                s_v for v in U1\\U2 from t shares, remove
                                                the self masks and the dropped silos'
                                                pairwise masks -> sum of enc(w*x) -> floats

Threshold ``t = n - floor(n * max_dropout_fraction)`` (default a third) of the
``n = |R|`` roster silos, never of the adverts that happen to arrive: up to a
third may fail to advertise or drop out after sharing keys. Since
``max_dropout_fraction < 1/2``, ``floor(n * f) < n/2`` and so ``2t > n``.

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
- Coordinator actively malicious (sends any adverts, shares, survivor sets, in
  any order, to anyone), assuming the caller (the protection layer) signs each
  silo's advert, share messages and unmask answer with the silo's Ed25519 key
  (:mod:`silotune.crypto.signing`, purposes ``advert``, ``share``, ``unmask``)
  and verifies them against the pinned keys of the roster silos before they
  reach this module, that every silo builds its :class:`SecAggClient` with the
  same roster from its own configuration, and that a silo persists and claims
  its state atomically around :meth:`SecAggClient.unmask` (two processes must
  never answer from the same pre-answer state):

  * It cannot inject silos. Adverts, shares, masked updates and answers from
    names outside ``R`` are refused, and signatures stop it from forging those of
    a roster silo. So every share of a secret is held by a roster silo, at the
    x-coordinate fixed by ``R``, and ``t`` does not depend on what it shows.
  * It cannot rebuild both secrets (``b_v`` and ``s_v``) of an honest silo ``v``,
    as it could by telling some silos that ``v`` survived and others that ``v``
    dropped, and then strip ``y_v`` of every mask. An honest
    silo ``w`` answers exactly one survivor set ``S_w``; its answer carries
    ``v``'s seed share if ``v`` is in ``S_w`` and ``v``'s key share if ``v`` is in
    ``U1_w`` but not in ``S_w``: never both. Let ``B`` and ``K`` be the honest
    silos whose answers carry a seed share and a key share of ``v``: they are
    disjoint subsets of ``R``, and each of ``c`` colluding roster silos can hand
    over both of its shares. Rebuilding ``b_v`` needs ``|B| + c >= t`` and
    rebuilding ``s_v`` needs ``|K| + c >= t``; adding them, ``2t <= |B| + |K| + 2c
    <= (n - c) + 2c = n + c``. So both are out of reach whenever ``c < 2t - n``:
    with no colluding silo because ``2t > n``, and with the default dropout
    fraction (``t >= 2n/3``, so ``2t - n >= n/3``) whenever fewer than ``n/3``
    silos collude. Asking the same silo twice gets the first answer again
    (the same bytes), never a second one.
  * It chooses ``U2``: it learns the sum over a survivor set of its choice of at
    least ``t`` silos that sent masked updates. There is no consistency-check
    round, so honest silos may answer different survivor sets; the argument
    above rules out rebuilding both secrets of any one silo, and this module
    claims nothing beyond it.
- What remains. The sum itself is revealed. With two silos each learns the
  other's update; with very few silos or a fixed cohort over many rounds,
  differences of sums leak individual updates: add client-level DP noise
  before masking.
- Integrity: a malicious silo can submit any in-range garbage (a poisoned
  update) and nobody can tell; robust aggregation is impossible on masked data,
  only client-side clipping and the value bound apply. A silo that lies in its
  shares makes reconstruction fail (detected: the rebuilt key must match the
  advertised public key, the rebuilt seed its commitment), not silently wrong;
  a silo that signs two different adverts can make the sum fail or come out
  as garbage, and learns nothing more than any colluding silo.
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
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
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


def _pinned_roster(roster: object, params: SecAggParams) -> tuple[str, ...]:
    """The federation's configured silos, checked and sorted (position + 1 is a silo's Shamir x)."""
    if isinstance(roster, str | bytes | bytearray) or not isinstance(roster, Sequence | AbstractSet):
        raise SecAggError(f"roster must be a sequence of silo names, got {type(roster).__name__}")
    names = list(roster)
    if not all(isinstance(n, str) and n for n in names):
        raise SecAggError(f"roster names must be non-empty strings, got {names!r}")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise SecAggError(f"roster has duplicate silo(s) {dups}")
    if not 2 <= len(names) <= params.max_silos:
        raise SecAggError(
            f"roster of {len(names)} silo(s); secure aggregation needs 2..max_silos={params.max_silos}"
        )
    return tuple(sorted(names))


def _outside(what: str, names: Iterable[str], roster: tuple[str, ...]) -> None:
    """Refuse, naming them, any names that are not configured silos."""
    out = sorted({str(n) for n in names} - set(roster))
    if out:
        which = "which is" if len(out) == 1 else "which are"
        raise SecAggError(f"{what} from {', '.join(map(repr, out))}, {which} not in the roster")


def _parse_adverts(
    adverts: Mapping[str, bytes] | Sequence[bytes],
    round_id: str,
    params: SecAggParams,
    roster: tuple[str, ...],
    silo: str | None = None,
) -> dict[str, Advert]:
    """The round's adverts (U0), each from a silo of the pinned roster, at least t of them.

    ``silo``: the client checking them, named in every refusal (None at the coordinator).
    """
    who = "" if silo is None else f"silo {silo!r}: "
    items = list(adverts.items()) if isinstance(adverts, Mapping) else [(None, b) for b in adverts]
    seen: dict[str, Advert] = {}
    for name, blob in items:
        if name is not None and name not in roster:  # before parsing: the slot itself is not a silo's
            raise SecAggError(f"{who}advert from {name!r}, who is not in the roster")
        try:
            adv = Advert.parse(blob)
        except SecAggError as exc:
            raise SecAggError(f"{who}{exc}") from None
        if name is not None and name != adv.silo:
            raise SecAggError(f"{who}advert filed under {name!r} is from {adv.silo!r}")
        if adv.silo not in roster:
            raise SecAggError(f"{who}advert from {adv.silo!r}, who is not in the roster")
        if adv.round_id != round_id:
            raise SecAggError(
                f"{who}advert from {adv.silo!r} is for round {adv.round_id!r}, not {round_id!r}"
            )
        if adv.silo in seen:
            raise SecAggError(f"{who}two adverts for silo {adv.silo!r}")
        seen[adv.silo] = adv
    t = params.threshold(len(roster))
    if len(seen) < t:
        raise SecAggError(f"{who}{len(seen)} advert(s), below the threshold {t} of a roster of {len(roster)}")
    keys = [a.mask_key for a in seen.values()] + [a.channel_key for a in seen.values()]
    if len(set(keys)) != len(keys):
        raise SecAggError(f"{who}two adverts share a public key")
    return dict(sorted(seen.items()))


# -- silo side -----------------------------------------------------------------------------


class SecAggClient:
    """One silo's side of one round. Each method runs once, in order; state stays in this object.

    ``roster``: the federation's configured silos (this one included), from the silo's own
    configuration, never from the coordinator. Only they may take part, and the threshold is
    ``params.threshold(len(roster))`` however many adverts arrive. ``unmask`` answers at most one
    survivor set (the same set again gets the same bytes).

    ``state_bytes()`` / ``from_state()`` carry the state between processes; they contain the
    round's private keys, so keep them at the silo. After :meth:`unmask` the state records the
    answer: persist it before the answer leaves the silo, and claim the state atomically so that
    two processes never answer from the same pre-answer state.
    """

    def __init__(
        self, silo: str, *, round_id: str, params: SecAggParams | None = None, roster: Sequence[str]
    ) -> None:
        if not silo or not isinstance(silo, str):
            raise SecAggError("silo must be a non-empty string")
        if not round_id or not isinstance(round_id, str):
            raise SecAggError("round_id must be a non-empty string, unique per round")
        self.silo = silo
        self.round_id = round_id
        self.params = params or SecAggParams()
        self.roster = _pinned_roster(roster, self.params)
        if silo not in self.roster:
            raise SecAggError(f"silo {silo!r} is not in the roster {list(self.roster)}")
        self.threshold = self.params.threshold(len(self.roster))
        self._channel = X25519PrivateKey.generate()
        self._mask = X25519PrivateKey.generate()
        self._seed = secrets.token_bytes(32)
        self._adverts: dict[str, Advert] | None = None  # U0: the roster silos that advertised
        self._own_shares: tuple[int, int] | None = None  # (mask-key share, seed share) for myself
        self._received: dict[str, tuple[int, int]] | None = None  # sender -> shares of its secrets (U1)
        self._answer: tuple[tuple[str, ...], bytes] | None = None  # (survivor set, response) once answered
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
        assert self._adverts is not None
        shared = self._channel.exchange(X25519PublicKey.from_public_bytes(self._adverts[peer].channel_key))
        return _kdf(shared, "share-encryption", self.round_id, *_pair(self.silo, peer))

    # round 1
    def share_keys(self, adverts: Mapping[str, bytes] | Sequence[bytes]) -> dict[str, bytes]:
        """Encrypted Shamir shares of this silo's mask key and self-mask seed, keyed by recipient.

        ``adverts``: silo -> advert (or a list of adverts). Refuses an advert from a silo outside
        the roster, one filed under another silo's name, a duplicate, or fewer than the threshold.
        """
        adverts_ = _parse_adverts(adverts, self.round_id, self.params, self.roster, self.silo)
        mine = adverts_.get(self.silo)
        if (
            mine is None
            or mine.mask_key != _raw_public(self._mask)
            or mine.channel_key != _raw_public(self._channel)
        ):
            raise SecAggError(f"silo {self.silo!r}: the adverts do not carry this silo's own advert")
        self._advance(0, "share_keys")
        self._adverts = adverts_
        # x-coordinates come from the pinned roster, so every silo and the coordinator agree on them
        key_shares = _shamir_split(_raw_private(self._mask), len(self.roster), self.threshold)
        seed_shares = _shamir_split(self._seed, len(self.roster), self.threshold)
        out: dict[str, bytes] = {}
        for i, peer in enumerate(self.roster):
            if peer == self.silo:
                self._own_shares = (key_shares[i], seed_shares[i])
                continue
            if peer not in adverts_:
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
        assert self._adverts is not None
        got: dict[str, tuple[int, int]] = {}
        for sender, blob in inbox.items():
            if sender not in self.roster:
                raise SecAggError(
                    f"silo {self.silo!r}: share message from {sender!r}, who is not in the roster"
                )
            if sender == self.silo:
                raise SecAggError(f"silo {self.silo!r}: share message from itself")
            if sender not in self._adverts:
                raise SecAggError(f"silo {self.silo!r}: share message from {sender!r}, who did not advertise")
            d = _loads(blob, f"share message from {sender!r}")
            if d.get("from") != sender or d.get("to") != self.silo or d.get("round") != self.round_id:
                raise SecAggError(
                    f"share message filed under {sender!r} is not from it, to {self.silo!r}, this round"
                )
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
        senders, with this silo, are the silos masked against (U1). A sender outside the roster or
        one that did not advertise is refused, and so is a U1 below the threshold. Fails closed:
        raises rather than return anything unmasked.
        """
        if self._adverts is None:
            raise SecAggError(f"silo {self.silo!r}: mask_update before share_keys")
        encoded = encode_update(delta, weight=weight, params=self.params)
        received = self._open_shares(inbox)
        partners = sorted([*received, self.silo])
        if len(partners) < self.threshold:
            raise SecAggError(
                f"silo {self.silo!r}: only {len(partners)} silos shared keys, below the threshold "
                f"{self.threshold}"
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
                _pairwise_key(self._mask, self._adverts[peer].mask_key, self.round_id, self.silo, peer), n
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
        of the silos that shared keys but dropped out.

        ``survivors`` must be a subset of U1 with this silo in it and at least the threshold of
        members. Answers at most one survivor set per round: the same set again (in any order)
        gets the identical bytes; a different set is refused, since two answers could reveal
        both shares (self-mask seed and mask key) of one silo.
        """
        if self._received is None or self._adverts is None or self._own_shares is None:
            raise SecAggError(f"silo {self.silo!r}: unmask before mask_update")
        if isinstance(survivors, str | bytes) or not all(isinstance(s, str) for s in survivors):
            raise SecAggError(f"silo {self.silo!r}: survivors must be a list of silo names")
        alive = set(survivors)
        if len(alive) != len(survivors):
            raise SecAggError(f"silo {self.silo!r}: survivor list has duplicates")
        if self._answer is not None:
            answered, response = self._answer
            if tuple(sorted(alive)) == answered:
                return response
            raise SecAggError(
                f"silo {self.silo!r}: already answered survivor set {list(answered)} for this round; "
                f"refusing {sorted(alive)}"
            )
        partners = {*self._received, self.silo}
        if self.silo not in alive:
            raise SecAggError(f"silo {self.silo!r} is not among the survivors it is asked to unmask for")
        if not alive <= partners:
            raise SecAggError(f"survivors {sorted(alive - partners)} never shared keys with {self.silo!r}")
        if len(alive) < self.threshold:
            raise SecAggError(
                f"silo {self.silo!r}: only {len(alive)} survivors, below the threshold {self.threshold}; "
                "refusing to unmask"
            )
        self._advance(2, "unmask")
        seed_shares = {self.silo: hex(self._own_shares[1])}
        key_shares = {}
        for peer, (key_share, seed_share) in self._received.items():
            if peer in alive:
                seed_shares[peer] = hex(seed_share)
            else:
                key_shares[peer] = hex(key_share)
        response = _dumps(
            {
                "silo": self.silo,
                "round": self.round_id,
                "survivors": sorted(alive),
                "seed_shares": seed_shares,
                "key_shares": key_shares,
            }
        )
        self._answer = (tuple(sorted(alive)), response)
        return response

    @property
    def answered(self) -> tuple[str, ...] | None:
        """The survivor set this silo answered for, or None before :meth:`unmask`."""
        return None if self._answer is None else self._answer[0]

    # checkpointing
    def state_bytes(self) -> bytes:
        """Everything needed to resume this silo's round in another process (holds private keys)."""
        return _dumps(
            {
                "silo": self.silo,
                "round": self.round_id,
                "params": self.params.model_dump(mode="json"),
                "roster": list(self.roster),
                "channel_sk": _raw_private(self._channel).hex(),
                "mask_sk": _raw_private(self._mask).hex(),
                "seed": self._seed.hex(),
                "phase": self._phase,
                "adverts": None
                if self._adverts is None
                else {
                    k: [a.channel_key.hex(), a.mask_key.hex(), a.commitment] for k, a in self._adverts.items()
                },
                "own_shares": None if self._own_shares is None else [hex(s) for s in self._own_shares],
                "received": None
                if self._received is None
                else {k: [hex(a), hex(b)] for k, (a, b) in self._received.items()},
                "answered": None
                if self._answer is None
                else {"survivors": list(self._answer[0]), "response": self._answer[1].hex()},
            }
        )

    @classmethod
    def from_state(cls, blob: bytes) -> SecAggClient:
        d = _loads(blob, "client state")
        try:
            self = cls(
                str(d["silo"]),
                round_id=str(d["round"]),
                params=SecAggParams.model_validate(d["params"]),
                roster=list(d["roster"]),
            )
            self._channel = X25519PrivateKey.from_private_bytes(bytes.fromhex(d["channel_sk"]))
            self._mask = X25519PrivateKey.from_private_bytes(bytes.fromhex(d["mask_sk"]))
            self._seed = bytes.fromhex(d["seed"])
            self._phase = int(d["phase"])
            if d["adverts"] is not None:
                self._adverts = {
                    k: Advert(k, self.round_id, bytes.fromhex(c), bytes.fromhex(m), str(cm))
                    for k, (c, m, cm) in d["adverts"].items()
                }
                _outside("state: adverts", self._adverts, self.roster)
            if d["own_shares"] is not None:
                a, b = d["own_shares"]
                self._own_shares = (int(a, 16), int(b, 16))
            if d["received"] is not None:
                self._received = {k: (int(a, 16), int(b, 16)) for k, (a, b) in d["received"].items()}
            if d["answered"] is not None:
                survivors = tuple(sorted(str(s) for s in d["answered"]["survivors"]))
                self._answer = (survivors, bytes.fromhex(d["answered"]["response"]))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
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
    roster: Sequence[str],
) -> SecAggResult:
    """Coordinator: remove the masks from the survivors' masked updates and decode their sum.

    ``masked``: silo -> masked update (the survivors U2); ``responses``: silo -> :meth:`SecAggClient.unmask`
    output (at least the threshold of them); ``adverts``: the round's adverts (U0); ``roster``: the
    federation's configured silos, which fix the threshold and the Shamir x-coordinates. Masked
    updates, responses or adverts from names outside the roster are refused, naming them.
    """
    params = params or SecAggParams()
    pinned = _pinned_roster(roster, params)
    _outside("masked update", masked, pinned)
    _outside("unmask response", responses, pinned)
    known = _parse_adverts(adverts, round_id, params, pinned)
    index = {name: i + 1 for i, name in enumerate(pinned)}  # Shamir x-coordinates
    t = params.threshold(len(pinned))
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
        if name not in known:
            raise SecAggError(f"silo {name!r} sent a masked update but no advert")
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
    if not set(alive) <= partners or not partners <= set(known):
        raise SecAggError(
            f"survivors {alive} or key-sharing set {sorted(partners)} outside the silos that advertised"
        )
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
        if _commit(seed, round_id, u) != known[u].commitment:
            raise SecAggError(
                f"silo {u!r}: rebuilt self-mask seed does not match its commitment (bad shares)"
            )
        total -= _prg(_self_mask_key(seed, round_id, u), n)
    for u in dropped:
        if len(key_points[u]) < t:
            raise SecAggError(f"only {len(key_points[u])} shares of dropped silo {u!r}'s mask key, need {t}")
        raw = _shamir_combine(dict(list(key_points[u].items())[:t]))
        key = X25519PrivateKey.from_private_bytes(raw)
        if _raw_public(key) != known[u].mask_key:
            raise SecAggError(f"dropped silo {u!r}: rebuilt mask key does not match its advert (bad shares)")
        for v in alive:  # v added +PRG if v < u, -PRG otherwise
            mask = _prg(_pairwise_key(key, known[v].mask_key, round_id, u, v), n)
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
