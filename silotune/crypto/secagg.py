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

Masking graph (Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020). Above ``complete_up_to``
silos (default 32; at most that many the graph is complete and everything above
holds with ``k = n - 1``) a silo ``u`` does all of the above with its ``k``
neighbours ``N(u)`` only: shares of its secrets go to its holders ``N[u] = N(u) + u``
(Shamir threshold ``t_k = (k+1) - floor((k+1) * f)``, so ``2 t_k > k + 1``), and
its pairwise masks are with the neighbours that shared keys. Per silo that is
O(k) key agreements, share messages and PRG streams, and an O(k) unmask answer,
instead of O(n); the coordinator's unmasking is O(n k) mask streams at worst.

- The graph: ``k = 2 * ceil(1.5 * log2 n)`` (even, at least ``3 log2 n``: 20 at
  100 silos, 22 at 128, 30 at 1,000; Bell et al. show a degree logarithmic in n
  suffices against a constant fraction of corrupt and dropped clients). The
  Harary graph H(k, n) (Harary 1962): the silos on a ring, each joined to the
  ``k/2`` nearest on either side. It is k-regular and k-connected: removing
  fewer than ``k`` silos (dropped or colluding) leaves the rest connected.
- The ring order: silos sorted by ``SHA-256(seed, name)`` with
  ``seed = SHA-256(domain, round_id, sorted roster)``. Each silo and the
  coordinator compute it from the roster they already pin (every silo signed the
  config that fixes the roster, or the sampling that draws it); no party picks it
  in a round, and a silo refuses a graph it is told that differs
  (:meth:`MaskingGraph.check_told`). Nothing of the graph is taken from a message.
- Recovery of dropouts, neighbours only: for a neighbour that sent a masked
  update a silo reveals its self-mask seed share, for one that shared keys but
  dropped its mask-key share; the coordinator rebuilds each secret from
  ``t_k`` of its holders and removes the dropped silo's masks from exactly the
  survivors that listed it as a partner (a masked update names its partners,
  which must be its holders, and two survivors must list each other or neither).
- Unmask rule: a silo answers a survivor set only if at least ``t`` roster silos
  and at least ``t_k`` of its own holders survive, and every surviving neighbour
  shared keys with it.

Security argument for the sparse graph (what holds, with ``c_v`` the colluding
silos among ``N[v]``):

1. Never both secrets of an honest silo ``v``: the argument of the threat model
   below, with ``R`` replaced by ``N[v]`` and ``t`` by ``t_k``: both need
   ``2 t_k <= (k + 1) + c_v``, so neither the coordinator nor its allies get
   both while ``c_v < 2 t_k - (k + 1)`` (about ``k/3`` with the default).
2. What a sum reveals: pairwise masks cancel only inside the summed set, so the
   coordinator learns sums over unions of connected components of the graph on
   the honest silos whose seeds it rebuilt, after cutting every edge to a silo
   whose mask key it rebuilt. With one survivor set answered by everyone (an
   honest coordinator's dropouts, or a lying one that tells all silos the same
   set), rebuilding ``b_u`` takes ``t_k`` answers from ``N[u]``, each from a
   survivor; the honest ones are ``u``'s neighbours in the same component, so
   every sum the coordinator can unmask covers at least ``t_k - c_u`` honest
   silos around each of its members (with no collusion: ``t_k``, 16 at 128
   silos). A coordinator that declares ``N(v)`` dropped to isolate ``v`` gets no
   answer from ``v`` (fewer than ``t_k`` of its holders survive) nor from the
   "dropped", so ``b_v`` stays hidden.
3. Different survivor sets to different silos: each honest silo answers one set
   (1. holds), and a silo revealing key shares of at most ``k + 1 - t_k`` of its
   holders (the unmask rule) limits how many keys the coordinator can rebuild
   around ``v``: on H(k, n) isolating one silo without collusion needs at least
   ``k * t_k`` key shares of ``v``'s neighbours (352 at 128 silos) from the
   silos within ring distance ``k`` of ``v``, which can reveal at most
   ``sum over them of min(k + 1 - t_k, their neighbours in N(v))`` (273 at 128
   silos). This is a count for the sparse construction, not a general proof;
   with colluders among ``v``'s neighbours the margin shrinks.

Limits of the sparse graph: the graph is known in advance (it is a function of
the roster), so Bell et al.'s probabilistic bound, which assumes corruptions
chosen before a random graph is drawn, does not apply against a coalition that
picks its members after seeing the roster; it does apply where corruptions are
fixed before the federation is configured. A coordinator can grind federation
ids before silos accept a config: the ring order changes with them. Collusion
limits are per neighbourhood (``c_v`` above), not per roster: a third of the
roster is too many if it sits around one silo. Where that matters, set
``complete_up_to`` at or above the roster size, and add client-level DP noise.

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


