"""The attacker's workbench: fixtures shared by the adversarial suite (issue 11).

Each test in this folder is one attack, expressed with exactly the attacker's capabilities, run
through the real code path (the silo flows, ``silotune.protection``, ``federation``, the runner), and
asserting the *defence*: the attack is refused or detected, nothing private leaves the silo, the
coordinator executes nothing.

Everything that says *how the defence is configured* lives here, not in the tests: each silo's own
policy (``silotune.policy.SiloPolicy``, registered with ``tasks.runtime.register_silo_policy``), its
signed acceptance of the federation config (``silotune.policy.accept_config``), the keys every config
pins (``silotune.keys.pin_local_keys``: every silo's Ed25519 key and the coordinator's), the store
layout (``silotune.store.FederationLayout``: ``updates/<silo>/``, ``results/<silo>/``,
``messages/<silo>/``, ``published/<silo>/``), the coordinator's signatures (a malicious coordinator
holds ``<keys_dir>/coordinator.pem``, so what it forges it signs) and how the coordinator reads a silo
run (``flows.runner.read_outcome``: the silo's signed record in its own results prefix).

No helper falls back to "not configured" when a module or function is missing: a test whose defence
is missing fails (with an ImportError or AttributeError at worst), it never passes or skips.

Vocabulary of the silo policy rules (``silo_policy(config, silo, **rules)``); what is not given is
derived from the honest config by ``silotune.policy.local_policy`` (strict: its federation id, store,
the silo's private folder and data paths, its DP settings as floors, the pinned coordinator key and
base model, acceptance required):

    min_protection       "none" | "secagg" | "ckks": the weakest protection the silo runs
    require_signing      bool
    require_sample_dp    bool (DP-SGD must be on)
    min_noise_multiplier float | None
    any other keyword    a ``SiloPolicy`` field, as it is

The baseline of this suite is main at f412311, before issue 11's fix (see
/work/notes/adversarial-baseline.md); the results on the fixed main are in
/work/notes/adversarial-after.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from silotune.store import FederationLayout

# -- Prefect ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_results_dir(tmp_path_factory) -> Path:
    """Where the coordinator's default Prefect result storage lives (the stack's results bucket)."""
    return tmp_path_factory.mktemp("prefect-results")


_PREFECT_DB: list[Path] = []


@pytest.fixture(scope="session")
def prefect_api(prefect_results_dir: Path) -> Iterator[None]:
    """A temporary Prefect API on 127.0.0.1, results persisted to ``prefect_results_dir``."""
    from prefect.settings import (
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(prefect_results_dir)}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        url = str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
        _PREFECT_DB[:] = [Path(url.split(":///", 1)[1]).parent] if ":///" in url else []
        yield


@pytest.fixture
def prefect_records(prefect_api: None, prefect_results_dir: Path) -> list[Path]:
    """Everything Prefect keeps: its result storage and the folder of its database (flow-run parameters,
    states, logs), for the plaintext scans."""
    assert _PREFECT_DB and any(_PREFECT_DB[0].glob("*.db")), f"Prefect's database not found ({_PREFECT_DB})"
    return [prefect_results_dir, *_PREFECT_DB]


# -- configs ------------------------------------------------------------------------------------------


def make_config(
    root: Path,
    demo_data: dict[str, dict[str, Path]],
    fid: str,
    *,
    silos: Sequence[str] = ("clinic", "lab"),
    protection: str = "none",
    signing: bool = True,
    sample_dp: dict[str, Any] | None = None,
    client_dp: dict[str, Any] | None = None,
    rounds: int = 2,
    local_steps: int = 1,
    min_silos: int = 2,
    store: dict[str, Any] | None = None,
    pin: bool = True,
    **sections: Any,
) -> Any:
    """A federation config on the tiny random model: few steps, no tracking, a local store under ``root``.

    ``pin`` (default): every key the config needs exists (silo identities, the coordinator's signing
    key, CKKS contexts) and the config pins each silo's public key and the coordinator's
    (``silotune.keys.pin_local_keys``, which also turns signing on).
    """
    from silotune.config import parse_config
    from silotune.keys import pin_local_keys

    raw: dict[str, Any] = {
        "federation_id": fid,
        "rounds": rounds,
        "seed": 3,
        "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
        "lora": {"r": 4},
        "train": {"local_steps": local_steps, "batch_size": 4, "learning_rate": 5e-2},
        "silos": [
            {
                "name": s,
                "train_path": str(demo_data[s]["train"]),
                "eval_path": str(demo_data[s]["eval"]),
                "private_dir": str(root / "silos" / s),
            }
            for s in silos
        ],
        "aggregation": {"min_silos": min_silos, "options": {"weighted": False}},
        "evaluation": {"max_examples": 2},
        "store": store or {"root": str(root / "store")},
        "tracking": {"kind": "none"},
        "security": {"protection": protection, "signing": signing, "keys_dir": str(root / "coordinator")},
        "privacy": {"sample_dp": sample_dp, "client_dp": client_dp},
    }
    raw.update(sections)
    config = parse_config(raw)
    if pin:
        config = parse_config(pin_local_keys(config).model_dump(mode="json"))
    return config


def with_changes(config: Any, **changes: Any) -> Any:
    """``config`` with dotted fields replaced (``security.protection="none"``), re-validated."""
    from silotune.config import parse_config

    raw = config.model_dump(mode="json")
    for dotted, value in changes.items():
        node = raw
        *path, last = dotted.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return parse_config(raw)


def _round_in_key(key: str) -> int:
    parts = key.split("/")
    return int(parts[parts.index("rounds") + 1])


def coordinator_signs(config: Any, store: Any, key: str, data: bytes, *, round_: int, purpose: str) -> None:
    """The (malicious) coordinator signs what it wrote with its own key, as the honest one does."""
    from silotune.protection.base import sign_object

    assert (Path(config.security.keys_dir) / "coordinator.pem").is_file(), "the coordinator has no key"
    sign_object(config, store, key, data, round_=round_, purpose=purpose)


def coordinator_put_global(config: Any, store: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The coordinator writes a (plaintext) global adapter at ``key``, signed with its key; its reference."""
    from silotune.federation import ObjectRef
    from silotune.store import save_tensors, sha256

    data = save_tensors(tensors, {"federation_id": config.federation_id})
    store.put(key, data)
    coordinator_signs(config, store, key, data, round_=_round_in_key(key), purpose="global")
    return ObjectRef(key=key, sha256=sha256(data))


