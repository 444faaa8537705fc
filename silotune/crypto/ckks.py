"""CKKS (RLWE) encryption of adapter deltas for homomorphic FedAvg, on TenSEAL.

Cheon, Kim, Kim, Song, "Homomorphic Encryption for Arithmetic of Approximate
Numbers", ASIACRYPT 2017; the library is Microsoft SEAL through TenSEAL
(Benaissa et al., 2021).

Roles. One silo creates a *secret context* (:func:`create_secret_context`) and
copies it to the other silos out of band; the coordinator gets only
:func:`public_context` (no secret key; checked). A silo encrypts its delta
already multiplied by its FedAvg weight ``n_k / n`` (:func:`encrypt_update`):
the chain here is addition-only, so the coordinator cannot multiply by a
scalar. The coordinator adds ciphertexts (:func:`sum_encrypted`) and refuses to
do so with a context that holds a secret key. Silos decrypt the aggregate
(:func:`decrypt_update`). Everything fails closed with :class:`EncryptionError`:
nothing here ever returns plaintext when asked to encrypt.

Two encodings, chosen by :class:`CkksParams` (named presets in
:data:`CKKS_PRESETS`):

``"slots"`` -- standard CKKS. One float per slot (``N/2`` slots per ciphertext),
encoded at scale ``global_scale`` through the canonical embedding with
TenSEAL's ``CKKSVector``. The ``"tenseal-default"`` preset (N=8192,
[60, 40, 40, 60], 2^40) is TenSEAL's tutorial setting: about 20x the fp32 bytes.

``"packed"`` (the default, preset ``"packed-n4096"``) -- fixed-point
coefficient packing with seeded symmetric encryption. Measured on a
460,800-value delta (``bench/crypto_bytes.py``, 2-core CPU): 1.02x the fp32
bytes (the default: 20.3x), encryption 11x faster than the default, error
1.2e-7 on a 4-silo aggregate. The error is fixed-point rounding, at most
``2^-(frac_bits+1)`` per summed update (the default's CKKS noise is smaller,
~1e-8): with the defaults (``value_bound=0.125``, ``frac_bits=24``,
``noise_bits=12``, ``max_silos=32``) at most 9.5e-7 for the largest aggregate
allowed. Three levers, each measured on its own:

1. Shorter chain. Addition needs no rescaling, so one 60-bit data prime
   suffices: N=4096, ``[60, 49]`` (the 49-bit prime is SEAL's special prime,
   present only in keys). Ciphertexts hold one residue per coefficient.
2. Seeded symmetric encryption. A ciphertext is ``(c0, c1) = (-a*s + e + m, a)``
   with ``a`` uniform. Encrypting with the *secret* key lets SEAL store the seed
   of ``a`` instead of ``a`` (``Encryptor.encrypt_symmetric`` returning a
   ``Serializable``): half the bytes. TenSEAL's own ``CKKSVector.serialize``
   never does this, even for a symmetric context (measured: same 20.3x), so this
   module drives SEAL through ``tenseal.sealapi``. The coordinator's sum is a
   full ciphertext (``sum(a_k)`` has no seed); a silo holding only the public
   context can still encrypt (public-key encryption, about 2x the fp32 bytes).
3. Coefficient packing. Instead of the canonical embedding (``N/2`` slots, each
   decoded through a double-precision FFT), the integers go straight into the
   ``N`` polynomial coefficients, two values per coefficient:
   each weighted value ``w*x`` becomes ``d = round(w*x * 2^frac_bits)``, two such
   signed digits of ``digit_bits`` bits form ``V = d0 + d1 * 2^digit_bits`` and
   the coefficient is ``V * 2^noise_bits mod q``. Ciphertext addition adds
   coefficients, hence digits, without carries between them as long as every
   digit sum stays in ``±2^(digit_bits-1)``: ``|x| <= value_bound`` is enforced
   at encryption, weights are at most 1 and sum to at most 1 (checked by the
   coordinator), so a digit sum is at most ``value_bound * 2^frac_bits`` plus
   half a unit per silo for rounding; ``digit_bits`` is derived with that
   headroom for ``max_silos`` (23 bits with the defaults). The RLWE noise
   (fresh symmetric noise is bounded by SEAL's clipped sampler at about 20 per
   coefficient, public-key noise has a standard deviation of about 15) lives
   below ``2^noise_bits`` and is rounded away exactly: decoding accepts
   ``|noise| < 2^(noise_bits-2)`` (1024; measured maxima for 32 summed updates:
   76 seeded, 325 public-key). That check also catches a wrong key or a
   corrupted ciphertext instead of returning garbage.

Security. Encryption is the same RLWE encryption as CKKS (SEAL checks the
parameters against the HE-standard 128-bit table); the encoding only decides
which polynomial is encrypted. A packed aggregate decodes to exact integers with
the noise rounded away, so its plaintext reveals nothing about the secret key;
a ``"slots"`` aggregate decrypts to values that still carry noise, and
publishing such raw decryptions to a party holding the ciphertexts enables
key-recovery attacks on CKKS (Li and Micciancio, EUROCRYPT 2021): round them
before they leave the silo. The update header (tensor names, shapes, dtypes,
weight, count) is plaintext metadata; integrity against a deliberate attacker
comes from signatures (:mod:`silotune.crypto.signing`), the header's payload
digest only catches accidents. Nothing here stops a malicious silo from
encrypting a poisoned (but in-range) update: under encryption only client-side
clipping and the value bound apply.

Implementation note: coefficient packing needs a plaintext in NTT form that no
public TenSEAL or SEAL encoder produces. It is built with SEAL's own NTT (the
``util`` submodule of TenSEAL's SEAL bindings, reached as
``tenseal.sealapi._sealapi_cpp.util`` because ``tenseal.sealapi`` does not
re-export it: pin TenSEAL) and loaded from SEAL's serialisation format,
uncompressed; SEAL validates what it loads. SEAL objects serialise only through
files in these bindings, so the silo's own quantised update passes through a
private temporary directory (mode 0700, ``/dev/shm`` when available) that is
deleted on return.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tenseal as ts
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tenseal import sealapi

from silotune.errors import SilotuneError
from silotune.registry import Registry

TensorDict = dict[str, torch.Tensor]


class EncryptionError(SilotuneError):
    """Encryption, homomorphic summation or decryption failed; nothing was produced."""


# -- parameters ----------------------------------------------------------------------------

# Largest total coefficient-modulus bit count per ring degree at 128-bit classical security
# (HomomorphicEncryption.org standard; the table SEAL enforces).
_MAX_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
# Encryption noise in packed mode, in coefficient units. Fresh symmetric noise is bounded by SEAL's
# clipped sampler (|e| <= 21), so a sum of S updates stays within 21*S; public-key noise has sigma ~15
# (measured max 52 over 4096 coefficients) and a sum's grows as 15*sqrt(S). Decoding accepts
# |noise| < 2^(noise_bits-2); this allowance (>= 32*S and >= ~10 sigma) must fit in it.


def _noise_allowance(silos: int) -> float:
    return max(32.0 * silos, 160.0 * math.sqrt(silos))


_FLOAT_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


class CkksParams(BaseModel):
    """Encryption parameters; every silo and the coordinator must use the same ones.

    The defaults are the ``"packed-n4096"`` preset. Cross-field checks name the bad value.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    poly_modulus_degree: int = Field(default=4096, description="Ring degree N (power of two, 1024..32768).")
    coeff_mod_bit_sizes: tuple[int, ...] = Field(
        default=(60, 49),
        description="Bit sizes of the coefficient-modulus primes; the last is SEAL's special prime "
        "(keys only), the others are the data level every ciphertext carries.",
    )
    global_scale: float = Field(default=2.0**40, description="CKKS scale (slots encoding only).")
    encoding: Literal["packed", "slots"] = Field(
        default="packed",
        description="'packed': fixed-point values packed into polynomial coefficients, seeded "
        "symmetric encryption; 'slots': standard CKKS canonical-embedding encoding via TenSEAL.",
    )
    value_bound: float = Field(
        default=0.125, description="Packed only: largest |delta| value accepted; larger values are refused."
    )
    frac_bits: int = Field(
        default=24, description="Packed only: fixed-point resolution 2^-frac_bits (rounding error half that)."
    )
    noise_bits: int = Field(
        default=12, description="Packed only: low coefficient bits reserved for RLWE noise."
    )
    max_silos: int = Field(default=32, description="Packed only: most updates one aggregate may sum.")

    @model_validator(mode="after")
    def _check(self) -> CkksParams:
        problems: list[str] = []
        n = self.poly_modulus_degree
        if n not in _MAX_BITS_128:
            problems.append(f"poly_modulus_degree={n} must be one of {sorted(_MAX_BITS_128)}")
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2:
            problems.append(f"coeff_mod_bit_sizes={list(bits)} needs a data prime and a special prime")
        if any(not 20 <= b <= 60 for b in bits):
            problems.append(f"coeff_mod_bit_sizes={list(bits)}: each prime must have 20..60 bits")
        if n in _MAX_BITS_128 and sum(bits) > _MAX_BITS_128[n]:
            problems.append(
                f"coeff_mod_bit_sizes={list(bits)} total {sum(bits)} bits exceeds the 128-bit-security "
                f"limit {_MAX_BITS_128[n]} for N={n}"
            )
        if self.encoding == "slots":
            if not (math.isfinite(self.global_scale) and self.global_scale > 1):
                problems.append(f"global_scale={self.global_scale} must be a finite number > 1")
        else:
            if len(bits) != 2:
                problems.append(
                    f"packed encoding needs exactly one data prime plus the special prime, "
                    f"got coeff_mod_bit_sizes={list(bits)}"
                )
            if not (math.isfinite(self.value_bound) and self.value_bound > 0):
                problems.append(f"value_bound={self.value_bound} must be a finite number > 0")
            if not 1 <= self.frac_bits <= 52:
                problems.append(f"frac_bits={self.frac_bits} must be in 1..52")
            if not 8 <= self.noise_bits <= 40:
                problems.append(f"noise_bits={self.noise_bits} must be in 8..40")
            if self.max_silos < 1:
                problems.append(f"max_silos={self.max_silos} must be >= 1")
            elif self.noise_bits >= 8 and _noise_allowance(self.max_silos) > 2 ** (self.noise_bits - 2):
                problems.append(
                    f"max_silos={self.max_silos} needs noise_bits >= "
                    f"{math.ceil(math.log2(_noise_allowance(self.max_silos))) + 2}, got {self.noise_bits}"
                )
            if not problems and self.values_per_coefficient < 1:
                problems.append(
                    f"a {self.digit_bits}-bit digit (value_bound={self.value_bound}, frac_bits="
                    f"{self.frac_bits}, max_silos={self.max_silos}) plus noise_bits={self.noise_bits} "
                    f"does not fit a {bits[0]}-bit data prime"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def digit_bits(self) -> int:
        """Bits per packed value: the largest digit sum of ``max_silos`` updates, plus a sign bit."""
        largest = self.value_bound * 2.0**self.frac_bits * (1 + 1e-6) + self.max_silos / 2 + 1
        return math.ceil(math.log2(largest)) + 1

    @property
    def values_per_coefficient(self) -> int:
        """How many values one coefficient packs (packed encoding)."""
        # Coefficients are centred in (-q/2, q/2) with q > 2^(bits-1): keep |coefficient| < 2^(bits-2).
        return (self.coeff_mod_bit_sizes[0] - 2 - self.noise_bits) // self.digit_bits

    @property
    def values_per_ciphertext(self) -> int:
        if self.encoding == "slots":
            return self.poly_modulus_degree // 2
        return self.poly_modulus_degree * self.values_per_coefficient


CKKS_PRESETS: Registry[CkksParams] = Registry("CKKS preset")
DEFAULT_PRESET = "packed-n4096"
CKKS_PRESETS.register(DEFAULT_PRESET)(CkksParams())
# Up to 128 silos: 2 more noise bits for the sum of 128 encryption noises and one fractional bit less,
# so two values still share a coefficient (the same bytes as the default); rounding error at most
# 2^-24 per summed update.
CKKS_PRESETS.register("packed-n4096-s128")(CkksParams(max_silos=128, noise_bits=14, frac_bits=23))
CKKS_PRESETS.register("tenseal-default")(
    CkksParams(
        poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), global_scale=2.0**40, encoding="slots"
    )
)
CKKS_PRESETS.register("slots-n4096")(
    CkksParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 49), global_scale=2.0**40, encoding="slots")
)