def _shamir_split(secret: bytes, xs: Iterable[int], t: int) -> dict[int, int]:
    """Shares at the points ``xs`` (each >= 1) of a degree t-1 polynomial with constant term ``secret``.

    Only the holders' points are evaluated: on a sparse masking graph that is k + 1 of them, not n.
    """
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(_PRIME) for _ in range(t - 1)]
    shares = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % _PRIME
        shares[x] = acc
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


# -- the masking graph ---------------------------------------------------------------------

COMPLETE_UP_TO = 32  # rosters up to this size mask over the complete graph (every pair), as before


def harary_degree(n: int) -> int:
    """The sparse graph's degree for ``n`` silos: the even number ``2 * ceil(1.5 * log2 n)`` (so at least
    ``3 log2 n``), at most ``n - 1``. 22 for 128 silos, 20 for 100, 30 for 1,000."""
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))


@dataclass(frozen=True)
class MaskingGraph:
    """Who masks with whom in one round: the complete graph, or a Harary graph H(k, n) on a
    pseudorandom ordering of the roster (see the module docstring). Every silo and the coordinator
    derive it with :func:`masking_graph` from the pinned roster and the round id alone."""

    round_id: str
    roster: tuple[str, ...]  # sorted
    kind: str  # "complete" | "harary"
    degree: int  # k: every silo has exactly k neighbours
    seed: str  # hex; fixes the ordering of the roster on the ring
    complete_up_to: int
    neighbours: Mapping[str, tuple[str, ...]]

    def holders(self, silo: str) -> tuple[str, ...]:
        """The silos holding shares of ``silo``'s secrets: it and its neighbours (sorted)."""
        return tuple(sorted((silo, *self.neighbours[silo])))

    def threshold(self, params: SecAggParams) -> int:
        """Shares needed to rebuild one silo's secret: ``params.threshold(k + 1)`` of its holders.

        On the complete graph ``k + 1 = n``: the roster-wide threshold, as before."""
        return params.threshold(self.degree + 1)

    def record(self) -> dict[str, Any]:
        """What a round's manifest holds: enough to redo the graph and compare it."""
        return {
            "kind": self.kind,
            "degree": self.degree,
            "seed": self.seed,
            "complete_up_to": self.complete_up_to,
            "digest": self.digest,
        }

    def to_bytes(self) -> bytes:
        return _dumps(
            {
                "round": self.round_id,
                "roster": list(self.roster),
                "kind": self.kind,
                "degree": self.degree,
                "seed": self.seed,
                "complete_up_to": self.complete_up_to,
                "neighbours": {u: list(v) for u, v in sorted(self.neighbours.items())},
            }
        )

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def check_told(self, blob: bytes, silo: str) -> None:
        """Refuse a graph someone else (the coordinator) describes unless it is exactly this one."""
        if blob != self.to_bytes():
            try:
                told = _loads(blob, "masking graph")
                said = f"{told.get('kind')!r}, degree {told.get('degree')}, seed {told.get('seed')}"
            except SecAggError:
                said = "an unreadable graph"
            raise SecAggError(
                f"silo {silo!r}: the masking graph it is told ({said}) is not the one the round's roster "
                f"fixes ({self.kind!r}, degree {self.degree}, seed {self.seed}); refusing"
            )


def masking_graph(
    roster: Sequence[str], round_id: str, *, complete_up_to: int = COMPLETE_UP_TO
) -> MaskingGraph:
    """The round's masking graph, a pure function of the roster and the round id.

    ``n <= complete_up_to`` (or ``k >= n - 1``): the complete graph. Otherwise H(k, n) with
    ``k = harary_degree(n)``: the roster is placed on a ring in the order of
    ``SHA-256(seed, name)``, where ``seed = SHA-256(domain, round_id, sorted roster)``, and each silo
    is joined to the ``k/2`` nearest on either side.
    """
    if isinstance(complete_up_to, bool) or not isinstance(complete_up_to, int) or complete_up_to < 2:
        raise SecAggError(f"complete_up_to={complete_up_to!r} must be an integer >= 2")
    names = tuple(sorted(roster))
    if len(set(names)) != len(names) or len(names) < 2:
        raise SecAggError(f"a masking graph needs at least 2 distinct silos, got {list(names)}")
    n = len(names)
    seed = hashlib.sha256(_DOMAIN + b"graph" + json.dumps([round_id, list(names)]).encode()).hexdigest()
    k = harary_degree(n)
    if n <= complete_up_to or k >= n - 1:
        nb = {u: tuple(v for v in names if v != u) for u in names}
        return MaskingGraph(round_id, names, "complete", n - 1, seed, complete_up_to, nb)
    key = bytes.fromhex(seed)
    ring = sorted(names, key=lambda s: hashlib.sha256(key + s.encode()).digest())
    pos = {s: i for i, s in enumerate(ring)}
    half = k // 2  # k is even and < n - 1, so the 2 * half ring offsets reach distinct silos
    nb = {u: tuple(sorted(ring[(pos[u] + d) % n] for d in range(-half, half + 1) if d != 0)) for u in names}
    return MaskingGraph(round_id, names, "harary", k, seed, complete_up_to, nb)


