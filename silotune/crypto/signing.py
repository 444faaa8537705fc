"""Ed25519 signatures on silo uploads.

Each silo holds an Ed25519 private key; the coordinator holds only the silos'
public keys (:class:`TrustedKeys`). A signature covers a domain-separated
message that binds the payload to its federation, round and silo::

    PREFIX || u32(len(federation_id)) || federation_id || u64(round)
           || u32(len(silo)) || silo || sha256(payload)

so a valid upload cannot be replayed in another round, passed off as another
silo's, or moved to another federation, and any change to the payload breaks
it. Lengths are big-endian; strings are UTF-8. Verification fails closed: a
missing, malformed or non-verifying signature, or an unknown silo, raises
:class:`SignatureError`.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from silotune.errors import ConfigError, SilotuneError

SIGNATURE_PREFIX = b"silotune/update-signature/v1\x00"
# What a signature is for. Each purpose has its own prefix, so a signature made for one kind of
# message (a result record, a secure-aggregation advert, a global adapter) never verifies as another.
PURPOSES = (
    "update",  # a silo's upload (the prefix above: today's bytes)
    "result",  # a silo's result record (JSON) for the coordinator
    "advert",  # secure aggregation: a silo's round keys
    "share",  # secure aggregation: encrypted Shamir shares for one peer
    "unmask",  # secure aggregation: the shares that remove the survivors' masks
    "survivors",  # secure aggregation: the coordinator's survivor set
    "graph",  # secure aggregation: the masking graph the coordinator announces
    "config",  # a silo's acceptance of a federation config's fingerprint
    "global",  # the coordinator's global adapter (or CKKS pointer) of a round
    "manifest",  # the coordinator's round manifest
)
SIGNATURE_SIZE = 64  # Ed25519 signatures are always 64 bytes
_MAX_ROUND = 2**64 - 1

BytesLike = bytes | bytearray | memoryview


class SignatureError(SilotuneError):
    """An upload's signature is missing, malformed, does not verify, or its silo is not trusted.

    ``reason`` is one of ``"missing"``, ``"malformed"``, ``"invalid"``, ``"unknown-silo"``.
    """

    def __init__(self, silo: str, reason: str, message: str) -> None:
        self.silo = silo
        self.reason = reason
        super().__init__(f"silo {silo!r}: {message}")


def _check_str(name: str, value: object) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value.encode("utf-8")


def _prefix(purpose: str) -> bytes:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown signature purpose {purpose!r}; known: {', '.join(PURPOSES)}")
    return SIGNATURE_PREFIX if purpose == "update" else f"silotune/{purpose}-signature/v1\x00".encode()


def signed_message(
    payload: BytesLike, *, federation_id: str, round: int, silo: str, purpose: str = "update"
) -> bytes:
    """The exact bytes that are signed for ``payload`` (see the module docstring).

    ``silo`` names the signer (a silo, or ``"coordinator"``); ``purpose`` selects the prefix.
    """
    prefix = _prefix(purpose)
    fed = _check_str("federation_id", federation_id)
    who = _check_str("silo", silo)
    if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round <= _MAX_ROUND:
        raise ValueError(f"round must be an integer in [0, 2**64), got {round!r}")
    if not isinstance(payload, BytesLike):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    return b"".join(
        (
            prefix,
            struct.pack(">I", len(fed)),
            fed,
            struct.pack(">Q", round),
            struct.pack(">I", len(who)),
            who,
            hashlib.sha256(payload).digest(),
        )
    )


def sign_update(
    payload: BytesLike,
    *,
    federation_id: str,
    round: int,
    silo: str,
    private_key: Ed25519PrivateKey,
    purpose: str = "update",
) -> bytes:
    """Sign ``payload`` as ``silo``'s message for ``round`` of ``federation_id``; returns 64 bytes."""
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"private_key must be an Ed25519PrivateKey, got {type(private_key).__name__}")
    return private_key.sign(
        signed_message(payload, federation_id=federation_id, round=round, silo=silo, purpose=purpose)
    )


def verify_update(
    payload: BytesLike,
    signature: BytesLike | None,
    *,
    federation_id: str,
    round: int,
    silo: str,
    public_key: Ed25519PublicKey,
    purpose: str = "update",
) -> None:
    """Return if ``signature`` is ``silo``'s signature of ``payload`` for this round; raise otherwise.

    Raises :class:`SignatureError` with ``reason`` ``"missing"`` (no or empty
    signature), ``"malformed"`` (not 64 bytes) or ``"invalid"`` (the payload was
    altered, or the signature was made for another round, silo, federation or key:
    Ed25519 cannot tell which, so the message lists the possibilities).
    """
    if not isinstance(public_key, Ed25519PublicKey):
        raise TypeError(f"public_key must be an Ed25519PublicKey, got {type(public_key).__name__}")
    message = signed_message(payload, federation_id=federation_id, round=round, silo=silo, purpose=purpose)
    what = "upload" if purpose == "update" else f"{purpose} message"
    if signature is None or (isinstance(signature, BytesLike) and len(signature) == 0):
        raise SignatureError(
            silo, "missing", f"{what} for round {round} of {federation_id!r} has no signature"
        )
    if not isinstance(signature, BytesLike) or len(signature) != SIGNATURE_SIZE:
        got = f"{len(signature)} bytes" if isinstance(signature, BytesLike) else type(signature).__name__
        raise SignatureError(
            silo,
            "malformed",
            f"signature for round {round} of {federation_id!r} is malformed: "
            f"expected {SIGNATURE_SIZE} bytes, got {got}",
        )
    try:
        public_key.verify(bytes(signature), message)
    except InvalidSignature:
        raise SignatureError(
            silo,
            "invalid",
            f"signature does not verify for round {round} of {federation_id!r}: the payload was tampered "
            "with, or the signature was made for another round (replay), another silo (foreign upload), "
            "another federation, or with a key other than this silo's trusted key",
        ) from None