def ckks_preset(name: str) -> CkksParams:
    """The named parameter set; an unknown name raises a RegistryError listing the known ones."""
    return CKKS_PRESETS.get(name)


# -- contexts ------------------------------------------------------------------------------

_CONTEXT_MAGIC = b"STCKCTX1"
_UPDATE_MAGIC = b"STCKUPD1"
_FORMAT_VERSION = 1
_MAX_HEADER = 64 * 2**20
_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major/minor, compression, -, size


@contextmanager
def _scratch() -> Iterator[Path]:
    """A private temporary directory (mode 0700), in RAM when /dev/shm is available."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="silotune-ckks-", dir=base) as d:
        yield Path(d)


def _fingerprint(params: CkksParams, moduli: Sequence[int]) -> str:
    doc = {"params": params.model_dump(mode="json"), "moduli": [str(m) for m in moduli], "scheme": "ckks"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


class CkksContext:
    """A loaded context: TenSEAL context, parameters, fingerprint and key id.

    Load once with :func:`load_context` and pass it to the functions below instead of bytes
    when encrypting or decrypting many updates.
    """

    def __init__(self, params: CkksParams, tenseal_context: ts.Context) -> None:
        self.params = params
        self.tenseal = tenseal_context
        self.is_private = bool(tenseal_context.is_private())
        seal_ctx = tenseal_context.seal_context().data
        data = seal_ctx.first_context_data()
        moduli = [m.value() for m in data.parms().coeff_modulus()]
        key_bits = [m.bit_count() for m in seal_ctx.key_context_data().parms().coeff_modulus()]
        if data.parms().poly_modulus_degree() != params.poly_modulus_degree or key_bits != list(
            params.coeff_mod_bit_sizes
        ):
            raise EncryptionError("the TenSEAL context does not match its recorded parameters")
        self.fingerprint = _fingerprint(params, moduli)
        self._seal_ctx = seal_ctx
        self._data_moduli = moduli
        with _scratch() as d:
            path = str(d / "pk")
            tenseal_context.public_key().data.save(path)
            pk = Path(path).read_bytes()
        self.key_id = hashlib.sha256(pk).hexdigest()[:32]
        magic, _, major, minor, *_ = _SEAL_HEADER.unpack_from(pk)
        if magic != _SEAL_MAGIC:
            raise EncryptionError("unexpected SEAL serialisation header")
        self._seal_version = (major, minor)
        self._ntt_tables: Any = None
        self._ntt_owner: Any = None

    # SEAL helpers for the packed encoding, built on first use.
    @property
    def q(self) -> int:
        return int(self._data_moduli[0])

    def _ntt(self) -> Any:
        if self._ntt_tables is None:
            util = sealapi._sealapi_cpp.util
            modulus = self._seal_ctx.first_context_data().parms().coeff_modulus()[0]
            # Keep the owning pointer alive: the tables die with it (a dangling table corrupts memory).
            self._ntt_owner = util.CreateNTTTables(int(math.log2(self.params.poly_modulus_degree)), [modulus])
            self._ntt_tables = self._ntt_owner.get()
        return self._ntt_tables

    def _seal_header(self, size: int) -> bytes:
        major, minor = self._seal_version
        return _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, major, minor, 0, 0, size)

    def _plaintext_bytes(self, ntt_values: np.ndarray) -> bytes:
        """SEAL's uncompressed serialisation of an NTT-form plaintext at the data level, scale 1."""
        arr = np.ascontiguousarray(ntt_values, dtype="<u8").tobytes()
        dyn = self._seal_header(_SEAL_HEADER.size + 8 + len(arr)) + struct.pack("<Q", ntt_values.size) + arr
        pid = self._seal_ctx.first_parms_id()
        body = struct.pack("<4Q", *pid) + struct.pack("<Qd", ntt_values.size, 1.0) + dyn
        return self._seal_header(_SEAL_HEADER.size + len(body)) + body


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _as_context(context: bytes | CkksContext) -> CkksContext:
    return context if isinstance(context, CkksContext) else load_context(context)


