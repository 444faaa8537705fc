"""Process-wide resources of the orchestration layer.

Loading a base model costs seconds to minutes, so a process keeps the models
it has loaded and reuses them across rounds and silos (silos in one process
train one after another, each loading the global adapter it received first). This is
an explicit, bounded cache owned by the task layer, not by the library.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from silotune.adapters import AdapterModel
from silotune.compute import (
    Placement,
    apply_threads,
    default_threads,
    host_slot,
    placement,
    serialise_colocated,
)
from silotune.config import FederationConfig, LoraSpec, MethodSpec, ModelSpec
from silotune.errors import SilotuneError, StoreUnavailable
from silotune.policy import PolicyError, SiloPolicy, enforce, load_policy
from silotune.results import Release
from silotune.reuse import WorkMemo
from silotune.store import FederationLayout, ObjectStore, open_store
from silotune.tracking import Tracker, open_tracker

log = logging.getLogger("silotune.runtime")


class ModelCache:
    """At most ``capacity`` (model, method, LoRA shape) triples stay loaded; the oldest is dropped first."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, AdapterModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self,
        model: ModelSpec,
        lora: LoraSpec,
        method: MethodSpec | None = None,
        placement: Placement | None = None,
    ) -> AdapterModel:
        method = method or MethodSpec()
        placement = placement or Placement()
        key = model.model_dump_json() + lora.model_dump_json() + method.model_dump_json() + repr(placement)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            while len(self._items) >= self.capacity:
                self._items.popitem(last=False)
            adapter = AdapterModel.create(model, lora, seed=0, method=method, placement=placement)
            log.info("loaded %s (%s) on %s", model.name_or_path, method.name, placement.describe())
            self._items[key] = adapter
            return adapter

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


MODELS = ModelCache()
# Experiments that run many federations in this process (the robustness grid) name a memo (the flow
# parameter ``reuse``), so that identical local work (round-1 training of honest silos, evaluations of
# the same global) runs once. Ordinary federations name none.
_MEMOS: dict[str, WorkMemo] = {}
_MEMOS_LOCK = threading.Lock()


def work_memo(name: str | None) -> WorkMemo | None:
    """The named memo of identical local work in this process (created on first use); None: no reuse."""
    if name is None:
        return None
    with _MEMOS_LOCK:
        return _MEMOS.setdefault(name, WorkMemo())


def drop_work_memo(name: str) -> None:
    with _MEMOS_LOCK:
        _MEMOS.pop(name, None)


# Training mutates the shared model's adapter weights: one silo at a time per process.
TRAIN_LOCK = threading.Lock()


# Policies of the silos this process serves (`silotune silo join --policy`, or tests): a silo's flow runs
# only configs its policy allows.
SILO_POLICIES: dict[str, SiloPolicy] = {}
# A flow run that a stock `prefect worker start` runs in a process of its own has no registered policy:
# the worker's environment names the silo's policy file (the fallback in ops/prefect_private.py).
POLICY_ENV = "SILOTUNE_SILO_POLICY"


def register_silo_policy(policy: SiloPolicy) -> None:
    SILO_POLICIES[policy.silo] = policy


def silo_policy(silo: str) -> SiloPolicy | None:
    """The policy this process serves ``silo`` under: the registered one, else ``$SILOTUNE_SILO_POLICY``.

    The file that variable names is read at the first run that asks, and registered. A file that is
    another silo's policy is an error, never "no policy": the process serves that silo alone.
    """
    policy = SILO_POLICIES.get(silo)
    path = os.environ.get(POLICY_ENV)
    if policy is not None or not path:
        return policy
    policy = load_policy(path)
    if policy.silo != silo:
        raise PolicyError(
            f"{path} (${POLICY_ENV}) is the policy of silo {policy.silo!r}: "
            f"this process does not serve {silo!r}"
        )
    register_silo_policy(policy)
    return policy


def admit(config: FederationConfig, silo: str) -> tuple[FederationConfig, Release]:
    """The config as this silo runs it, and what it releases; PolicyRefusal if its policy says no.

    With a registered policy the policy decides: the config is checked against it before any data is
    read (a refusal is logged in the silo's private folder and nothing is uploaded), and the silo's
    own private folder and data paths replace the config's (:func:`silo_policy`: registered, or named by
    ``$SILOTUNE_SILO_POLICY``). Without one (an embedded federation, where coordinator and silos are one
    process and one party) the config is taken as it is.
    """
    policy = silo_policy(silo)
    if policy is None:
        return config, Release()
    return enforce(policy, config), Release(**policy.release.model_dump())