def perturbed(tensors: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in tensors.items()}


def setup_keys(config: Any) -> None:
    """Every key the config needs on one machine (idempotent; ``make_config`` already pinned them)."""
    from silotune.keys import setup_local_keys

    setup_local_keys(config)
    assert all(s.public_key for s in config.silos) and config.security.coordinator_key, (
        "the config pins no keys: build it with make_config(pin=True)"
    )


def silo_keypair(config: Any, silo: str) -> Any:
    """The silo's own Ed25519 key (a malicious silo signs what it forges with it)."""
    from silotune.keys import SiloVault

    return SiloVault.for_silo(config.silo(silo)).signing_key()


# -- the silo's own policy ----------------------------------------------------------------------------


_PROTECTION_AT_LEAST = {"none": ["none", "secagg", "ckks"], "secagg": ["secagg", "ckks"], "ckks": ["ckks"]}


def _build_policy(config: Any, silo: str, rules: dict[str, Any]) -> Any:
    """The suite's rule vocabulary (module docstring) on top of ``silotune.policy.local_policy``."""
    from silotune.policy import SiloPolicy, local_policy, model_weights_sha256

    coordinator_key = Path(config.security.keys_dir) / "coordinator.pub.pem"
    assert coordinator_key.is_file(), f"no coordinator public key at {coordinator_key} (make_config pins it)"
    base = local_policy(
        config,
        silo,
        coordinator_key=str(coordinator_key),
        base_model_sha256=model_weights_sha256(config.model),
    )
    fields = base.model_dump()
    rules = dict(rules)
    fields["protection"] = _PROTECTION_AT_LEAST[rules.pop("min_protection", config.security.protection)]
    fields["require_signing"] = rules.pop("require_signing", True)
    dp = dict(fields["dp"])
    if "require_sample_dp" in rules:
        dp["require_sample_dp"] = rules.pop("require_sample_dp")
    if "min_noise_multiplier" in rules:
        dp["min_noise_multiplier"] = rules.pop("min_noise_multiplier")
    fields["dp"] = dp
    fields["private_dir"] = str(Path(fields["private_dir"]).resolve())
    fields.update(rules)
    policy = SiloPolicy.model_validate(fields)
    assert policy.require_accepted_config, "the suite's silos run only configs they accepted"
    return policy


