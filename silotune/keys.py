"""Key material and private state: what a silo keeps to itself, what the coordinator may hold.

A silo's private folder (``SiloSpec.private_dir``, readable only by the silo) holds:

``signing.pem``            the silo's Ed25519 private key (mode 0600)
``ckks.secret``            the federation's shared CKKS secret context (created at one silo,
                           copied to the others out of band)
``noise.secret``           32 random bytes that seed the silo's DP noise, so a retried round
                           releases the very same update (no extra privacy spent) while nobody
                           without the secret can predict the noise
``ledger/<fid>.json``      the silo's privacy ledger for a federation, one entry per round
``secagg/<fid>/<r>.state`` secure-aggregation state of an open round (private keys)
``globals/<fid>/<r>.safetensors``  decrypted global adapters (encrypted federations)

The coordinator's folder (``SecuritySpec.keys_dir``) holds only public material:
``silos/<silo>.pem`` (Ed25519 public keys) and ``ckks.public`` (a CKKS context without
secret key; loading one that has a secret key is refused).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from silotune.config import FederationConfig, SiloSpec
from silotune.crypto import ckks  # called as ckks.load_context: tests wrap it to catch secret-key loads
from silotune.crypto.signing import SiloKeyPair, TrustedKeys, public_key_hex
from silotune.errors import ConfigError


def write_private(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Atomically write ``data`` with mode 0600 (created 0600 before any byte is written)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to replace key material")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@dataclass(frozen=True)
class SiloVault:
    """The silo's private folder. Only silo-side code opens it."""

    silo: str
    root: Path

    @classmethod
    def for_silo(cls, spec: SiloSpec) -> SiloVault:
        return cls(spec.name, Path(spec.private_folder))

    # -- keys ---------------------------------------------------------------------------------

    @property
    def signing_path(self) -> Path:
        return self.root / "signing.pem"

    @property
    def ckks_path(self) -> Path:
        return self.root / "ckks.secret"

    def signing_key(self) -> Any:
        if not self.signing_path.is_file():
            raise ConfigError(
                f"silo {self.silo!r}: no signing key at {self.signing_path}; create one with "
                f"`silotune keys silo {self.silo} --config <federation.yaml>` and register its public key "
                "with the coordinator"
            )
        return SiloKeyPair.load(self.signing_path)

    def ckks_secret(self) -> Any:
        if not self.ckks_path.is_file():
            raise ConfigError(
                f"silo {self.silo!r}: no CKKS secret context at {self.ckks_path}; create it at one silo "
                "with `silotune keys ckks` and copy it to every silo's private folder"
            )
        ctx = ckks.load_context(self.ckks_path.read_bytes())
        if not ctx.is_private:
            raise ConfigError(f"silo {self.silo!r}: {self.ckks_path} holds no secret key")
        return ctx

    def noise_secret(self) -> bytes:
        """The silo's 32-byte noise secret (created on first use); it keys every DP noise draw."""
        path = self.root / "noise.secret"
        if not path.is_file():
            write_private(path, secrets.token_bytes(32), overwrite=False)
        key = path.read_bytes()
        if len(key) != 32:
            raise ConfigError(f"silo {self.silo!r}: {path} is not a 32-byte noise secret")
        return key

    # -- state ----------------------------------------------------------------------------------

    def ledger_path(self, federation_id: str) -> Path:
        return self.root / "ledger" / f"{federation_id}.json"

    def read_ledger(self, federation_id: str) -> dict[str, Any]:
        path = self.ledger_path(federation_id)
        if not path.is_file():
            return {"federation_id": federation_id, "silo": self.silo, "rounds": {}}
        try:
            doc = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"silo {self.silo!r}: privacy ledger {path} is unreadable ({exc})") from None
        if doc.get("federation_id") != federation_id or doc.get("silo") != self.silo:
            raise ConfigError(f"silo {self.silo!r}: {path} is another silo's or federation's ledger")
        return doc

    def write_ledger(self, federation_id: str, doc: dict[str, Any]) -> None:
        write_private(self.ledger_path(federation_id), json.dumps(doc, indent=1, sort_keys=True).encode())

    def secagg_path(self, federation_id: str, round_: int) -> Path:
        return self.root / "secagg" / federation_id / f"{round_:05d}.state"

    def global_cache(self, federation_id: str, round_: int) -> Path:
        return self.root / "globals" / federation_id / f"{round_:05d}.safetensors"

    def control_folder(self, federation_id: str) -> Path:
        """SCAFFOLD: ``<round>.safetensors`` is the silo's control variate after training in that round."""
        return self.root / "scaffold" / federation_id