def _pack_envelope(magic: bytes, header: Mapping[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return magic + struct.pack(">I", len(head)) + head + payload


def _unpack_envelope(blob: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], memoryview]:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise EncryptionError(f"{what}: expected bytes, got {type(blob).__name__}")
    view = memoryview(blob)
    if len(view) < len(magic) + 4 or bytes(view[: len(magic)]) != magic:
        raise EncryptionError(f"{what}: not a silotune CKKS {what} (bad magic or too short)")
    (n,) = struct.unpack_from(">I", view, len(magic))
    start = len(magic) + 4
    if n > _MAX_HEADER or start + n > len(view):
        raise EncryptionError(f"{what}: truncated header")
    try:
        header = json.loads(bytes(view[start : start + n]))
    except ValueError as exc:
        raise EncryptionError(f"{what}: unreadable header ({exc})") from None
    if not isinstance(header, dict):
        raise EncryptionError(f"{what}: header is not an object")
    return header, view[start + n :]


def create_secret_context(params: CkksParams | str | None = None) -> bytes:
    """A new key pair under ``params`` (a :class:`CkksParams`, a preset name, or the default preset).

    The bytes hold the secret key: keep them at the silos, never give them to the coordinator.
    """
    if params is None:
        params = ckks_preset(DEFAULT_PRESET)
    elif isinstance(params, str):
        params = ckks_preset(params)
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
        ctx.global_scale = params.global_scale
        # Addition only: no Galois keys; relinearisation keys are not needed either.
        raw = ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    except (ValueError, RuntimeError) as exc:
        raise EncryptionError(f"could not create a CKKS context for {params!r}: {exc}") from None
    return _pack_envelope(_CONTEXT_MAGIC, {"params": params.model_dump(mode="json")}, raw)


def load_context(data: bytes) -> CkksContext:
    """Parse context bytes from :func:`create_secret_context` or :func:`public_context`."""
    header, raw = _unpack_envelope(data, _CONTEXT_MAGIC, "context")
    try:
        params = CkksParams.model_validate(header.get("params"))
    except ValueError as exc:
        raise EncryptionError(f"context: invalid parameters ({exc})") from None
    try:
        ctx = ts.context_from(bytes(raw))
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError subclasses from C++
        raise EncryptionError(f"context: unreadable TenSEAL context ({exc})") from None
    ctx.global_scale = params.global_scale
    return CkksContext(params, ctx)


def public_context(secret_context: bytes | CkksContext) -> bytes:
    """The same context without the secret key: what the coordinator may hold."""
    ctx = _as_context(secret_context)
    try:
        pub = ctx.tenseal.copy()
        pub.make_context_public(generate_galois_keys=False, generate_relin_keys=False)
        raw = pub.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    except (ValueError, RuntimeError) as exc:
        raise EncryptionError(f"could not derive a public context: {exc}") from None
    out = _pack_envelope(_CONTEXT_MAGIC, {"params": ctx.params.model_dump(mode="json")}, raw)
    check = load_context(out)
    if check.is_private or check.tenseal.is_private():
        raise EncryptionError("derived public context still holds a secret key; refusing to return it")
    return out


# -- update blobs --------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateHeader:
    """Plaintext metadata of an encrypted update or aggregate."""

    encoding: str
    fingerprint: str
    key_id: str
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    numel: int
    weight: float
    count: int
    seeded: bool
    n_ciphertexts: int
    payload_sha256: str

    @property
    def layout(self) -> tuple[Any, ...]:
        return (self.encoding, self.keys, self.shapes, self.dtypes, self.numel, self.n_ciphertexts)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _FORMAT_VERSION,
            "encoding": self.encoding,
            "fingerprint": self.fingerprint,
            "key_id": self.key_id,
            "keys": list(self.keys),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
            "numel": self.numel,
            "weight": self.weight,
            "count": self.count,
            "seeded": self.seeded,
            "n_ciphertexts": self.n_ciphertexts,
            "payload_sha256": self.payload_sha256,
        }


