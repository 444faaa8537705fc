"""CKKS encryption of deltas: the encrypted weighted sum against the plaintext one, and failing closed."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from silotune.crypto import ckks
from silotune.crypto.ckks import EncryptionError
from silotune.errors import RegistryError

DEFAULT = ckks.ckks_preset(ckks.DEFAULT_PRESET)
# Worst-case quantisation error of the packed encoding per summed update, plus float32 output rounding.
STEP = 2.0**-DEFAULT.frac_bits


def _bound(n_updates: int, scale: float = 1e-2) -> float:
    return n_updates * STEP / 2 + scale * 2.0**-23


@pytest.fixture(scope="module")
def keys() -> tuple[ckks.CkksContext, ckks.CkksContext]:
    secret = ckks.load_context(ckks.create_secret_context())
    return secret, ckks.load_context(ckks.public_context(secret))


def _delta(
    seed: int, shapes: dict[str, tuple[int, ...]] | None = None, scale: float = 1e-3
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {
        "layers.0.q_proj.lora_A": (8, 96),
        "layers.0.q_proj.lora_B": (96, 8),
        "layers.0.v.bias": (5,),
    }
    return {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}


def _plain_sum(deltas: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    out = {}
    for k in deltas[0]:
        out[k] = torch.zeros(deltas[0][k].shape, dtype=torch.float64)
        for d, w in zip(deltas, weights, strict=True):
            out[k] += w * d[k].double()
    return out


def _max_err(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert set(out) == set(ref)
    return max(float((out[k].double() - ref[k]).abs().max()) for k in ref)


# -- parameters ------------------------------------------------------------------------------


def test_default_preset_is_packed_and_tenseal_default_is_kept() -> None:
    assert DEFAULT.encoding == "packed"
    assert DEFAULT.poly_modulus_degree == 4096 and DEFAULT.coeff_mod_bit_sizes == (60, 49)
    assert DEFAULT.values_per_coefficient == 2 and DEFAULT.values_per_ciphertext == 8192
    # the default guarantees the 1e-6 target for every aggregate it allows
    assert DEFAULT.max_silos * STEP / 2 <= 1e-6
    td = ckks.ckks_preset("tenseal-default")
    assert (td.poly_modulus_degree, td.coeff_mod_bit_sizes, td.global_scale, td.encoding) == (
        8192,
        (60, 40, 40, 60),
        2.0**40,
        "slots",
    )
    with pytest.raises(
        RegistryError, match="known: packed-n4096, packed-n4096-s128, slots-n4096, tenseal-default"
    ):
        ckks.ckks_preset("nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"poly_modulus_degree": 3000}, "poly_modulus_degree=3000"),
        ({"coeff_mod_bit_sizes": (60, 60)}, "exceeds the 128-bit-security limit 109"),
        ({"coeff_mod_bit_sizes": (60, 40, 49)}, "exactly one data prime"),
        ({"max_silos": 1000}, "max_silos=1000 needs noise_bits"),
        ({"value_bound": -1.0}, "value_bound=-1.0"),
    ],
)
def test_params_validation_names_the_bad_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ckks.CkksParams(**kwargs)


# -- keys ------------------------------------------------------------------------------------


def test_public_context_holds_no_secret_key_and_cannot_decrypt(keys) -> None:
    secret, public = keys
    assert secret.is_private and not public.is_private
    assert not public.tenseal.is_private()
    assert public.key_id == secret.key_id and public.fingerprint == secret.fingerprint
    blob = ckks.encrypt_update(_delta(0), secret, weight=1.0)
    with pytest.raises(EncryptionError, match="public context"):
        ckks.decrypt_update(blob, public)
    with pytest.raises(EncryptionError, match="public context"):
        ckks.decrypt_update(blob, ckks.public_context(secret))  # bytes as well as loaded contexts


def test_coordinator_refuses_a_secret_context(keys) -> None:
    secret, _ = keys
    blob = ckks.encrypt_update(_delta(0), secret, weight=1.0)
    with pytest.raises(EncryptionError, match="secret key"):
        ckks.sum_encrypted([blob], secret)


# -- correctness -----------------------------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw_weights=st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=5),
    seed=st.integers(min_value=0, max_value=2**16),
    use_public=st.booleans(),
)
def test_encrypted_weighted_sum_equals_plaintext_weighted_sum(keys, raw_weights, seed, use_public) -> None:
    secret, public = keys
    total = sum(raw_weights)
    weights = [w / total for w in raw_weights]  # FedAvg n_k / n
    deltas = [_delta(seed + i) for i in range(len(weights))]
    blobs = [
        ckks.encrypt_update(d, public if (use_public and i == 0) else secret, weight=w)
        for i, (d, w) in enumerate(zip(deltas, weights, strict=True))
    ]
    agg = ckks.sum_encrypted(blobs, public, silos=[f"silo-{i}" for i in range(len(blobs))])
    out = ckks.decrypt_update(agg, secret)
    assert _max_err(out, _plain_sum(deltas, weights)) <= _bound(len(weights))
    assert all(out[k].dtype == deltas[0][k].dtype and out[k].shape == deltas[0][k].shape for k in out)
    header = ckks.read_header(agg)
    assert header.count == len(weights) and abs(header.weight - 1.0) < 1e-12


@pytest.mark.parametrize("preset", ["slots-n4096", "tenseal-default"])
def test_slots_presets_sum_within_tolerance(preset: str) -> None:
    secret = ckks.load_context(ckks.create_secret_context(preset))
    public = ckks.load_context(ckks.public_context(secret))
    deltas, weights = [_delta(1), _delta(2), _delta(3)], [0.5, 0.25, 0.25]
    blobs = [ckks.encrypt_update(d, secret, weight=w) for d, w in zip(deltas, weights, strict=True)]
    out = ckks.decrypt_update(ckks.sum_encrypted(blobs, public), secret)
    assert _max_err(out, _plain_sum(deltas, weights)) <= 1e-6


def test_packed_sum_is_exact_integer_arithmetic(keys) -> None:
    """Order and grouping do not matter at all: the packed sum adds integers."""
    secret, public = keys
    deltas, weights = [_delta(4), _delta(5), _delta(6)], [0.2, 0.3, 0.5]
    blobs = [ckks.encrypt_update(d, secret, weight=w) for d, w in zip(deltas, weights, strict=True)]
    a = ckks.decrypt_update(ckks.sum_encrypted(blobs, public), secret)
    b = ckks.decrypt_update(ckks.sum_encrypted(blobs[::-1], public), secret)
    partial = ckks.sum_encrypted(blobs[:2], public)
    c = ckks.decrypt_update(ckks.sum_encrypted([partial, blobs[2]], public), secret)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
    # one update alone: its weighted delta; a zero update: exactly zero
    one = ckks.decrypt_update(blobs[0], secret)
    assert _max_err(one, _plain_sum(deltas[:1], weights[:1])) <= _bound(1)
    zero = {k: torch.zeros_like(v) for k, v in deltas[0].items()}
    z = ckks.decrypt_update(ckks.encrypt_update(zero, secret, weight=1.0), secret)
    assert all(torch.equal(z[k], zero[k]) for k in zero)


def test_values_at_the_bound_do_not_overflow(keys) -> None:
    secret, public = keys
    bound = DEFAULT.value_bound
    n = 7
    deltas = [{"w": torch.full((300,), bound, dtype=torch.float64)} for _ in range(n)]
    deltas.append({"w": torch.full((300,), -bound, dtype=torch.float64)})
    weights = [1 / (n + 1)] * (n + 1)
    blobs = [ckks.encrypt_update(d, secret, weight=w) for d, w in zip(deltas, weights, strict=True)]
    out = ckks.decrypt_update(ckks.sum_encrypted(blobs, public), secret)
    assert _max_err(out, _plain_sum(deltas, weights)) <= _bound(n + 1)
    assert out["w"].dtype == torch.float64


def test_dtypes_round_trip(keys) -> None:
    secret, public = keys
    delta = {
        "a": (torch.randn(40) * 1e-3).to(torch.bfloat16),
        "b": (torch.randn(3, 4) * 1e-3).to(torch.float16),
        "c": torch.randn(2, 2, dtype=torch.float64) * 1e-3,
        "empty": torch.zeros(0, 3),
    }
    out = ckks.decrypt_update(ckks.encrypt_update(delta, public, weight=1.0), secret)
    for k, v in delta.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        assert torch.allclose(out[k].double(), v.double(), atol=1e-6)


def test_packed_bytes_are_close_to_fp32_and_seeded_ciphertexts_are_half(keys) -> None:
    secret, public = keys
    delta = {"w": torch.randn(3 * DEFAULT.values_per_ciphertext) * 1e-3}
    fp32 = delta["w"].numel() * 4
    seeded = ckks.encrypt_update(delta, secret, weight=1.0)
    asym = ckks.encrypt_update(delta, public, weight=1.0)
    assert len(seeded) <= 1.1 * fp32  # target was <= 4x
    assert 1.8 < len(asym) / len(seeded) < 2.2
    assert ckks.read_header(seeded).seeded and not ckks.read_header(asym).seeded
    # randomised encryption: the same delta never gives the same ciphertext
    assert seeded != ckks.encrypt_update(delta, secret, weight=1.0)


# -- failing closed --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "weight", "message"),
    [
        ({}, 1.0, "nothing to encrypt"),
        ({"a": torch.zeros(0)}, 1.0, "every tensor is empty"),
        ({"a": torch.tensor([1e-3, float("nan")])}, 1.0, "non-finite"),
        ({"a": torch.tensor([1, 2])}, 1.0, "not a supported floating point"),
        ({"a": torch.tensor([0.5])}, 1.0, "exceeds value_bound"),
        ({"a": torch.tensor([1e-3])}, 0.0, "weight"),
        ({"a": torch.tensor([1e-3])}, 1.5, "weight"),
        ({"a": torch.tensor([1e-3])}, float("nan"), "weight"),
    ],
)
def test_encrypt_refuses_bad_input(keys, delta, weight, message) -> None:
    secret, _ = keys
    with pytest.raises(EncryptionError, match=message):
        ckks.encrypt_update(delta, secret, weight=weight)


def _rebuild(blob: bytes, header_change: dict | None = None, payload_change=None) -> bytes:
    """Re-frame a blob with a modified header or payload and a *recomputed* digest (a deliberate tamper)."""
    (n,) = struct.unpack_from(">I", blob, 8)
    header = json.loads(blob[12 : 12 + n])
    payload = blob[12 + n :]
    if payload_change:
        payload = payload_change(payload)
    header.update(header_change or {})
    header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    head = json.dumps(header).encode()
    return blob[:8] + struct.pack(">I", len(head)) + head + payload


def test_tampered_truncated_and_garbage_blobs_raise(keys) -> None:
    secret, public = keys
    blob = ckks.encrypt_update(_delta(7), secret, weight=0.5)
    flipped = bytearray(blob)
    flipped[-100] ^= 0x01
    for bad in (bytes(flipped), blob[:-1], blob[: len(blob) // 2], blob[:10], b"", b"garbage" * 10):
        with pytest.raises(EncryptionError):
            ckks.decrypt_update(bad, secret)
        with pytest.raises(EncryptionError):
            ckks.sum_encrypted([blob, bad], public)

    # a tamper that also fixes the digest: flip one bit inside the SEAL ciphertext
    def flip(payload: bytes) -> bytes:
        p = bytearray(payload)
        p[len(p) // 2] ^= 0x10
        return bytes(p)

    with pytest.raises(EncryptionError):
        ckks.decrypt_update(_rebuild(blob, payload_change=flip), secret)
    with pytest.raises(EncryptionError, match="malformed header"):
        ckks.decrypt_update(_rebuild(blob, {"numel": 3}), secret)


def test_other_parameters_and_other_keys_are_rejected_by_index_and_silo(keys) -> None:
    secret, public = keys
    good = ckks.encrypt_update(_delta(8), secret, weight=0.5)
    other_params = ckks.load_context(ckks.create_secret_context("slots-n4096"))
    other_key = ckks.load_context(ckks.create_secret_context())
    foreign = ckks.encrypt_update(_delta(9), other_params, weight=0.5)
    with pytest.raises(EncryptionError, match=r"update 1 \(silo 'b'\): encrypted under other parameters"):
        ckks.sum_encrypted([good, foreign], public, silos=["a", "b"])
    with pytest.raises(EncryptionError, match="other parameters"):
        ckks.decrypt_update(foreign, secret)
    stranger = ckks.encrypt_update(_delta(9), other_key, weight=0.5)
    with pytest.raises(EncryptionError, match=r"update 1 \(silo 'b'\): encrypted under another key"):
        ckks.sum_encrypted([good, stranger], public, silos=["a", "b"])
    with pytest.raises(EncryptionError, match="another key"):
        ckks.decrypt_update(stranger, secret)
    # a forged key id does not help: decryption notices the noise is wrong
    forged = _rebuild(stranger, {"key_id": secret.key_id})
    with pytest.raises(EncryptionError, match="noise is out of range"):
        ckks.decrypt_update(forged, secret)
    # a context of other parameters cannot decrypt either
    with pytest.raises(EncryptionError, match="other parameters"):
        ckks.decrypt_update(good, other_params)


def test_layout_and_weight_checks_name_the_silo(keys) -> None:
    secret, public = keys
    a = ckks.encrypt_update(_delta(10), secret, weight=0.5)
    b = ckks.encrypt_update(_delta(11, {"other": (4, 4)}), secret, weight=0.5)
    with pytest.raises(EncryptionError, match=r"update 1 \(silo 'hospital-b'\): tensor layout differs"):
        ckks.sum_encrypted([a, b], public, silos=["hospital-a", "hospital-b"])
    heavy = ckks.encrypt_update(_delta(12), secret, weight=0.9)
    with pytest.raises(EncryptionError, match=r"weights sum to 1\.4"):
        ckks.sum_encrypted([a, heavy], public)
    with pytest.raises(EncryptionError, match="no encrypted updates"):
        ckks.sum_encrypted([], public)
    with pytest.raises(EncryptionError, match="min_count=2"):
        ckks.decrypt_update(a, secret, min_count=2)


def test_max_silos_is_enforced() -> None:
    params = ckks.CkksParams(max_silos=2, noise_bits=10)
    secret = ckks.load_context(ckks.create_secret_context(params))
    public = ckks.load_context(ckks.public_context(secret))
    blobs = [ckks.encrypt_update(_delta(i), secret, weight=0.25) for i in range(3)]
    with pytest.raises(EncryptionError, match="exceed max_silos=2"):
        ckks.sum_encrypted(blobs, public)
    out = ckks.decrypt_update(ckks.sum_encrypted(blobs[:2], public), secret)
    assert _max_err(out, _plain_sum([_delta(0), _delta(1)], [0.25, 0.25])) <= 2 * 2.0**-params.frac_bits


def test_ciphertext_does_not_contain_the_plaintext(keys) -> None:
    secret, _ = keys
    delta = {"w": torch.full((4096,), 1e-3)}
    blob = ckks.encrypt_update(delta, secret, weight=1.0)
    raw = np.float32(1e-3).tobytes()
    assert blob.count(raw * 4) == 0
    digit = int(np.rint(1e-3 * 2**DEFAULT.frac_bits))
    assert blob.count(struct.pack("<q", digit << DEFAULT.noise_bits)) == 0


def test_context_bytes_are_checked() -> None:
    for bad in (b"", b"garbage", b"STCKCTX1\x00\x00\x00\x02{}"):
        with pytest.raises(EncryptionError):
            ckks.load_context(bad)
    raw = ckks.create_secret_context()
    (n,) = struct.unpack_from(">I", raw, 8)
    lie = json.dumps({"params": ckks.ckks_preset("tenseal-default").model_dump(mode="json")}).encode()
    with pytest.raises(EncryptionError, match="does not match its recorded parameters"):
        ckks.load_context(raw[:8] + struct.pack(">I", len(lie)) + lie + raw[12 + n :])


def test_weight_types(keys) -> None:
    secret, _ = keys
    blob = ckks.encrypt_update(_delta(0), secret, weight=np.float32(0.5))  # type: ignore[arg-type]
    assert ckks.read_header(blob).weight == 0.5
    with pytest.raises(EncryptionError, match="weight"):
        ckks.encrypt_update(_delta(0), secret, weight=True)  # type: ignore[arg-type]


def test_header_that_lies_about_the_size_is_rejected(keys) -> None:
    secret, _ = keys
    blob = ckks.encrypt_update({"w": torch.randn(100) * 1e-3}, secret, weight=1.0)
    lie = _rebuild(blob, {"numel": 20000, "shapes": [[20000]]})
    with pytest.raises(EncryptionError, match="cannot hold 20000 values"):
        ckks.decrypt_update(lie, secret)
