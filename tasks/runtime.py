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
from silotune.policy import SiloPolicy, enforce
from silotune.results import Release
from silotune.reuse import WorkMemo
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


# Policies of the silos this process serves (`silotune silo join --policy`, or tests): a silo's flow runs
# only configs its policy allows.
SILO_POLICIES: dict[str, SiloPolicy] = {}


def register_silo_policy(policy: SiloPolicy) -> None:
    SILO_POLICIES[policy.silo] = policy


def admit(config: FederationConfig, silo: str) -> tuple[FederationConfig, Release]:
    """The config as this silo runs it, and what it releases; PolicyRefusal if its policy says no.

    With a registered policy the policy decides: the config is checked against it before any data is
    read (a refusal is logged in the silo's private folder and nothing is uploaded), and the silo's
    own private folder and data paths replace the config's. Without one (an embedded federation, where
    coordinator and silos are one process and one party) the config is taken as it is.
    """
    policy = SILO_POLICIES.get(silo)
    if policy is None:
        return config, Release()
    return enforce(policy, config), Release(**policy.release.model_dump())


def adapter_for(config: FederationConfig, silo: str | None = None) -> AdapterModel:
    """The trainable model of ``silo`` (its own method, if it has one), else of the federation."""
    method = config.method_for(silo) if silo is not None else config.method
    return MODELS.get(config.model, config.lora_for(silo), method)


def store_for(config: FederationConfig) -> ObjectStore:
    return open_store(config.store)


def tracker_for(config: FederationConfig) -> Tracker:
    return open_tracker(config.tracking)


def published_location(config: FederationConfig, prefix: str) -> str:
    """Where the publishing silo's adapter folder lives, if ``prefix`` is its own published/ prefix."""
    from silotune.store import FederationLayout

    expected = FederationLayout(config.federation_id).published(config.ckks_publisher, "")
    if prefix != expected:
        raise ValueError(f"the publisher reported {prefix!r}, not its published prefix {expected!r}")
    return f"{store_for(config).describe().rstrip('/')}/{prefix}"
