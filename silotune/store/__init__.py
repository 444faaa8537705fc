"""Object stores (the persistence seam) and the federation's key layout."""

from __future__ import annotations

from silotune.config import StoreSpec
from silotune.store.base import ObjectStore
from silotune.store.layout import (
    FederationLayout,
    get_json,
    get_tensors,
    put_json,
    put_tensors,
    save_tensors,
    sha256,
)
from silotune.store.local import LocalStore
from silotune.store.s3 import S3Store


def open_store(spec: StoreSpec) -> ObjectStore:
    """The store a config names."""
    if spec.kind == "local":
        return LocalStore(spec.root)
    if spec.kind == "s3":
        return S3Store(spec)
    raise ValueError(f"store.kind {spec.kind!r} is not supported")  # pragma: no cover - pydantic guards this


__all__ = [
    "FederationLayout",
    "LocalStore",
    "ObjectStore",
    "S3Store",
    "get_json",
    "get_tensors",
    "open_store",
    "put_json",
    "put_tensors",
    "save_tensors",
    "sha256",
]