@pytest.fixture
def _policies() -> dict[str, Any]:
    """The policies ``silo_policy`` registered in this test, by silo."""
    return {}


@pytest.fixture
def silo_policy(_policies: dict[str, Any]) -> Iterator[Callable[..., Any]]:
    """``silo_policy(config, silo, **rules)``: give ``silo`` its own policy, derived from the honest ``config``.

    Builds a ``silotune.policy.SiloPolicy`` and registers it with ``tasks.runtime.register_silo_policy``:
    from then on every run of ``silo``'s flows in this process is checked against it
    (``tasks.runtime.admit``). Removed again after the test.
    """
    from tasks.runtime import SILO_POLICIES, register_silo_policy

    def apply(config: Any, silo: str, **rules: Any) -> Any:
        policy = _build_policy(config, silo, rules)
        register_silo_policy(policy)
        assert SILO_POLICIES.get(silo) is policy
        _policies[silo] = policy
        return policy

    yield apply
    for silo in _policies:
        SILO_POLICIES.pop(silo, None)


@pytest.fixture
def silo_accepts(_policies: dict[str, Any]) -> Callable[[Any, str], None]:
    """``silo_accepts(config, silo)``: the silo signs this config's fingerprint at join time
    (``silotune.policy.accept_config`` with the silo's registered policy)."""
    from silotune.policy import accept_config

    def accept(config: Any, silo: str) -> None:
        policy = _policies.get(silo)
        assert policy is not None, f"silo_accepts({silo!r}) before silo_policy({silo!r})"
        accept_config(policy, config, create_key=True)

    return accept


# -- what the silo trains: the plaintext the store must never see --------------------------------------


