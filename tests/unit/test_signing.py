"""Ed25519 signatures on uploads: what verifies, what is refused and how the refusal reads."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from hypothesis import given, settings
from hypothesis import strategies as st

from silotune.crypto.signing import (
    SIGNATURE_SIZE,
    SignatureError,
    SiloKeyPair,
    TrustedKeys,
    load_public_key,
    save_public_key,
    sign_update,
    signed_message,
    verify_update,
)
from silotune.errors import ConfigError, SilotuneError

PAYLOAD = b"safetensors bytes of a LoRA delta" * 10
WHERE: dict[str, Any] = {"federation_id": "fed-1", "round": 7, "silo": "hospital-a"}


@pytest.fixture(scope="module")
def alice() -> SiloKeyPair:
    return SiloKeyPair.generate()


@pytest.fixture(scope="module")
def bob() -> SiloKeyPair:
    return SiloKeyPair.generate()


@pytest.fixture(scope="module")
def signature(alice: SiloKeyPair) -> bytes:
    return sign_update(PAYLOAD, private_key=alice.private_key, **WHERE)


def test_good_signature_verifies(alice: SiloKeyPair, signature: bytes) -> None:
    assert len(signature) == SIGNATURE_SIZE
    verify_update(PAYLOAD, signature, public_key=alice.public_key, **WHERE)
    verify_update(bytearray(PAYLOAD), bytearray(signature), public_key=alice.public_key, **WHERE)
    assert alice.sign(PAYLOAD, **WHERE) == signature  # Ed25519 is deterministic


@pytest.mark.parametrize(
    ("payload", "changes", "hint"),
    [
        (PAYLOAD[:-1] + b"X", {}, "tampered"),
        (PAYLOAD, {"round": 6}, "replay"),
        (PAYLOAD, {"round": 8}, "replay"),
        (PAYLOAD, {"silo": "hospital-b"}, "foreign upload"),
        (PAYLOAD, {"federation_id": "fed-2"}, "another federation"),
    ],
    ids=["tampered-payload", "replay-older-round", "replay-later-round", "foreign-silo", "other-federation"],
)
def test_a_signature_does_not_transfer(
    alice: SiloKeyPair, signature: bytes, payload: bytes, changes: dict[str, Any], hint: str
) -> None:
    where = {**WHERE, **changes}
    with pytest.raises(SignatureError) as info:
        verify_update(payload, signature, public_key=alice.public_key, **where)
    err = info.value
    assert err.reason == "invalid"
    assert err.silo == where["silo"]
    assert str(err).startswith(
        f"silo {where['silo']!r}: signature does not verify for round {where['round']}"
    )
    assert hint in str(err)


def test_another_silos_key_does_not_verify(bob: SiloKeyPair, signature: bytes) -> None:
    with pytest.raises(SignatureError, match="does not verify") as info:
        verify_update(PAYLOAD, signature, public_key=bob.public_key, **WHERE)
    assert info.value.reason == "invalid"


@pytest.mark.parametrize(
    ("bad", "reason", "fragment"),
    [
        (None, "missing", "has no signature"),
        (b"", "missing", "has no signature"),
        (b"\x00" * 63, "malformed", "expected 64 bytes, got 63 bytes"),
        (b"\x00" * 65, "malformed", "expected 64 bytes, got 65 bytes"),
        ("not bytes", "malformed", "got str"),
        (b"\x00" * 64, "invalid", "does not verify"),
    ],
    ids=["none", "empty", "truncated", "too-long", "wrong-type", "garbage"],
)
def test_missing_malformed_and_garbage_signatures(
    alice: SiloKeyPair, bad: object, reason: str, fragment: str
) -> None:
    with pytest.raises(SignatureError) as info:
        verify_update(PAYLOAD, bad, public_key=alice.public_key, **WHERE)  # type: ignore[arg-type]
    assert info.value.reason == reason
    assert str(info.value).startswith("silo 'hospital-a': ")
    assert fragment in str(info.value)
    assert isinstance(info.value, SilotuneError)


def test_truncated_real_signature_is_malformed(alice: SiloKeyPair, signature: bytes) -> None:
    with pytest.raises(SignatureError, match="malformed") as info:
        verify_update(PAYLOAD, signature[:32], public_key=alice.public_key, **WHERE)
    assert info.value.reason == "malformed"


@settings(max_examples=50, deadline=None)
@given(flip=st.integers(0, SIGNATURE_SIZE * 8 - 1))
def test_any_flipped_signature_bit_is_refused(alice: SiloKeyPair, signature: bytes, flip: int) -> None:
    bad = bytearray(signature)
    bad[flip // 8] ^= 1 << (flip % 8)
    with pytest.raises(SignatureError):
        verify_update(PAYLOAD, bytes(bad), public_key=alice.public_key, **WHERE)


def test_message_fields_are_length_prefixed() -> None:
    # Without length prefixes ("ab", "c") and ("a", "bc") could sign the same bytes.
    one = signed_message(b"x", federation_id="ab", round=1, silo="c")
    two = signed_message(b"x", federation_id="a", round=1, silo="bc")
    assert one != two
    assert one.startswith(b"silotune/update-signature/v1\x00")
    for bad in ({"round": -1}, {"round": 2**64}, {"round": True}, {"silo": ""}, {"federation_id": 3}):
        with pytest.raises(ValueError, match=rf"^{next(iter(bad))} must be"):
            signed_message(b"x", **{**WHERE, **bad})  # type: ignore[arg-type]


def test_private_key_is_written_0600_atomically_and_round_trips(tmp_path: Path, alice: SiloKeyPair) -> None:
    private = tmp_path / "keys" / "hospital-a.key"
    public = tmp_path / "trusted" / "hospital-a.pem"
    alice.save(private, public)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert sorted(os.listdir(private.parent)) == ["hospital-a.key"]  # no temporary file left behind
    loaded = SiloKeyPair.load(private)
    signature = loaded.sign(PAYLOAD, **WHERE)
    verify_update(PAYLOAD, signature, public_key=load_public_key(public), **WHERE)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        SiloKeyPair.generate().save(private)
    assert SiloKeyPair.load(private).sign(PAYLOAD, **WHERE) == signature  # untouched
    SiloKeyPair.generate().save(private, overwrite=True)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert SiloKeyPair.load(private).sign(PAYLOAD, **WHERE) != signature


def test_password_protected_private_key(tmp_path: Path, alice: SiloKeyPair) -> None:
    path = tmp_path / "a.key"
    alice.save(path, password=b"correct horse")
    assert b"ENCRYPTED" in path.read_bytes()
    assert SiloKeyPair.load(path, password=b"correct horse").sign(PAYLOAD, **WHERE) == alice.sign(
        PAYLOAD, **WHERE
    )
    with pytest.raises(ConfigError, match="cannot load private key"):
        SiloKeyPair.load(path, password=b"wrong")


def test_trusted_keys_from_folder(
    tmp_path: Path, alice: SiloKeyPair, bob: SiloKeyPair, signature: bytes
) -> None:
    save_public_key(alice.public_key, tmp_path / "hospital-a.pem")
    save_public_key(bob.public_key, tmp_path / "hospital-b.pem")
    (tmp_path / "README.txt").write_text("not a key, ignored")
    trusted = TrustedKeys.from_folder(tmp_path)
    assert trusted.silos() == ["hospital-a", "hospital-b"]
    assert len(trusted) == 2
    assert "hospital-a" in trusted
    trusted.verify(PAYLOAD, signature, **WHERE)
    with pytest.raises(SignatureError, match="does not verify"):
        trusted.verify(PAYLOAD, signature, **{**WHERE, "silo": "hospital-b"})  # alice posing as bob


def test_unknown_silo_is_rejected(alice: SiloKeyPair, signature: bytes) -> None:
    trusted = TrustedKeys({"hospital-a": alice.public_key})
    with pytest.raises(SignatureError) as info:
        trusted.verify(PAYLOAD, signature, **{**WHERE, "silo": "intruder"})
    assert info.value.reason == "unknown-silo"
    assert (
        str(info.value)
        == "silo 'intruder': not a trusted silo (no public key registered); trusted: hospital-a"
    )
    with pytest.raises(ValueError, match="already has a trusted key"):
        trusted.add("hospital-a", alice.public_key)


def test_trust_folder_refuses_private_and_foreign_keys(tmp_path: Path, alice: SiloKeyPair) -> None:
    leaked = tmp_path / "leaked"
    alice.save(leaked / "hospital-a.pem")  # a private key where public keys belong
    with pytest.raises(ConfigError, match="holds a private key"):
        TrustedKeys.from_folder(leaked)
    ec = tmp_path / "ec"
    ec.mkdir()
    ec_key = generate_private_key(SECP256R1()).public_key()
    pem = ec_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (ec / "hospital-c.pem").write_bytes(pem)
    with pytest.raises(ConfigError, match="expected an Ed25519 public key"):
        TrustedKeys.from_folder(ec)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "hospital-d.pem").write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match=r"hospital-d\.pem: not a PEM public key"):
        TrustedKeys.from_folder(junk)
    with pytest.raises(ConfigError, match="does not exist"):
        TrustedKeys.from_folder(tmp_path / "missing")
