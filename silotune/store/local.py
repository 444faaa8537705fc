"""Object store on a local folder (the embedded default)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath

from silotune.errors import StoreError


def _check_key(key: str) -> str:
    p = PurePosixPath(key)
    if not key or key.startswith("/") or any(part in ("..", ".", "") for part in key.split("/")):
        raise StoreError(f"invalid object key {key!r}")
    return str(p)


class LocalStore:
    """Objects are files under ``root``; each write goes to a temp file then ``os.replace``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"object not found: {key} (in {self.root})") from None

    def get_bounded(self, key: str, max_bytes: int) -> bytes:
        path = self._path(key)
        try:
            with path.open("rb") as fh:
                data = fh.read(max_bytes + 1)
        except FileNotFoundError:
            raise StoreError(f"object not found: {key} (in {self.root})") from None
        if len(data) > max_bytes:
            raise StoreError(f"{key}: object is larger than the {max_bytes}-byte limit; not read")
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.startswith(".tmp-"):
                key = p.relative_to(base).as_posix()
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def describe(self) -> str:
        return str(self.root)