@dataclass(frozen=True)
class CoordinatorKeys:
    """The coordinator's public key material. Never holds a secret key."""

    root: Path

    @classmethod
    def for_config(cls, config: FederationConfig) -> CoordinatorKeys:
        return cls(Path(config.security.keys_dir))

    def public_key_path(self, silo: str) -> Path:
        return self.root / "silos" / f"{silo}.pem"

    @property
    def signing_path(self) -> Path:
        """The coordinator's own Ed25519 key: it signs globals, CKKS pointers, survivor sets, manifests."""
        return self.root / "coordinator.pem"

    def signing_key(self) -> Any:
        """The coordinator's signing key, or None when it has none (then silos that pin one refuse)."""
        return SiloKeyPair.load(self.signing_path) if self.signing_path.is_file() else None

    def create_signing_key(self) -> Path:
        """Create the coordinator's signing key if missing; returns its public key file."""
        pub = self.root / "coordinator.pub.pem"
        if not self.signing_path.is_file():
            SiloKeyPair.generate().save(self.signing_path, pub, overwrite=True)
        return pub

    def trusted_keys(self) -> Any:
        return TrustedKeys.from_folder(self.root / "silos")

    @property
    def ckks_path(self) -> Path:
        return self.root / "ckks.public"

    def ckks_public(self) -> Any:
        if not self.ckks_path.is_file():
            raise ConfigError(
                f"coordinator: no CKKS public context at {self.ckks_path}; a silo exports it with "
                "`silotune keys ckks-public`"
            )
        ctx = ckks.load_context(self.ckks_path.read_bytes())
        if ctx.is_private:
            raise ConfigError(
                f"coordinator: {self.ckks_path} holds a secret key; the coordinator must only ever hold "
                "the public context (delete it and export the public one)"
            )
        return ctx


def create_ckks_secret(path: Path, preset: str) -> bytes:
    """Create the federation's shared CKKS secret context at ``path`` (at one silo)."""
    data = ckks.create_secret_context(preset)
    write_private(path, data, overwrite=False)
    return data


def export_ckks_public(secret_path: Path, public_path: Path) -> None:
    data = ckks.public_context(Path(secret_path).read_bytes())
    public_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = public_path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, public_path)


def create_silo_identity(config: FederationConfig, silo: str, *, overwrite: bool = False) -> Path:
    """Generate the silo's Ed25519 key in its private folder; returns the public key file."""
    vault = SiloVault.for_silo(config.silo(silo))
    pub = vault.root / "signing.pub.pem"
    if vault.signing_path.exists() and not overwrite:
        return pub
    SiloKeyPair.generate().save(vault.signing_path, pub, overwrite=True)
    return pub


def setup_local_keys(config: FederationConfig) -> list[str]:
    """One-machine setup (embedded federations, demos, tests): every key a config needs.

    Creates each silo's signing key and registers its public key with the coordinator,
    and, for CKKS, one shared secret context copied to every silo plus its public context
    for the coordinator. Existing keys are kept. Returns what was done, one line each.
    """
    done: list[str] = []
    coord = CoordinatorKeys.for_config(config)
    if not coord.signing_path.is_file():
        coord.create_signing_key()
        done.append(f"created the coordinator's signing key at {coord.signing_path}")
    if config.security.signing:
        for s in config.silos:
            pub = create_silo_identity(config, s.name)
            dest = coord.public_key_path(s.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists() or dest.read_bytes() != pub.read_bytes():
                dest.write_bytes(pub.read_bytes())
                done.append(f"registered {s.name}'s public key at {dest}")
    if config.security.protection == "ckks":
        vaults = [SiloVault.for_silo(s) for s in config.silos]
        existing = [v.ckks_path for v in vaults if v.ckks_path.is_file()]
        if existing:
            secret = existing[0].read_bytes()
        else:
            secret = create_ckks_secret(vaults[0].ckks_path, config.security.ckks_preset)
            done.append(f"created the CKKS secret context at {vaults[0].ckks_path}")
        for v in vaults:
            if not v.ckks_path.is_file():
                write_private(v.ckks_path, secret, overwrite=False)
                done.append(f"copied the CKKS secret context to {v.ckks_path}")
        if not coord.ckks_path.is_file():
            export_ckks_public(existing[0] if existing else vaults[0].ckks_path, coord.ckks_path)
            done.append(f"exported the CKKS public context to {coord.ckks_path}")
    return done


def pin_local_keys(config: FederationConfig) -> FederationConfig:
    """One-machine setup: ``config`` with every silo's and the coordinator's public key pinned.

    Creates what is missing (:func:`setup_local_keys`), then writes the public keys into the config,
    where they become part of its fingerprint: the roster and every signature check use them.
    """
    setup_local_keys(
        config.model_copy(update={"security": config.security.model_copy(update={"signing": True})})
    )
    silos = [
        s.model_copy(update={"public_key": public_key_hex(SiloVault.for_silo(s).signing_key().public_key)})
        for s in config.silos
    ]
    coord = SiloKeyPair.load(CoordinatorKeys.for_config(config).signing_path)
    security = config.security.model_copy(
        update={"signing": True, "coordinator_key": public_key_hex(coord.public_key)}
    )
    return config.model_copy(update={"silos": silos, "security": security})
