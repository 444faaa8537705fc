"""Process-wide resources of the orchestration layer.

Loading a base model costs seconds to minutes, so a process keeps the models
it has loaded and reuses them across rounds and silos (silos in one process
train one after another, each loading the broadcast adapter first). This is
an explicit, bounded cache owned by the task layer, not by the library.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from silotune.adapters import AdapterModel
from silotune.config import FederationConfig, LoraSpec, MethodSpec, ModelSpec
from silotune.memo import WorkMemo
from silotune.policy import SiloPolicy
from silotune.store import ObjectStore, open_store
from silotune.tracking import Tracker, open_tracker


class ModelCache:
    """At most ``capacity`` (model, method, LoRA shape) triples stay loaded; the oldest is dropped first."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, AdapterModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: ModelSpec, lora: LoraSpec, method: MethodSpec | None = None) -> AdapterModel:
        method = method or MethodSpec()
        key = model.model_dump_json() + lora.model_dump_json() + method.model_dump_json()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            while len(self._items) >= self.capacity:
                self._items.popitem(last=False)
            adapter = AdapterModel.create(model, lora, seed=0, method=method)
            self._items[key] = adapter
            return adapter

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


MODELS = ModelCache()
# Experiments that run many federations in this process (the robustness grid) set a memo here so that
# identical local work (round-1 training of honest silos, evaluations of the same global) runs once.
# None for ordinary federations.
MEMO: WorkMemo | None = None
# Training mutates the shared model's adapter weights: one silo at a time per process.
TRAIN_LOCK = threading.Lock()


# Data paths a silo's own worker registered (``silotune silo join --train-path ...``): at a real silo the
# data lives where the silo says, whatever paths the coordinator's config carries.
_LOCAL_SILO_PATHS: dict[str, dict[str, str | None]] = {}


def register_local_silo(name: str, *, train_path: str | None = None, eval_path: str | None = None) -> None:
    paths = {k: v for k, v in (("train_path", train_path), ("eval_path", eval_path)) if v is not None}
    _LOCAL_SILO_PATHS[name] = paths


def localize(config: FederationConfig, silo: str) -> FederationConfig:
    """``config`` with ``silo``'s data paths replaced by the ones registered in this process, if any."""
    paths = _LOCAL_SILO_PATHS.get(silo)
    if not paths:
        return config
    silos = [s.model_copy(update=paths) if s.name == silo else s for s in config.silos]
    return config.model_copy(update={"silos": silos})


def adapter_for(config: FederationConfig, silo: str | None = None) -> AdapterModel:
    """The trainable model of ``silo`` (its own method, if it has one), else of the federation."""
    method = config.method_for(silo) if silo is not None else config.method
    return MODELS.get(config.model, config.lora_for(silo), method)


def store_for(config: FederationConfig) -> ObjectStore:
    return open_store(config.store)


def tracker_for(config: FederationConfig) -> Tracker:
    return open_tracker(config.tracking)


# Policies of the silos this process serves (`silotune silo join --policy`, or tests): a silo's flow runs
# only configs its policy allows.
SILO_POLICIES: dict[str, SiloPolicy] = {}


def register_silo_policy(policy: SiloPolicy) -> None:
    SILO_POLICIES[policy.silo] = policy