class Captured:
    """Every local training result (the silo's private delta) and the DP noise key it ran with."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []

    def deltas(self, silo: str | None = None) -> list[dict[str, torch.Tensor]]:
        return [r["delta"] for r in self.runs if silo is None or r["silo"] == silo]

    def tensors(self, silo: str | None = None) -> list[torch.Tensor]:
        return [t for d in self.deltas(silo) for t in d.values()]


@pytest.fixture
def captured(monkeypatch) -> Captured:
    """Spy on ``silotune.training.train_local`` wherever it was imported (silo side only)."""

    import silotune.training as training

    # Import the silo side first: a module imported later would bind the spy for good.
    importlib.import_module("flows.silo")
    cap = Captured()
    real = training.train_local

    def spy(*args: Any, **kwargs: Any) -> Any:
        delta, result = real(*args, **kwargs)
        desc = str(kwargs.get("desc", ""))
        silo = desc.rsplit("·", 1)[-1].strip() if "·" in desc else None
        dp = kwargs.get("dp")
        cap.runs.append(
            {
                "silo": silo,
                "desc": desc,
                "delta": {k: v.detach().clone() for k, v in delta.items()},
                # the key of the DP noise draws (silotune.privacy.noise; a test-only integer seed
                # is turned into a key the same way)
                "noise_key": getattr(dp, "key", None),
            }
        )
        return delta, result

    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in ("silotune", "tasks", "flows") and getattr(mod, "train_local", None) is real:
            monkeypatch.setattr(mod, "train_local", spy)
    return cap


def _needles(t: torch.Tensor) -> list[bytes]:
    flat = t.detach().flatten().to(torch.float32)
    out = []
    step = max(1, flat.numel() // 16)
    for i in range(0, max(1, flat.numel() - 4), step):
        window = flat[i : i + 4]
        if window.numel() == 4 and float(window.abs().min()) > 1e-12:  # zeros would match any file
            out.append(window.numpy().tobytes())
    return out


def files_under(*roots: Path) -> dict[Path, bytes]:
    out: dict[Path, bytes] = {}
    for root in roots:
        if Path(root).is_dir():
            for p in sorted(Path(root).rglob("*")):
                if p.is_file():
                    out[p] = p.read_bytes()
    return out


def plaintext_leaks(
    tensors: Sequence[torch.Tensor], *roots: Path, blobs: dict[str, bytes] | None = None
) -> dict[str, int]:
    """Files under ``roots`` (and ``blobs``) holding any 4 consecutive float32 values of ``tensors``: name -> size.

    The scan of ``test_ckks_coordinator_is_keyless_and_store_holds_no_plaintext``, over every file of
    the store(s) (``federations/``, ``updates/``, ``results/``, ``messages/``, ``published/``: the whole
    root), of the attacker's store and of Prefect's records.
    """
    needles = [n for t in tensors for n in _needles(t)]
    assert needles or not tensors, "nothing to look for: the captured deltas are all zero"
    items = {str(p): d for p, d in files_under(*roots).items()} | dict(blobs or {})
    return {name: len(data) for name, data in items.items() if any(n in data for n in needles)}


def new_files(before: dict[Path, bytes], *roots: Path) -> dict[str, int]:
    """Files created or changed under ``roots`` since ``before``: path -> size."""
    now = files_under(*roots)
    return {str(p): len(d) for p, d in now.items() if before.get(p) != d}


# -- reading a silo run as the coordinator does ---------------------------------------------------------


def run_error(state: Any) -> str:
    """Why a silo run failed, as its final state says (empty for a run that completed)."""
    parts = [state.message or ""]
    try:
        value = state.result(raise_on_failure=False)
    except Exception as exc:
        parts.append(f"{type(exc).__name__}: {exc}")
    else:
        if isinstance(value, BaseException):
            parts.append(f"{type(value).__name__}: {value}")
    out: list[str] = []
    for p in parts:
        if p and not any(p in q for q in out):
            out.append(p)
    return " | ".join(out)


def outcome(config: Any, flow_name: str, silo: str, round_: int, state: Any, stage: str = "") -> Any:
    """What the coordinator reads of a silo run: ``flows.runner.read_outcome`` (the silo's signed
    record in its results prefix, or the exception saying why there is none)."""
    from flows.runner import read_outcome

    return read_outcome(config, flow_name, stage, silo, round_, state).value


def completed_with_update(config: Any, silo: str, round_: int, state: Any) -> bool:
    """The silo's ``silo-round`` run finished and handed an update to the coordinator."""
    if not state.is_completed():
        return False
    value = outcome(config, "silo-round", silo, round_, state)
    return getattr(value, "update", None) is not None


def update_record(config: Any, silo: str, round_: int, state: Any) -> Any:
    """The silo's update record of a ``silo-round`` run, as the coordinator reads it."""
    value = outcome(config, "silo-round", silo, round_, state)
    assert not isinstance(value, BaseException), f"no record of {silo}'s round {round_ + 1}: {value}"
    assert value.update is not None, f"{silo}'s round {round_ + 1} has no update: {value.train_error}"
    return value.update


