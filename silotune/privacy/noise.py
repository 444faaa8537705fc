"""Privacy noise from a cryptographically secure generator keyed by the silo's secret.

Every Gaussian draw that protects a silo's data comes from here: client-level DP
noise on an update and the DP-SGD noise that Opacus adds at every step.

The generator is ChaCha20 (RFC 8439, through the ``cryptography`` package). Its key
is derived with HMAC-SHA256 from the silo's noise secret and everything that fixes
the released update (:func:`derive_noise_key`): the purpose, the federation, the
round, the silo and the round's inputs (the global adapter's sha256, the config
fingerprint, the data's sha256). Hence:

- a retried round with the very same inputs releases the very same update, so it
  costs no extra privacy (the ledger counts it once);
- a round re-run with a *different* input (another global, say) draws independent
  noise: two releases never share noise, which would cancel in their difference;
- nobody without the silo's secret can predict or reproduce the noise (ChaCha20's
  keystream is indistinguishable from random without its 256-bit key), unlike a
  Mersenne Twister seeded with 63 bits, whose state can be recovered from its output.

From keystream to Gaussian: 64 keystream bits give a uniform ``u = (⌊x/2¹¹⌋ + ½)·2⁻⁵³``
in the open interval (0, 1), exact in float64; the Box–Muller transform turns each
pair ``(u₁, u₂)`` into two independent standard normals ``√(−2 ln u₁)·(cos 2πu₂, sin 2πu₂)``,
computed in float64, scaled by ``std`` and cast once to the tensor's dtype. The
smallest ``u₁`` is 2⁻⁵⁴, so the tails stop at 8.66 σ (mass beyond: ~5·10⁻¹⁸).

Each tensor has its own keystream, keyed by HMAC(key, tensor name): the noise of a
tensor depends on its name, shape and the key only, never on dict order or on the
other tensors.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

KEY_BYTES = 32
_NONCE = bytes(16)  # ChaCha20 in `cryptography`: 4-byte counter || 12-byte nonce; every key is used once
_DOMAIN = b"silotune/noise-key/v1\x00"
_TENSOR_DOMAIN = b"silotune/noise-tensor/v1\x00"
_SUBKEY_DOMAIN = b"silotune/noise-subkey/v1\x00"
_TWO_PI = 2.0 * math.pi

Shape = torch.Size | tuple[int, ...] | list[int]


def _check_key(key: bytes, what: str = "noise key") -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        got = f"{len(key)} bytes" if isinstance(key, bytes | bytearray) else type(key).__name__
        raise ValueError(f"{what} must be {KEY_BYTES} bytes, got {got}")
    return bytes(key)


def derive_noise_key(
    secret: bytes,
    *,
    purpose: str,
    federation_id: str,
    round: int,
    silo: str,
    inputs: Mapping[str, str],
) -> bytes:
    """The 32-byte ChaCha20 key for one release: HMAC-SHA256(secret, canonical encoding).

    ``secret`` is the silo's noise secret (at least 32 bytes, never leaves the silo).
    ``purpose`` separates the uses ("dp-sgd", "client-dp", ...). ``inputs`` are the
    round's inputs (``global_sha256``, ``config_fingerprint``, ``data_sha256``): any
    change to any of them gives an independent key. The encoding is canonical JSON
    (sorted keys, no whitespace, ASCII) behind a domain-separation prefix, so two
    different argument tuples never encode to the same message.
    """
    if not isinstance(secret, bytes | bytearray) or len(secret) < KEY_BYTES:
        raise ValueError(f"noise secret must be at least {KEY_BYTES} bytes")
    problems = []
    for name, value in (("purpose", purpose), ("federation_id", federation_id), ("silo", silo)):
        if not isinstance(value, str) or not value:
            problems.append(f"{name} must be a non-empty string, got {value!r}")
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        problems.append(f"round must be an integer >= 0, got {round!r}")
    if not isinstance(inputs, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in inputs.items()
    ):
        problems.append(f"inputs must map str to str, got {inputs!r}")
    if problems:
        raise ValueError("derive_noise_key: " + "; ".join(problems))
    message = json.dumps(
        {
            "purpose": purpose,
            "federation_id": federation_id,
            "round": round,
            "silo": silo,
            "inputs": dict(inputs),
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()
    return hmac.new(bytes(secret), _DOMAIN + message, hashlib.sha256).digest()


def subkey(key: bytes, label: str) -> bytes:
    """An independent 32-byte key for a labelled sub-use of ``key`` (a DP-SGD step, the sampling)."""
    _check_key(key)
    return hmac.new(key, _SUBKEY_DOMAIN + label.encode(), hashlib.sha256).digest()


def seed_key(seed: int) -> bytes:
    """A key derived from an integer seed. Tests and benches only: it has the seed's entropy."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return hashlib.sha256(b"silotune/noise-seed/v1\x00" + str(seed).encode()).digest()


def _keystream_u64(key: bytes, count: int) -> np.ndarray:
    """``count`` 64-bit words of the ChaCha20 keystream under ``key`` (little-endian)."""
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * count))
    return np.frombuffer(stream, dtype="<u8")


def _uniform64(key: bytes, count: int) -> np.ndarray:
    """``count`` uniforms in (0, 1), exact float64 multiples of 2⁻⁵³ shifted by 2⁻⁵⁴."""
    u = (_keystream_u64(key, count) >> np.uint64(11)).astype(np.float64)
    u *= 2.0**-53
    u += 2.0**-54
    return u