def _parse_adverts(
    adverts: Mapping[str, bytes] | Sequence[bytes],
    round_id: str,
    params: SecAggParams,
    roster: tuple[str, ...],
    silo: str | None = None,
    graph: MaskingGraph | None = None,
) -> dict[str, Advert]:
    """The round's adverts (U0), each from a silo of the pinned roster, at least t of them.

    ``silo``: the client checking them, named in every refusal (None at the coordinator), which
    keeps only its holders' adverts (``graph``) and needs the local threshold of them.
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
    if silo is not None and graph is not None and graph.kind != "complete":
        holders = graph.holders(silo)
        seen = {u: a for u, a in seen.items() if u in holders}  # others' keys are not this silo's business
        t = graph.threshold(params)
        if len(seen) < t:
            raise SecAggError(
                f"{who}{len(seen)} advert(s) from its {len(holders)} holders (itself and its neighbours), "
                f"below the threshold {t}"
            )
    t = params.threshold(len(roster))
    if (silo is None or graph is None or graph.kind == "complete") and len(seen) < t:
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
        self,
        silo: str,
        *,
        round_id: str,
        params: SecAggParams | None = None,
        roster: Sequence[str],
        complete_up_to: int = COMPLETE_UP_TO,
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
        # Derived here, never received: the graph is fixed by the roster and the round id alone.
        self.graph = masking_graph(self.roster, round_id, complete_up_to=complete_up_to)
        self.neighbours = frozenset(self.graph.neighbours[silo])
        self.threshold = self.graph.threshold(self.params)  # of this silo's k + 1 holders
        self.min_survivors = self.params.threshold(len(self.roster))  # of the whole roster
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
        adverts_ = _parse_adverts(adverts, self.round_id, self.params, self.roster, self.silo, self.graph)
        mine = adverts_.get(self.silo)
        if (
            mine is None
            or mine.mask_key != _raw_public(self._mask)
            or mine.channel_key != _raw_public(self._channel)
        ):
            raise SecAggError(f"silo {self.silo!r}: the adverts do not carry this silo's own advert")
        self._advance(0, "share_keys")
        self._adverts = adverts_
        # x-coordinates come from the pinned roster, so every silo and the coordinator agree on them;
        # only this silo's holders (itself and its neighbours) get a point
        index = {name: i + 1 for i, name in enumerate(self.roster)}
        xs = [index[p] for p in self.graph.holders(self.silo)]
        key_shares = _shamir_split(_raw_private(self._mask), xs, self.threshold)
        seed_shares = _shamir_split(self._seed, xs, self.threshold)
        out: dict[str, bytes] = {}
        for peer in self.graph.holders(self.silo):
            i = index[peer]
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
            if sender not in self.neighbours:
                raise SecAggError(
                    f"silo {self.silo!r}: share message from {sender!r}, who is not its neighbour in the "
                    f"round's masking graph"
                )
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
        # mask work is one PRG stream per partner: at most k + 1 on the sparse graph
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
        far = set(self.roster) - self.neighbours - {self.silo}  # roster silos it never exchanges keys with
        near = alive - far  # every other name must be a partner (a name outside the roster never is)
        if not near <= partners:
            raise SecAggError(f"survivors {sorted(near - partners)} never shared keys with {self.silo!r}")
        if len(alive) < self.min_survivors:
            raise SecAggError(
                f"silo {self.silo!r}: only {len(alive)} survivors, below the threshold {self.min_survivors}; "
                "refusing to unmask"
            )
        if len(near) < self.threshold:
            # The local rule (module docstring): a silo whose neighbourhood is mostly "dropped" would
            # hand out the keys that cut its neighbours off from everyone else.
            raise SecAggError(
                f"silo {self.silo!r}: only {len(near)} of its {len(self.neighbours) + 1} holders survive, "
                f"below the threshold {self.threshold}; refusing to unmask"
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
                "complete_up_to": self.graph.complete_up_to,
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
                # states written before sparse graphs existed masked over the complete graph
                complete_up_to=int(d.get("complete_up_to", 2**20)),
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
    complete_up_to: int = COMPLETE_UP_TO,
) -> SecAggResult:
    """Coordinator: remove the masks from the survivors' masked updates and decode their sum.

    ``masked``: silo -> masked update (the survivors U2); ``responses``: silo -> :meth:`SecAggClient.unmask`
    output (at least the threshold of them); ``adverts``: the round's adverts (U0); ``roster``: the
    federation's configured silos, which fix the threshold, the Shamir x-coordinates and (with
    ``complete_up_to``, as the silos used it) the masking graph. Masked updates, responses or adverts
    from names outside the roster are refused, naming them.
    """
    params = params or SecAggParams()
    pinned = _pinned_roster(roster, params)
    _outside("masked update", masked, pinned)
    _outside("unmask response", responses, pinned)
    known = _parse_adverts(adverts, round_id, params, pinned)
    graph = masking_graph(pinned, round_id, complete_up_to=complete_up_to)
    index = {name: i + 1 for i, name in enumerate(pinned)}  # Shamir x-coordinates
    t = params.threshold(len(pinned))  # survivors needed, roster-wide
    t_local = graph.threshold(params)  # shares needed to rebuild one silo's secret
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
        if upd.layout != first.layout:
            raise SecAggError(f"silo {name!r}: tensor layout differs from silo {first.silo!r}")
        holders = set(graph.holders(name))
        if name not in upd.partners or not set(upd.partners) <= holders or len(upd.partners) < t_local:
            raise SecAggError(
                f"silo {name!r} masked against {list(upd.partners)}: not itself and at least {t_local} of "
                f"its holders {sorted(holders)} in the round's masking graph"
            )
        if not set(upd.partners) <= set(known):
            raise SecAggError(
                f"silo {name!r} masked against {list(upd.partners)}, not all of them advertised"
            )
    alive = sorted(updates)
    for name, upd in updates.items():  # two survivors' pairwise mask cancels only if both applied it
        for v in set(upd.partners) & set(alive) - {name}:
            if name not in updates[v].partners:
                raise SecAggError(
                    f"silo {name!r} masked against {v!r}, but {v!r} not against {name!r}: inconsistent "
                    "key-sharing sets"
                )
    partners = {p for upd in updates.values() for p in upd.partners}
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
                if name not in graph.holders(u):
                    raise SecAggError(f"silo {name!r} revealed a seed share of {u!r}, whose holder it is not")
                seed_points[u][index[name]] = int(share, 16)
            for u, share in dict(d["key_shares"]).items():
                if u not in key_points:
                    raise SecAggError(f"silo {name!r} revealed a key share of {u!r}, who did not drop out")
                if name not in graph.neighbours[u]:
                    raise SecAggError(f"silo {name!r} revealed a key share of {u!r}, whose holder it is not")
                key_points[u][index[name]] = int(share, 16)
        except (KeyError, ValueError, TypeError) as exc:
            raise SecAggError(f"unmask response from {name!r} is malformed ({exc!r})") from None

    n = first.values.size
    total = np.zeros(n, dtype=np.uint32)
    for upd in updates.values():
        total += upd.values
    for u in alive:
        if len(seed_points[u]) < t_local:
            raise SecAggError(
                f"only {len(seed_points[u])} shares of silo {u!r}'s self-mask seed, need {t_local}"
            )
        seed = _shamir_combine(dict(list(seed_points[u].items())[:t_local]))
        if _commit(seed, round_id, u) != known[u].commitment:
            raise SecAggError(
                f"silo {u!r}: rebuilt self-mask seed does not match its commitment (bad shares)"
            )
        total -= _prg(_self_mask_key(seed, round_id, u), n)
    for u in dropped:
        if len(key_points[u]) < t_local:
            raise SecAggError(
                f"only {len(key_points[u])} shares of dropped silo {u!r}'s mask key, need {t_local}"
            )
        raw = _shamir_combine(dict(list(key_points[u].items())[:t_local]))
        key = X25519PrivateKey.from_private_bytes(raw)
        if _raw_public(key) != known[u].mask_key:
            raise SecAggError(f"dropped silo {u!r}: rebuilt mask key does not match its advert (bad shares)")
        for v in (v for v in alive if u in updates[v].partners):  # v added +PRG if v < u, -PRG otherwise
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
    "COMPLETE_UP_TO",
    "Advert",
    "EncodedUpdate",
    "MaskedUpdate",
    "MaskingGraph",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggResult",
    "decode_sum",
    "encode_update",
    "harary_degree",
    "masking_graph",
    "unmask_sum",
]