class CoordinatorTrace:
    """What the coordinator touched while reading a silo run: store keys, files, unpickled classes,
    Prefect result reads (an audit hook and spies; see ``coordinator_reads``)."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str]] = []  # (method, key)
        self.opened: list[str] = []
        self.unpickled: list[str] = []
        self.prefect_reads: list[str] = []


_TRACE: list[CoordinatorTrace] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _TRACE:
        return
    if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        _TRACE[-1].opened.append(os.fsdecode(args[0]))
    elif event == "pickle.find_class":
        _TRACE[-1].unpickled.append(".".join(str(a) for a in args))


sys.addaudithook(_audit)


@pytest.fixture
def coordinator_reads(monkeypatch) -> Callable[..., tuple[Any, CoordinatorTrace]]:
    """``coordinator_reads(config, flow_name, silo, round_, state, stage="")``: how the coordinator turns a
    silo run into a value (``flows.runner.read_outcome``), traced: the store keys it read, the files it
    opened, the classes it unpickled and every Prefect result read (``State.result``,
    ``ResultStore.read``)."""
    from prefect.client.schemas.objects import State
    from prefect.results import ResultStore

    from silotune.store import LocalStore

    def spy_store(name: str) -> None:
        real = getattr(LocalStore, name)

        def spy(self: Any, key: str, *a: Any, **kw: Any) -> Any:
            if _TRACE:
                _TRACE[-1].keys.append((name, key))
            return real(self, key, *a, **kw)

        monkeypatch.setattr(LocalStore, name, spy)

    def spy_prefect(cls: Any, name: str) -> None:
        real = getattr(cls, name)

        def spy(*a: Any, **kw: Any) -> Any:
            if _TRACE:
                _TRACE[-1].prefect_reads.append(f"{cls.__name__}.{name}")
            return real(*a, **kw)

        monkeypatch.setattr(cls, name, spy)

    for name in ("get", "get_bounded", "exists", "list"):
        spy_store(name)
    for cls, name in ((State, "result"), (State, "aresult"), (ResultStore, "read"), (ResultStore, "aread")):
        spy_prefect(cls, name)

    def read(config: Any, flow_name: str, silo: str, round_: int, state: Any, stage: str = "") -> Any:
        trace = CoordinatorTrace()
        _TRACE.append(trace)
        try:
            value = outcome(config, flow_name, silo, round_, state, stage)
        finally:
            _TRACE.remove(trace)
        return value, trace

    return read


@contextlib.contextmanager
def traced() -> Iterator[CoordinatorTrace]:
    """Trace the coordinator's further steps (inside a test using ``coordinator_reads``)."""
    trace = CoordinatorTrace()
    _TRACE.append(trace)
    try:
        yield trace
    finally:
        _TRACE.remove(trace)


def report_state(flow_name: str, state: Any) -> Any:
    """A silo's engine reports ``state`` for a run of ``flow_name``; returns the state as the coordinator reads it.

    The run is created on the API (as the coordinator's runner does), the silo sets its final state
    with whatever data it likes (here a result record's metadata), and the coordinator reads the run
    back from the API, as ``WorkPoolRunner`` does.
    """
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    @flow(name=flow_name)
    def _placeholder() -> None:  # pragma: no cover - never run, only names the runs
        return None

    async def go() -> Any:
        async with get_client() as client:
            run = await client.create_flow_run(_placeholder, parameters={}, tags=["adversarial"])
            await client.set_flow_run_state(run.id, state, force=True)
            return (await client.read_flow_run(run.id)).state

    return run_coro_as_sync(go())