def _standard_normal64(key: bytes, count: int) -> np.ndarray:
    """``count`` i.i.d. N(0, 1) draws in float64 (Box–Muller on ChaCha20 uniforms)."""
    if count == 0:
        return np.zeros(0, dtype=np.float64)
    pairs = (count + 1) // 2
    u = _uniform64(key, 2 * pairs)
    radius = np.log(u[:pairs])
    radius *= -2.0
    np.sqrt(radius, out=radius)
    angle = u[pairs:]
    angle *= _TWO_PI
    out = np.empty(2 * pairs, dtype=np.float64)
    np.cos(angle, out=out[:pairs])
    np.sin(angle, out=out[pairs:])
    out[:pairs] *= radius
    out[pairs:] *= radius
    return out[:count]


def _tensor_key(key: bytes, name: str) -> bytes:
    return hmac.new(key, _TENSOR_DOMAIN + name.encode(), hashlib.sha256).digest()


def _check_std(std: float) -> float:
    if isinstance(std, bool) or not isinstance(std, int | float) or not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    return float(std)


def standard_normal(key: bytes, shape: Shape, *, name: str = "") -> torch.Tensor:
    """N(0, 1) noise of ``shape`` in float64 (CPU) for the tensor ``name`` under ``key``."""
    _check_key(key)
    size = torch.Size(shape)
    z = _standard_normal64(_tensor_key(key, name), size.numel())
    return torch.from_numpy(z).reshape(size)


def uniform(key: bytes, count: int) -> torch.Tensor:
    """``count`` float64 uniforms in (0, 1) from the keystream of ``key`` (e.g. Poisson sampling)."""
    _check_key(key)
    return torch.from_numpy(_uniform64(key, int(count)))


def gaussian_noise(
    shapes_or_tensors: Mapping[str, torch.Tensor | Shape],
    std: float,
    key: bytes,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """i.i.d. N(0, std²) noise for every named tensor, deterministic for ``key``.

    Values of ``shapes_or_tensors`` are tensors (the noise takes their shape, dtype
    and device; floating-point only) or shapes (the noise is ``dtype`` on the CPU).
    Drawn and scaled in float64, then cast once. The result has the input's keys in
    the input's order; each tensor's noise depends on (key, name, shape) only.
    """
    _check_key(key)
    std = _check_std(std)
    out: dict[str, torch.Tensor] = {}
    for name, ref in shapes_or_tensors.items():
        if isinstance(ref, torch.Tensor):
            if not ref.is_floating_point():
                raise ValueError(f"gaussian_noise: tensor {name!r} has dtype {ref.dtype}, not floating point")
            shape, to_dtype, device = ref.shape, ref.dtype, ref.device
        else:
            shape, to_dtype, device = torch.Size(ref), dtype, torch.device("cpu")
        z = standard_normal(key, shape, name=name)
        out[name] = (z * std).to(dtype=to_dtype, device=device)
    return out


def add_gaussian_noise_keyed(
    delta: Mapping[str, torch.Tensor], std: float, key: bytes
) -> dict[str, torch.Tensor]:
    """``delta`` plus :func:`gaussian_noise` (same key, same names), summed in float64 and cast once.

    For client-level DP: ``add_gaussian_noise_keyed(clip_update(d, C)[0], std, key)``.
    """
    _check_key(key)
    std = _check_std(std)
    out: dict[str, torch.Tensor] = {}
    for name, t in delta.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"add_gaussian_noise_keyed: {name!r} is not a floating-point tensor")
        z = standard_normal(key, t.shape, name=name)
        summed = t.detach().to(device="cpu", dtype=torch.float64) + std * z
        out[name] = summed.to(dtype=t.dtype, device=t.device)
    return out


# -- Opacus --------------------------------------------------------------------------------


class KeyedNoiseDPOptimizer(DPOptimizer):  # type: ignore[misc]
    """Opacus's ``DPOptimizer`` whose Gaussian noise comes from ChaCha20 under ``noise_key``.

    Step ``i`` (counting calls of :meth:`add_noise`, i.e. steps that release a noised
    gradient) draws under ``subkey(noise_key, "dp-sgd-step/i")``; parameter ``j`` is the
    tensor named ``"param/j"`` in :func:`gaussian_noise`. Clipping, scaling and the
    accounting hooks are Opacus's own. The other arguments are ``DPOptimizer``'s
    (noise_multiplier, max_grad_norm, expected_batch_size, loss_reduction, ...);
    ``generator`` and ``secure_mode`` are refused: no torch generator is used.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_key: bytes, **kwargs: Any) -> None:
        for banned in ("generator", "secure_mode"):
            if kwargs.pop(banned, None):
                raise ValueError(f"KeyedNoiseDPOptimizer draws its own noise; {banned}= is not supported")
        super().__init__(optimizer, **kwargs)
        self.noise_key = _check_key(noise_key, "DP-SGD noise key")
        self.noise_steps = 0

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        step_key = subkey(self.noise_key, f"dp-sgd-step/{self.noise_steps}")
        refs = {}
        for j, p in enumerate(self.params):
            _check_processed_flag(p.summed_grad)
            refs[f"param/{j}"] = p.summed_grad
        noise = gaussian_noise(refs, std, step_key)
        for j, p in enumerate(self.params):
            p.grad = (p.summed_grad + noise[f"param/{j}"]).view_as(p)
            _mark_as_processed(p.summed_grad)
        self.noise_steps += 1
