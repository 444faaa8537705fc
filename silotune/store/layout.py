"""The federation's layout in the object store, and typed reads/writes over it.

::

    federations/<fid>/state.json                       last completed round (the resume point)
    federations/<fid>/rounds/<r>/global.safetensors    global adapter broadcast at the start of round r
    federations/<fid>/rounds/<r>/manifest.json         what round r produced, with sha256 of every object
    federations/<fid>/rounds/<r>/evaluation.json       holdout metrics of round r's output (written once)
    federations/<fid>/initial_evaluation.json          holdout metrics of the initial global adapter
    federations/<fid>/final/                           final adapter in PEFT format
    federations/<fid>/rounds/<r>/secagg/survivors.json secure aggregation: the round's survivors (signed)
    federations/<fid>/rounds/<r>/secagg/graph.json     secure aggregation: the masking graph (signed)

Objects a silo writes live under prefixes of its own, so the store's access rules are exact
(a silo's identity may write only below ``<kind>/<silo>/``) and readers take exact keys of
configured silos only, never what a listing turns up::

    updates/<silo>/<fid>/<r>/update.<ext>              the silo's upload (+ ``.sig``)
    results/<silo>/<fid>/<r>/<stage>.json              the silo's signed result record of a flow run
    messages/<silo>/<fid>/<r>/secagg/advert            secure-aggregation messages the silo sends
    messages/<silo>/<fid>/<r>/secagg/shares/<peer>       (anyone may read; shares are encrypted to <peer>)
    messages/<silo>/<fid>/<r>/secagg/unmask
    published/<silo>/<fid>/final/                      CKKS: the final adapter, decrypted by its publisher

Tensors are stored as safetensors (never pickle). Every read of a tensor object
can be checked against the sha256 recorded when it was written.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from silotune.errors import StoreError
from silotune.store.base import ObjectStore


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FederationLayout:
    def __init__(self, federation_id: str) -> None:
        self.fid = federation_id
        self.prefix = f"federations/{federation_id}"

    def state(self) -> str:
        return f"{self.prefix}/state.json"

    def global_adapter(self, round_: int) -> str:
        return f"{self.prefix}/rounds/{round_:05d}/global.safetensors"

    def update(self, round_: int, silo: str, ext: str = "safetensors") -> str:
        """A silo's upload: ``.safetensors`` (plaintext), ``.ckks`` (encrypted) or ``.masked``."""
        return f"updates/{silo}/{self.fid}/{round_:05d}/update.{ext}"

    def result(self, round_: int, silo: str, stage: str) -> str:
        """A silo's signed result record of one flow run (``round``, ``evaluate``, a protocol step)."""
        return f"results/{silo}/{self.fid}/{round_:05d}/{stage}.json"

    def message(self, round_: int, silo: str, name: str) -> str:
        """A protocol message ``silo`` sends in round ``round_`` (e.g. ``secagg/advert``)."""
        return f"messages/{silo}/{self.fid}/{round_:05d}/{name}"

    def survivors(self, round_: int) -> str:
        return f"{self.prefix}/rounds/{round_:05d}/secagg/survivors.json"

    def masking_graph(self, round_: int) -> str:
        """Secure aggregation: the masking graph the coordinator announces (each silo redoes it)."""
        return f"{self.prefix}/rounds/{round_:05d}/secagg/graph.json"

    def published(self, silo: str, name: str) -> str:
        """CKKS: the final adapter as the publishing silo decrypted it."""
        return f"published/{silo}/{self.fid}/final/{name}"

    def aggregate(self, round_: int) -> str:
        """The encrypted sum of round ``round_`` (CKKS: only silos can decrypt it)."""
        return f"{self.prefix}/rounds/{round_:05d}/aggregate.ckks"

    def global_pointer(self, round_: int) -> str:
        """CKKS: the global of round ``round_`` as (previous global, encrypted aggregate)."""
        return f"{self.prefix}/rounds/{round_:05d}/global.json"

    def manifest(self, round_: int) -> str:
        return f"{self.prefix}/rounds/{round_:05d}/manifest.json"

    def evaluation(self, round_: int) -> str:
        """The silos' holdout evaluation of round ``round_``'s output; ``-1``: of the initial global.

        Written once, when the evaluation arrives (with the next round's silo runs), after the
        round's manifest, which never changes.
        """
        if round_ < 0:
            return f"{self.prefix}/initial_evaluation.json"
        return f"{self.prefix}/rounds/{round_:05d}/evaluation.json"

    def server_state(self, round_: int) -> str:
        return f"{self.prefix}/rounds/{round_:05d}/server_optimizer.safetensors"

    def control(self, round_: int) -> str:
        """SCAFFOLD's server control variate after round ``round_`` (named by that round's manifest)."""
        return f"{self.prefix}/rounds/{round_:05d}/scaffold_control.safetensors"

    def root_update(self, round_: int) -> str:
        """The coordinator's own update on its root data set (FLTrust), round ``round_``."""
        return f"{self.prefix}/rounds/{round_:05d}/root_update.safetensors"

    def final(self, name: str) -> str:
        return f"{self.prefix}/final/{name}"


def save_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes that depend only on the tensors and the metadata.

    ``safetensors.torch.save`` writes the ``__metadata__`` map in a random order (a Rust
    ``HashMap``), so the same update saved twice gave different bytes and sha256s: a
    retried round would have uploaded a "different" object. Here the tensors are saved
    without metadata and the header is rewritten with the metadata's keys sorted
    (still valid safetensors: the data offsets are relative to the end of the header).
    """
    data = st_save({k: v.detach().contiguous() for k, v in tensors.items()})
    if not metadata:
        return data
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header = {"__metadata__": {str(k): str(v) for k, v in sorted(metadata.items())}, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def put_tensors(
    store: ObjectStore,
    key: str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write tensors as safetensors; return the sha256 of the stored bytes."""
    data = save_tensors(tensors, metadata)
    store.put(key, data)
    return sha256(data)


def get_tensors(
    store: ObjectStore, key: str, *, expected_sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a safetensors object; verify its checksum when one is given."""
    data = store.get(key)
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise StoreError(f"{key}: sha256 mismatch (stored object changed or was corrupted)")
    try:
        return dict(st_load(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise StoreError(f"{key}: not a valid safetensors object ({exc})") from None


def put_json(store: ObjectStore, key: str, obj: Any) -> str:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    store.put(key, data)
    return sha256(data)


def get_json(store: ObjectStore, key: str) -> Any:
    data = store.get(key)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise StoreError(f"{key}: invalid JSON ({exc})") from None