def result_record(result: Any, *, storage_key: str, serializer: str = "json") -> tuple[Any, bytes]:
    """A Prefect result record (metadata, bytes) exactly as ``prefect/results.py`` reads one back."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer, PickleSerializer

    ser = PickleSerializer() if serializer == "pickle" else JSONSerializer()
    meta = ResultRecordMetadata(storage_key=storage_key, serializer=ser)
    record = ResultRecord(metadata=meta, result=result)
    data = record.serialize()
    record.mark_persisted()  # what the silo's engine reports: the record is in storage
    return record, data


def result_key(config: Any, silo: str, round_: int, stage: str) -> str:
    """Where ``silo`` writes its result record of a run (its own results prefix)."""
    return FederationLayout(config.federation_id).result(round_, silo, stage)


def silo_writes_result(config: Any, store: Any, silo: str, round_: int, stage: str, data: bytes) -> str:
    """A (malicious) silo writes ``data`` as its result record, signed with its own key, in its prefix."""
    key = result_key(config, silo, round_, stage)
    sig = silo_keypair(config, silo).sign(
        data, federation_id=config.federation_id, round=round_, silo=silo, purpose="result"
    )
    store.put(key + ".sig", sig)
    store.put(key, data)
    return key


# -- store layout -------------------------------------------------------------------------------------
# The keys of silotune.store.FederationLayout, plus the pre-issue-11 keys (federations/<fid>/rounds/...):
# attacks write both, and the checks look at both, so a reader that fell back to the old layout is caught.


def advert_keys(config: Any, silo: str, round_: int) -> list[str]:
    fid = config.federation_id
    return [
        FederationLayout(fid).message(round_, silo, "secagg/advert"),
        f"federations/{fid}/rounds/{round_:05d}/secagg/adverts/{silo}",
    ]


def share_keys(config: Any, sender: str, recipient: str, round_: int) -> list[str]:
    fid = config.federation_id
    return [
        FederationLayout(fid).message(round_, sender, f"secagg/shares/{recipient}"),
        f"federations/{fid}/rounds/{round_:05d}/secagg/shares/{recipient}/{sender}",
    ]


def final_prefixes(config: Any, silo: str) -> list[str]:
    lay = FederationLayout(config.federation_id)
    return [lay.published(silo, ""), lay.final("")]


def publish_survivors(config: Any, store: Any, round_: int, survivors: Sequence[str]) -> None:
    """The (malicious) coordinator fixes a round's secure-aggregation survivors, any set it likes, and
    signs the list with its key (what ``SecAggScheme.close_upload`` writes for the honest set)."""
    key = FederationLayout(config.federation_id).survivors(round_)
    data = json.dumps(sorted(survivors)).encode()
    store.put(key, data)
    coordinator_signs(config, store, key, data, round_=round_, purpose="survivors")


def ckks_pointer(
    config: Any,
    store: Any,
    *,
    round_next: int,
    base: Any,
    aggregate: bytes,
    contributions: Sequence[tuple[str, str, str]],
    base_round: int | None = None,
    tag: str = "attack",
) -> Any:
    """The (malicious) coordinator names the next CKKS global: ``base`` plus the encrypted ``aggregate``
    of the listed ``contributions`` ((silo, key, sha256) each), a ``GlobalPointer`` signed with its key.

    The aggregate and the pointer go to keys of their own (``….<tag>.*``), so that an honest pointer
    of the same round stays as it was.
    """
    from silotune.federation import ObjectRef
    from silotune.protection.ckks import Contribution, GlobalPointer
    from silotune.store import sha256

    lay = FederationLayout(config.federation_id)
    agg_key = lay.aggregate(round_next - 1) + f".{tag}"
    store.put(agg_key, aggregate)
    pointer = GlobalPointer(
        round=round_next,
        base=ObjectRef(key=base.key, sha256=base.sha256),
        base_round=round_next - 1 if base_round is None else base_round,
        aggregate=ObjectRef(key=agg_key, sha256=sha256(aggregate)),
        contributions=[Contribution(silo=s, key=k, sha256=h) for s, k, h in contributions],
    )
    data = json.dumps(pointer.model_dump(mode="json"), sort_keys=True).encode()
    key = lay.global_pointer(round_next).removesuffix(".json") + f".{tag}.json"
    store.put(key, data)
    coordinator_signs(config, store, key, data, round_=round_next, purpose="global")
    return ObjectRef(key=key, sha256=sha256(data))


def read_published(config: Any, store: Any) -> dict[str, bytes]:
    """What a consumer of the federation gets as its final adapter under CKKS: the files of the designated
    publisher's ``published/`` prefix, the only one ``tasks.runtime.published_location`` accepts."""
    from tasks.runtime import published_location

    prefix = FederationLayout(config.federation_id).published(config.ckks_publisher, "")
    published_location(config, prefix)  # the coordinator's own check of the prefix it reports
    return {k.removeprefix(prefix): store.get(k) for k in store.list(prefix)}