# -- keys ----------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, then link or rename it.

    The temporary file is created 0600 by mkstemp and chmod-ed to ``mode`` before
    anything is written, so a private key is never readable by others, even
    briefly. Without ``overwrite`` the final step is a hard link, which fails if
    ``path`` exists (no check-then-write race).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the new directory entry durable too
    finally:
        os.close(dir_fd)


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read an Ed25519 public key from a PEM file; anything else raises :class:`ConfigError`."""
    path = Path(path)
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{path}: holds a private key; only public keys belong here")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def save_public_key(
    public_key: Ed25519PublicKey, path: str | os.PathLike[str], *, overwrite: bool = False
) -> None:
    """Write a public key as PEM (mode 0644), atomically."""
    _write_atomic(Path(path), public_key_pem(public_key), mode=0o644, overwrite=overwrite)


@dataclass(frozen=True)
class SiloKeyPair:
    """A silo's Ed25519 signing key. The private half never leaves the silo."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SiloKeyPair:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def save(
        self,
        private_path: str | os.PathLike[str],
        public_path: str | os.PathLike[str] | None = None,
        *,
        password: bytes | None = None,
        overwrite: bool = False,
    ) -> None:
        """Write the private key as PKCS#8 PEM with mode 0600, atomically; optionally the public key.

        Refuses to replace an existing key file unless ``overwrite=True``: losing a
        silo's key means re-registering its identity with the coordinator.
        """
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        _write_atomic(Path(private_path), pem, mode=0o600, overwrite=overwrite)
        if public_path is not None:
            save_public_key(self.public_key, public_path, overwrite=overwrite)

    @classmethod
    def load(cls, private_path: str | os.PathLike[str], *, password: bytes | None = None) -> SiloKeyPair:
        """Read a private key written by :meth:`save`."""
        path = Path(private_path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=password)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot load private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
        return cls(key)

    def sign(
        self, payload: BytesLike, *, federation_id: str, round: int, silo: str, purpose: str = "update"
    ) -> bytes:
        return sign_update(
            payload,
            federation_id=federation_id,
            round=round,
            silo=silo,
            private_key=self.private_key,
            purpose=purpose,
        )


class TrustedKeys:
    """The coordinator's registry of silo public keys: silo name -> Ed25519 public key.

    Looking up or verifying for a silo that is not registered raises
    :class:`SignatureError` (``reason="unknown-silo"``): an upload from an
    unknown silo is rejected, never accepted unsigned. (Not a ``Mapping``: its
    lookups raise :class:`SignatureError`, not ``KeyError``.)
    """

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for silo, key in (keys or {}).items():
            self.add(silo, key)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> TrustedKeys:
        """Load every ``<silo>.pem`` in ``folder`` (the file name without ``.pem`` is the silo).

        A private key, a non-Ed25519 key or an unparsable file raises
        :class:`~silotune.errors.ConfigError` naming the file.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"trusted keys folder {folder} does not exist or is not a folder")
        return cls({p.stem: load_public_key(p) for p in sorted(folder.glob("*.pem"))})

    def add(self, silo: str, public_key: Ed25519PublicKey) -> None:
        _check_str("silo", silo)
        if not isinstance(public_key, Ed25519PublicKey):
            raise TypeError(f"silo {silo!r}: expected an Ed25519PublicKey, got {type(public_key).__name__}")
        if silo in self._keys:
            raise ValueError(f"silo {silo!r} already has a trusted key")
        self._keys[silo] = public_key

    def public_key(self, silo: str) -> Ed25519PublicKey:
        try:
            return self._keys[silo]
        except KeyError:
            known = ", ".join(sorted(self._keys)) or "(none)"
            raise SignatureError(
                silo, "unknown-silo", f"not a trusted silo (no public key registered); trusted: {known}"
            ) from None

    def __contains__(self, silo: object) -> bool:
        return silo in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def silos(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def verify(
        self,
        payload: BytesLike,
        signature: BytesLike | None,
        *,
        federation_id: str,
        round: int,
        silo: str,
        purpose: str = "update",
    ) -> None:
        """:func:`verify_update` with ``silo``'s registered key."""
        verify_update(
            payload,
            signature,
            federation_id=federation_id,
            round=round,
            silo=silo,
            public_key=self.public_key(silo),
            purpose=purpose,
        )


def public_key_hex(public_key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key as hex: how a federation config pins a silo's or the coordinator's key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_key_from_hex(value: str, *, what: str = "public key") -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(value)
        if len(raw) != 32:
            raise ValueError(f"expected 32 bytes, got {len(raw)}")
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ConfigError(f"{what}: not a hex Ed25519 public key ({exc})") from None