def _parse(blob: bytes) -> tuple[UpdateHeader, list[bytes]]:
    h, payload = _unpack_envelope(blob, _UPDATE_MAGIC, "update")
    try:
        if h["version"] != _FORMAT_VERSION:
            raise EncryptionError(f"update: format version {h['version']!r} is not {_FORMAT_VERSION}")
        header = UpdateHeader(
            encoding=str(h["encoding"]),
            fingerprint=str(h["fingerprint"]),
            key_id=str(h["key_id"]),
            keys=tuple(str(k) for k in h["keys"]),
            shapes=tuple(tuple(int(d) for d in s) for s in h["shapes"]),
            dtypes=tuple(str(d) for d in h["dtypes"]),
            numel=int(h["numel"]),
            weight=float(h["weight"]),
            count=int(h["count"]),
            seeded=bool(h["seeded"]),
            n_ciphertexts=int(h["n_ciphertexts"]),
            payload_sha256=str(h["payload_sha256"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EncryptionError(f"update: malformed header ({exc!r})") from None
    if not (len(header.keys) == len(header.shapes) == len(header.dtypes)) or any(
        d not in _FLOAT_DTYPES for d in header.dtypes
    ):
        raise EncryptionError("update: malformed header (keys, shapes and dtypes disagree)")
    if sum(math.prod(s) for s in header.shapes) != header.numel or header.numel <= 0:
        raise EncryptionError("update: malformed header (shapes do not add up to numel)")
    if not (math.isfinite(header.weight) and header.weight > 0 and header.count >= 1):
        raise EncryptionError("update: malformed header (weight or count)")
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise EncryptionError("update: payload does not match its digest (corrupted, truncated or tampered)")
    cts: list[bytes] = []
    pos = 0
    while pos < len(payload):
        if pos + 4 > len(payload):
            raise EncryptionError("update: truncated ciphertext framing")
        (n,) = struct.unpack_from(">I", payload, pos)
        if pos + 4 + n > len(payload):
            raise EncryptionError("update: truncated ciphertext")
        cts.append(bytes(payload[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    if len(cts) != header.n_ciphertexts:
        raise EncryptionError(f"update: {len(cts)} ciphertexts, header says {header.n_ciphertexts}")
    return header, cts


def _check_against(header: UpdateHeader, ctx: CkksContext) -> str | None:
    """Why ``header`` cannot belong to ``ctx`` (None when it can)."""
    if header.fingerprint != ctx.fingerprint or header.encoding != ctx.params.encoding:
        return "encrypted under other parameters than this context"
    if header.key_id != ctx.key_id:
        return "encrypted under another key than this context's"
    if header.n_ciphertexts != -(-header.numel // ctx.params.values_per_ciphertext):
        return f"{header.n_ciphertexts} ciphertexts cannot hold {header.numel} values under these parameters"
    return None


def read_header(blob: bytes) -> UpdateHeader:
    """The plaintext metadata of an encrypted update (also checks the payload digest)."""
    return _parse(blob)[0]


def _build(header: UpdateHeader, cts: Sequence[bytes]) -> bytes:
    payload = b"".join(struct.pack(">I", len(c)) + c for c in cts)
    h = header.to_json() | {"payload_sha256": hashlib.sha256(payload).hexdigest(), "n_ciphertexts": len(cts)}
    return _pack_envelope(_UPDATE_MAGIC, h, payload)


def _flatten(
    delta: Mapping[str, torch.Tensor],
) -> tuple[list[str], list[tuple[int, ...]], list[str], np.ndarray]:
    if not isinstance(delta, Mapping) or not delta:
        raise EncryptionError("nothing to encrypt: the update has no tensors")
    keys = sorted(delta)
    shapes, dtypes, parts = [], [], []
    for key in keys:
        t = delta[key]
        if not isinstance(t, torch.Tensor):
            raise EncryptionError(f"tensor {key!r}: expected a tensor, got {type(t).__name__}")
        if not t.is_floating_point() or str(t.dtype) not in _FLOAT_DTYPES:
            raise EncryptionError(f"tensor {key!r}: dtype {t.dtype} is not a supported floating point type")
        flat = t.detach().to("cpu", torch.float64).reshape(-1).numpy()
        if not np.isfinite(flat).all():
            bad = int((~np.isfinite(flat)).sum())
            raise EncryptionError(f"tensor {key!r}: {bad} non-finite value(s) (NaN/Inf)")
        shapes.append(tuple(t.shape))
        dtypes.append(str(t.dtype))
        parts.append(flat)
    x = np.concatenate(parts)
    if x.size == 0:
        raise EncryptionError("nothing to encrypt: every tensor is empty")
    return keys, shapes, dtypes, x


def _unflatten(header: UpdateHeader, x: np.ndarray) -> TensorDict:
    out: TensorDict = {}
    pos = 0
    for key, shape, dtype in zip(header.keys, header.shapes, header.dtypes, strict=True):
        n = math.prod(shape)
        out[key] = torch.from_numpy(x[pos : pos + n].copy()).reshape(shape).to(_FLOAT_DTYPES[dtype])
        pos += n
    return out


# -- packed encoding -----------------------------------------------------------------------


def _packed_encrypt(ctx: CkksContext, y: np.ndarray) -> tuple[list[bytes], bool]:
    p = ctx.params
    n, k, b, u = p.poly_modulus_degree, p.values_per_coefficient, p.digit_bits, p.noise_bits
    digits = np.rint(y * 2.0**p.frac_bits).astype(np.int64)
    per_ct = n * k
    padded = np.zeros(-(-digits.size // per_ct) * per_ct, dtype=np.int64)
    padded[: digits.size] = digits
    d = padded.reshape(-1, k, n)
    packed = np.zeros(d[:, 0, :].shape, dtype=np.int64)
    for j in range(k):  # |packed| < 2^(k*b-1) and k*b + u <= 60: no int64 overflow below
        packed += d[:, j, :] << (b * j)
    q = ctx.q
    coeffs = (packed << u) % q  # numpy's % is non-negative for a positive modulus
    util = sealapi._sealapi_cpp.util
    tables = ctx._ntt()
    seal_ctx = ctx._seal_ctx
    seeded = ctx.is_private
    try:
        if seeded:
            encryptor = sealapi.Encryptor(seal_ctx, ctx.tenseal.secret_key().data)
        else:
            encryptor = sealapi.Encryptor(seal_ctx, ctx.tenseal.public_key().data)
        out: list[bytes] = []
        with _scratch() as scratch:
            path = str(scratch / "obj")
            for row in coeffs:
                ntt = np.asarray(util.ntt_negacyclic_harvey(row.tolist(), tables), dtype=np.uint64)
                Path(path).write_bytes(ctx._plaintext_bytes(ntt))
                plain = sealapi.Plaintext()
                plain.load(seal_ctx, path)
                if seeded:
                    encryptor.encrypt_symmetric(plain).save(path)
                else:
                    ct = sealapi.Ciphertext()
                    encryptor.encrypt(plain, ct)
                    if ct.is_transparent():
                        raise EncryptionError("SEAL produced a transparent ciphertext")
                    ct.save(path)
                del plain
                blob = Path(path).read_bytes()
                Path(path).unlink()
                out.append(blob)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise EncryptionError(f"packed encryption failed: {exc}") from None
    return out, seeded


def _packed_decrypt(ctx: CkksContext, cts: Sequence[bytes], numel: int) -> np.ndarray:
    p = ctx.params
    n, k, b, u = p.poly_modulus_degree, p.values_per_coefficient, p.digit_bits, p.noise_bits
    q = np.uint64(ctx.q)
    util = sealapi._sealapi_cpp.util
    tables = ctx._ntt()
    seal_ctx = ctx._seal_ctx
    rows = []
    try:
        decryptor = sealapi.Decryptor(seal_ctx, ctx.tenseal.secret_key().data)
        with _scratch() as scratch:
            path = str(scratch / "obj")
            for blob in cts:
                Path(path).write_bytes(blob)
                ct = sealapi.Ciphertext()
                ct.load(seal_ctx, path)
                plain = sealapi.Plaintext()
                decryptor.decrypt(ct, plain)
                if not plain.is_ntt_form() or plain.coeff_count() != n:
                    raise EncryptionError("decrypted plaintext has an unexpected form")
                vals = util.inverse_ntt_negacyclic_harvey([plain[i] for i in range(n)], tables)
                del plain
                rows.append(np.asarray(vals, dtype=np.uint64))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise EncryptionError(f"packed decryption failed: {exc}") from None
    c = np.stack(rows) % q  # the bound inverse NTT is SEAL's lazy one: outputs lie in [0, 2q)
    c = c.astype(np.int64)  # q < 2^60: fits
    c = np.where(c > int(q) // 2, c - int(q), c)
    packed = (c + (1 << (u - 1))) >> u
    residual = c - (packed << u)
    if int(np.abs(residual).max()) >= 1 << (u - 2):
        raise EncryptionError(
            "decryption noise is out of range: wrong secret key, or a corrupted or tampered ciphertext"
        )
    digits = np.empty((c.shape[0], k, n), dtype=np.int64)
    half, mask = 1 << (b - 1), (1 << b) - 1
    for j in range(k):
        dj = ((packed + half) & mask) - half
        digits[:, j, :] = dj
        packed = (packed - dj) >> b
    if packed.any():
        raise EncryptionError("packed aggregate overflowed its digit headroom (weights summing above 1?)")
    return digits.reshape(-1)[:numel].astype(np.float64) * 2.0**-p.frac_bits


# -- slots encoding ------------------------------------------------------------------------


def _slots_encrypt(ctx: CkksContext, y: np.ndarray) -> list[bytes]:
    slots = ctx.params.poly_modulus_degree // 2
    try:
        return [
            ts.ckks_vector(ctx.tenseal, y[i : i + slots].tolist()).serialize()
            for i in range(0, y.size, slots)
        ]
    except (RuntimeError, ValueError, TypeError) as exc:
        raise EncryptionError(f"CKKS encryption failed: {exc}") from None


def _slots_decrypt(ctx: CkksContext, cts: Sequence[bytes], numel: int) -> np.ndarray:
    try:
        parts = [np.asarray(ts.ckks_vector_from(ctx.tenseal, c).decrypt(), dtype=np.float64) for c in cts]
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError and proto errors from C++
        raise EncryptionError(f"CKKS decryption failed: {exc}") from None
    x = np.concatenate(parts) if parts else np.zeros(0)
    if x.size < numel:
        raise EncryptionError(f"decrypted {x.size} values, expected {numel}")
    return x[:numel]


# -- public API ----------------------------------------------------------------------------


def encrypt_update(
    delta: Mapping[str, torch.Tensor], context: bytes | CkksContext, *, weight: float
) -> bytes:
    """Encrypt ``weight * delta`` for homomorphic FedAvg.

    ``weight`` is the silo's FedAvg weight ``n_k / n`` (in (0, 1]): the coordinator can only add.
    Tensors are flattened in sorted key order. With a secret context the ciphertexts are seeded
    (symmetric); with a public context they are public-key ciphertexts, twice as large.
    Raises :class:`EncryptionError` (never returns plaintext) on an empty update, a non-float or
    non-finite tensor, a value outside the packed ``value_bound``, or any encryption failure.
    """
    ctx = _as_context(context)
    if not _is_real(weight) or not (math.isfinite(weight) and 0 < weight <= 1):
        raise EncryptionError(f"weight={weight!r} must be a FedAvg weight n_k/n in (0, 1]")
    weight = float(weight)
    keys, shapes, dtypes, x = _flatten(delta)
    if ctx.params.encoding == "packed":
        bound = ctx.params.value_bound
        pos = 0
        for key, shape in zip(keys, shapes, strict=True):
            part = x[pos : pos + math.prod(shape)]
            pos += part.size
            if part.size and float(np.abs(part).max()) > bound:
                raise EncryptionError(
                    f"tensor {key!r}: |value| up to {float(np.abs(part).max()):.4g} exceeds value_bound="
                    f"{bound} of these parameters; clip the delta first or use a larger value_bound"
                )
        cts, seeded = _packed_encrypt(ctx, x * weight)
    else:
        cts, seeded = _slots_encrypt(ctx, x * weight), False
    if not cts:
        raise EncryptionError("nothing was encrypted")
    header = UpdateHeader(
        encoding=ctx.params.encoding,
        fingerprint=ctx.fingerprint,
        key_id=ctx.key_id,
        keys=tuple(keys),
        shapes=tuple(shapes),
        dtypes=tuple(dtypes),
        numel=int(x.size),
        weight=float(weight),
        count=1,
        seeded=seeded,
        n_ciphertexts=len(cts),
        payload_sha256="",
    )
    return _build(header, cts)


def sum_encrypted(
    blobs: Sequence[bytes], public_ctx: bytes | CkksContext, *, silos: Sequence[str] | None = None
) -> bytes:
    """Add encrypted updates (or partial sums) without decrypting: the coordinator's aggregation.

    Refuses a context that holds a secret key. Every blob must carry this context's parameter
    fingerprint and key, and the same tensor layout as the first; the error names the blob's index
    (and silo, when ``silos`` gives one name per blob). The weights may sum to at most 1.
    """
    ctx = _as_context(public_ctx)
    if ctx.is_private:
        raise EncryptionError(
            "refusing to aggregate with a context that holds a secret key; pass public_context()"
        )
    if not blobs:
        raise EncryptionError("nothing to aggregate: no encrypted updates")
    if silos is not None and len(silos) != len(blobs):
        raise EncryptionError(f"{len(silos)} silo names for {len(blobs)} updates")

    def where(i: int) -> str:
        return f"update {i}" + (f" (silo {silos[i]!r})" if silos is not None else "")

    parsed: list[tuple[UpdateHeader, list[bytes]]] = []
    for i, blob in enumerate(blobs):
        try:
            header, cts = _parse(blob)
        except EncryptionError as exc:
            raise EncryptionError(f"{where(i)}: {exc}") from None
        problem = _check_against(header, ctx)
        if problem:
            raise EncryptionError(f"{where(i)}: {problem}")
        if parsed and header.layout != parsed[0][0].layout:
            raise EncryptionError(f"{where(i)}: tensor layout differs from {where(0)}")
        parsed.append((header, cts))
    weight = math.fsum(h.weight for h, _ in parsed)
    count = sum(h.count for h, _ in parsed)
    if weight > 1 + 1e-9 * count:
        raise EncryptionError(f"weights sum to {weight:.12g} > 1: FedAvg weights n_k/n must sum to at most 1")
    if ctx.params.encoding == "packed" and count > ctx.params.max_silos:
        raise EncryptionError(f"{count} updates exceed max_silos={ctx.params.max_silos} of these parameters")
    ref = parsed[0][0]
    out_cts: list[bytes] = []
    try:
        if ctx.params.encoding == "slots":
            for j in range(ref.n_ciphertexts):
                acc = ts.ckks_vector_from(ctx.tenseal, parsed[0][1][j])
                for _, cts in parsed[1:]:
                    acc.add_(ts.ckks_vector_from(ctx.tenseal, cts[j]))
                out_cts.append(acc.serialize())
        else:
            evaluator = sealapi.Evaluator(ctx._seal_ctx)
            with _scratch() as scratch:
                path = str(scratch / "obj")
                for j in range(ref.n_ciphertexts):
                    acc = None
                    for _, cts in parsed:
                        Path(path).write_bytes(cts[j])
                        ct = sealapi.Ciphertext()
                        ct.load(ctx._seal_ctx, path)
                        if acc is None:
                            acc = ct
                        else:
                            evaluator.add_inplace(acc, ct)
                    assert acc is not None
                    acc.save(path)
                    out_cts.append(Path(path).read_bytes())
    except Exception as exc:  # SEAL/TenSEAL raise ValueError, RuntimeError or proto errors
        raise EncryptionError(f"homomorphic addition failed (corrupted ciphertext?): {exc}") from None
    header = dataclasses.replace(ref, weight=weight, count=count, seeded=False)
    return _build(header, out_cts)


def decrypt_update(blob: bytes, secret_ctx: bytes | CkksContext, *, min_count: int = 1) -> TensorDict:
    """Decrypt an aggregate (or one update) into tensors with the original keys, shapes and dtypes.

    ``min_count``: refuse blobs that sum fewer updates (a silo should decrypt only aggregates).
    """
    ctx = _as_context(secret_ctx)
    if not ctx.is_private:
        raise EncryptionError("cannot decrypt with a public context: it holds no secret key")
    header, cts = _parse(blob)
    problem = _check_against(header, ctx)
    if problem:
        raise EncryptionError(f"update: {problem}")
    if header.count < min_count:
        raise EncryptionError(f"refusing to decrypt: sums {header.count} update(s), min_count={min_count}")
    if ctx.params.encoding == "packed":
        x = _packed_decrypt(ctx, cts, header.numel)
    else:
        x = _slots_decrypt(ctx, cts, header.numel)
    return _unflatten(header, x)


__all__ = [
    "CKKS_PRESETS",
    "DEFAULT_PRESET",
    "CkksContext",
    "CkksParams",
    "EncryptionError",
    "UpdateHeader",
    "ckks_preset",
    "create_secret_context",
    "decrypt_update",
    "encrypt_update",
    "load_context",
    "public_context",
    "read_header",
    "sum_encrypted",
]
