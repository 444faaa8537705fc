"""Where a store lives, and whether it is one the policy allows.

A policy's ``stores`` entries (``s3://HOST:PORT/BUCKET[/PREFIX]``, ``file:///ROOT``) and a config's
:class:`~silotune.config.StoreSpec` both become a :class:`StoreLocation`; a store is allowed when
it lies at or under an entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from silotune.config import StoreSpec


@dataclass(frozen=True)
class StoreLocation:
    """Where a store lives: ('file', absolute root) or ('s3', host:port, bucket, prefix parts)."""

    kind: Literal["file", "s3"]
    host: str
    bucket: str
    parts: tuple[str, ...]

    @property
    def text(self) -> str:
        if self.kind == "file":
            return "file://" + "/" + "/".join(self.parts)
        return "s3://" + "/".join((self.host, self.bucket, *self.parts))

    def within(self, entry: StoreLocation) -> bool:
        """True when this location is ``entry`` or under it."""
        return (self.kind, self.host, self.bucket) == (entry.kind, entry.host, entry.bucket) and self.parts[
            : len(entry.parts)
        ] == entry.parts


def _split(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def _hostport(host: str | None, port: int | None, default: int) -> str:
    host = (host or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port if port is not None else default}"


def parse_store_entry(entry: str) -> StoreLocation:
    """A policy's store entry, normalised (refuses anything ambiguous)."""
    parts = urlsplit(entry)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{entry!r}: no query, fragment or credentials in a store entry")
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(f"{entry!r}: a local store is 'file:///ABSOLUTE/ROOT' (three slashes)")
        if ".." in _split(parts.path):
            raise ValueError(f"{entry!r}: '..' is not allowed in a store root")
        return StoreLocation("file", "", "", _split(os.path.normpath(parts.path)))
    if parts.scheme == "s3":
        segments = _split(parts.path)
        if not parts.hostname or not segments:
            raise ValueError(f"{entry!r}: an S3 store is 's3://HOST[:PORT]/BUCKET[/PREFIX]'")
        if ".." in segments:
            raise ValueError(f"{entry!r}: '..' is not allowed in a store prefix")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{entry!r}: bad port") from None
        host = "aws" if parts.hostname == "aws" and port is None else _hostport(parts.hostname, port, 443)
        return StoreLocation("s3", host, segments[0], segments[1:])
    raise ValueError(f"{entry!r}: a store entry starts with 's3://' or 'file:///'")


def entry_location(entry: str) -> StoreLocation:
    """A policy entry as it compares with :func:`store_location` (a local root with its symlinks resolved)."""
    loc = parse_store_entry(entry)
    if loc.kind == "file":
        return StoreLocation("file", "", "", _split(str(Path("/", *loc.parts).resolve())))
    return loc


def store_location(spec: StoreSpec) -> StoreLocation:
    """Where a config's store lives, in the form policy entries use (local roots resolve against the cwd)."""
    if spec.kind == "local":
        return StoreLocation("file", "", "", _split(str(Path(spec.root).expanduser().resolve())))
    assert spec.bucket is not None  # StoreSpec guarantees it for S3
    prefix = _split(spec.prefix)
    if spec.endpoint_url is None:
        return StoreLocation("s3", "aws", spec.bucket, prefix)
    url = urlsplit(spec.endpoint_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"endpoint_url {spec.endpoint_url!r} is not an http(s) URL")
    if url.path.strip("/") or url.query or url.fragment or url.username or url.password:
        raise ValueError(
            f"endpoint_url {spec.endpoint_url!r}: a path, query or credentials in the endpoint cannot be "
            "matched against the policy's stores"
        )
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"endpoint_url {spec.endpoint_url!r}: bad port") from None
    host = _hostport(url.hostname, port, 443 if url.scheme == "https" else 80)
    return StoreLocation("s3", host, spec.bucket, prefix)