# -- privacy ledger -----------------------------------------------------------------------------------


def silo_epsilon(config: Any, silo: str) -> tuple[float, int]:
    """The silo's DP-SGD ε in ``config``'s federation as its private ledger records it, and its rounds."""
    from silotune.keys import SiloVault
    from silotune.privacy.ledger import SiloLedger

    dp = config.privacy.sample_dp
    books = SiloLedger(SiloVault.for_silo(config.silo(silo)).root, silo)
    rounds = [e for e in books.entries() if e.kind == "sample_dp" and e.federation_id == config.federation_id]
    eps = books.epsilon(kind="sample_dp", delta=dp.delta, federation_id=config.federation_id)
    return float(eps), len(rounds)


# -- S3 identities of the stack ---------------------------------------------------------------------------


def s3_actions(silos: Sequence[str]) -> dict[str, list[str]]:
    """The SeaweedFS actions the stack grants each identity (``ops.credentials.identities``)."""
    from ops.credentials import identities

    return identities(list(silos))


def s3_allows(actions: Sequence[str], action: str, bucket: str, key: str) -> bool:
    """Whether ``actions`` grant ``action`` on ``bucket/key``: allowed if the suite's own model of SeaweedFS
    allows it (``Write`` alone is every bucket, ``Write:b`` all of b, ``Write:b/pat`` with ``*`` matching any
    characters, ``/`` included) or the stack's model (``ops.credentials.s3_allows``, checked against the real
    server) does: the more permissive of the two."""
    import fnmatch

    from ops.credentials import s3_allows as stack_allows

    if stack_allows(actions, action, bucket, key):
        return True
    target = f"{bucket}/{key}"
    for granted in actions:
        name, _, resource = granted.partition(":")
        if name not in (action, "Admin"):
            continue
        if not resource or resource == bucket:
            return True
        if fnmatch.fnmatchcase(target, resource):
            return True
    return False


# -- an S3 endpoint the attacker controls ----------------------------------------------------------------


class FakeS3:
    """A minimal S3 endpoint on 127.0.0.1 that records every object written to it (path-style)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def _key(self) -> str:
                return self.path.split("?", 1)[0].lstrip("/")

            def do_PUT(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                if "aws-chunked" in self.headers.get("Content-Encoding", "") or self.headers.get(
                    "x-amz-content-sha256", ""
                ).startswith("STREAMING"):
                    body = _dechunk(body)
                fake.requests.append(("PUT", self._key()))
                fake.objects[self._key()] = body
                self.send_response(200)
                self.send_header("ETag", '"' + hashlib.md5(body).hexdigest() + '"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                fake.requests.append(("GET", self._key()))
                body = fake.objects.get(self._key())
                if body is None:
                    msg = b"<Error><Code>NoSuchKey</Code><Message>no</Message></Error>"
                    self.send_response(404)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"' + hashlib.md5(body).hexdigest() + '"')
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self) -> None:
                fake.requests.append(("HEAD", self._key()))
                body = fake.objects.get(self._key())
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeS3:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    rest = body
    while rest:
        head, _, rest = rest.partition(b"\r\n")
        size = int(head.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2 :]
    return bytes(out)


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def describe(leaks: dict[str, int], root: Path | None = None) -> str:
    items = sorted(leaks.items())
    shown = ", ".join(
        f"{Path(p).relative_to(root) if root and Path(p).is_relative_to(root) else p} ({n} B)"
        for p, n in items[:4]
    )
    return shown + (f" and {len(items) - 4} more" if len(items) > 4 else "")


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


OVERSIZE = 64 * 2**20  # bytes of a result no coordinator should read into memory

_SELF = sys.modules[__name__]


@pytest.fixture(scope="session")
def kit() -> Any:
    """This module: the helpers above, for the tests (``kit.make_config(...)``)."""
    return _SELF
