"""Reuse of deterministic local work across federations run side by side (experiments only).

An experiment such as the robustness grid runs dozens of federations that share
most of their inputs: in round 1 every cell starts from the same seeded global
adapter, and an honest silo then trains on the same data with the same seed, so
its update is bit-for-bit the same in every cell; every cell evaluates the same
base model on the same holdouts. :class:`WorkMemo` computes such work once and
hands the stored result to the next caller whose inputs are identical.

The key is the sha256 of *every* input of the computation: the global adapter's
tensors, the silo's name and position, the round, the seed, the data files'
sha256, and the model, adapter, method, objective, training, privacy and
security sections of the config. Anything that differs gives a different key and
a fresh computation. Work whose randomness comes from a silo secret (DP-SGD) is
never memoised. A memo is an object of the process that runs the experiment; a
federation in production has none.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tensor_digest(state: Mapping[str, Any]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (not over a stored object, whose
    metadata names its federation)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _canonical(part: Any) -> Any:
    if hasattr(part, "model_dump"):
        return part.model_dump(mode="json")
    if isinstance(part, Path):
        return str(part)
    if isinstance(part, bytes):
        return hashlib.sha256(part).hexdigest()
    if isinstance(part, dict):
        return {str(k): _canonical(v) for k, v in part.items()}
    if isinstance(part, (list, tuple)):
        return [_canonical(v) for v in part]
    return part


def memo_key(kind: str, *parts: Any) -> str:
    """sha256 over ``kind`` and the canonical JSON of ``parts`` (pydantic models by their JSON dump)."""
    blob = json.dumps([kind, *(_canonical(p) for p in parts)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def copy_training(value: tuple[Mapping[str, torch.Tensor], T]) -> tuple[dict[str, torch.Tensor], T]:
    """The ``copy`` for a memoised ``(delta, TrainResult)``: cloned tensors; the result is frozen."""
    delta, result = value
    return {k: t.clone() for k, t in delta.items()}, result


class WorkMemo:
    """A bounded, thread-safe map from an input digest to the result of the work (oldest dropped first).

    ``get_or_compute(key, compute, copy)`` returns ``copy(result)`` so that a caller
    mutating what it got (tensors, dicts) never changes the stored result.
    """

    def __init__(self, capacity: int = 512) -> None:
        if capacity < 1:
            raise ValueError(f"WorkMemo capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get_or_compute(self, key: str, compute: Callable[[], T], copy: Callable[[T], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return copy(self._items[key])
            self.misses += 1
        value = compute()
        with self._lock:
            self._items[key] = copy(value)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._items)}