def _failure(state: Any) -> Exception | None:
    """The exception a task run's final state holds (None: it did not fail)."""
    try:
        state.result()
    except Exception as e:
        return e
    return None


# The HTTP clients' own network errors (not all of them subclass ConnectionError or TimeoutError).
_NETWORK_MODULES = {"requests", "urllib3", "botocore", "httpx", "httpcore"}


def transient(task: object, task_run: object, state: Any) -> bool:
    """Retry condition: only what may pass on a second try (a store that cannot be reached or is busy,
    network errors, crashes).

    Bad input (a config, data, an update, a policy refusal, a spent budget) and a store's definite
    answers (an object missing, corrupted, too large or forbidden) fail the same way every time: they
    are reported once, not retried.
    """
    e = _failure(state)
    return e is not None and (isinstance(e, StoreUnavailable) or not isinstance(e, SilotuneError))


def unreachable(task: object, task_run: object, state: Any) -> bool:
    """Retry condition of the coordinator's store steps: only a service that could not be reached.

    Stricter than :func:`transient`: these steps wait up to 37 s between tries, which only an outage
    is worth; a bug or a crash in the step itself fails at once, as it would fail again.
    """
    e = _failure(state)
    if isinstance(e, StoreUnavailable | ConnectionError | TimeoutError):
        return True
    return isinstance(e, OSError) and type(e).__module__.split(".")[0] in _NETWORK_MODULES


# The coordinator's steps that read or write the store are retried while it cannot be reached for a
# moment (the coordinator's link cut, the store restarting): 37 s of waits in all, each try already
# including the S3 client's own quick retries. Each such step is safe to run again (see its task).
STORE_RETRIES: dict[str, Any] = {
    "retries": 4,
    "retry_delay_seconds": [2, 5, 10, 20],
    "retry_condition_fn": unreachable,
}


class ExpectedErrorFilter(logging.Filter):
    """Drops the traceback from Prefect's log record of a task or flow that failed with bad input.

    A :class:`~silotune.errors.SilotuneError` (bad config, data, update, a refusal) names what is wrong
    in its message; the stack under it says nothing more to the operator. Other exceptions keep it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, SilotuneError):
            record.exc_info = None
            record.exc_text = None
        return True


_EXPECTED_ERRORS = ExpectedErrorFilter()


def install_expected_error_filter() -> None:
    """Put the filter on Prefect's run loggers (task and flow runs log through these two, never through
    child loggers). Idempotent; flows call it when they start, because re-running Prefect's logging
    setup (``dictConfig``) replaces a logger's filters."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        if _EXPECTED_ERRORS not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_EXPECTED_ERRORS)


install_expected_error_filter()


def lifetime_epsilon(silo: str) -> float | None:
    """The silo policy's lifetime ε per dataset, if this process serves the silo under a policy."""
    policy = silo_policy(silo)
    return policy.dp.max_lifetime_epsilon if policy is not None else None


def adapter_for(config: FederationConfig, silo: str | None = None) -> AdapterModel:
    """The trainable model of ``silo`` (its own method and device, if it has them), else of the federation."""
    method = config.method_for(silo) if silo is not None else config.method
    device = config.silo(silo).device if silo is not None else None
    return MODELS.get(config.model, config.lora_for(silo), method, placement(config.train, device=device))


@contextlib.contextmanager
def compute_slot(config: FederationConfig) -> Iterator[None]:
    """One silo computes at a time in this process, and on this host when co-located runs are serialised.

    Inside, torch runs on the silo's CPU budget: ``train.torch_threads``, else the usable cores
    divided among the host's silo workers (all of them while holding the host-wide slot).
    """
    serialised = serialise_colocated(config.train.serialise_colocated)
    with TRAIN_LOCK, host_slot(serialised):
        apply_threads(Placement(threads=config.train.torch_threads or default_threads(serialised=serialised)))
        yield


def store_for(config: FederationConfig) -> ObjectStore:
    return open_store(config.store)


def tracker_for(config: FederationConfig) -> Tracker:
    return open_tracker(config.tracking)


def published_location(config: FederationConfig, prefix: str) -> str:
    """Where the publishing silo's adapter folder lives, if ``prefix`` is its own published/ prefix."""
    expected = FederationLayout(config.federation_id).published(config.ckks_publisher, "")
    if prefix != expected:
        raise ValueError(f"the publisher reported {prefix!r}, not its published prefix {expected!r}")
    return f"{store_for(config).describe().rstrip('/')}/{prefix}"
