"""The object-store seam: everything a federation persists goes through it.

Backends store opaque bytes under ``/``-separated keys. The local-folder backend
is the embedded default; an S3 backend (SeaweedFS, MinIO, AWS) plugs in behind
the same protocol. Writes are atomic: a reader never sees half an object.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class ObjectStore(Protocol):
    """Bytes by key. Keys use ``/`` separators and never start with ``/``."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def get_bounded(self, key: str, max_bytes: int) -> bytes:
        """Read ``key`` if it holds at most ``max_bytes``; a larger object raises StoreError unread.

        For objects another party wrote (a silo's result record): a silo must not be able to make
        the coordinator read gigabytes into memory.
        """
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def delete(self, key: str) -> None: ...

    def describe(self) -> str:
        """Where this store lives, for humans (a folder or a bucket URL)."""
        ...
