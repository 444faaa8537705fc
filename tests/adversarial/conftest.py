"""The attacker's workbench: fixtures shared by the adversarial suite (issue 11).

Each test in this folder is one attack, expressed with exactly the attacker's capabilities, run
through the real code path (the silo flows, ``silotune.protection``, ``federation``, the runner), and
asserting the *defence*: the attack is refused or detected, nothing private leaves the silo, the
coordinator executes nothing.

Everything that says *how the defence is configured* lives here, not in the tests, so that the same
tests run on main before the fix (where these helpers configure nothing, or fall back to today's
layout, and the tests fail on their assertions) and after it (where they configure the silo policy,
the accepted config, the signed survivor lists, ... of the new code). When the new APIs land, adapt
the helpers marked ``ADAPT`` below; the tests themselves should not need to change.

Vocabulary of the silo policy rules (``silo_policy(config, silo, **rules)``); what is not given is
derived from the honest config (its federation id, store, the silo's private folder and data paths):

    min_protection       "none" | "secagg" | "ckks": the weakest protection the silo runs
    require_signing      bool
    require_sample_dp    bool (DP-SGD must be on)
    min_noise_multiplier float | None
    any other keyword    passed to ``SiloPolicy`` as it is

The baseline of this suite is main at f412311, before issue 11's fix. Modules this checkout lacks are
treated as absent even when the venv's editable install would find them in another checkout.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
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

_CHECKOUT = Path(__file__).resolve().parents[2]


def _optional(module: str) -> Any | None:
    """``module`` if this checkout has it, else None.

    The venv's editable install maps a module missing here to another checkout of the repository:
    such a module is treated as absent (and never imported), so that main-before-the-fix stays itself.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        return None
    if spec is None or spec.origin is None or _CHECKOUT not in Path(spec.origin).resolve().parents:
        return None
    return importlib.import_module(module)


# -- Prefect ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_results_dir(tmp_path_factory) -> Path:
    """Where the coordinator's default Prefect result storage lives (the stack's results bucket)."""
    return tmp_path_factory.mktemp("prefect-results")


@pytest.fixture(scope="session")
def prefect_api(prefect_results_dir: Path) -> Iterator[None]:
    """A temporary Prefect API on 127.0.0.1, results persisted to ``prefect_results_dir``."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(prefect_results_dir)}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        yield


# -- configs ------------------------------------------------------------------------------------------


def make_config(
    root: Path,
    demo_data: dict[str, dict[str, Path]],
    fid: str,
    *,
    silos: Sequence[str] = ("clinic", "lab"),
    protection: str = "none",
    signing: bool = False,
    sample_dp: dict[str, Any] | None = None,
    client_dp: dict[str, Any] | None = None,
    rounds: int = 2,
    local_steps: int = 1,
    min_silos: int = 2,
    store: dict[str, Any] | None = None,
    **sections: Any,
) -> Any:
    """A federation config on the tiny random model: few steps, no tracking, a local store under ``root``."""
    from silotune.config import parse_config

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
    return parse_config(raw)


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


def coordinator_put_global(config: Any, store: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The coordinator writes a (plaintext) global adapter at ``key``; returns its reference.

    ADAPT: the new code signs globals with the coordinator's key (a malicious coordinator has that key).
    """
    from silotune.federation import ObjectRef
    from silotune.store import put_tensors

    sha = put_tensors(store, key, tensors, metadata={"federation_id": config.federation_id})
    return ObjectRef(key=key, sha256=sha)


def perturbed(tensors: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in tensors.items()}


def setup_keys(config: Any) -> None:
    """Every key the config needs on one machine (silo identities, CKKS, and in the new code the coordinator's)."""
    from silotune.keys import setup_local_keys

    setup_local_keys(config)


# -- the silo's own policy (ADAPT when silotune.policy lands) ------------------------------------------


_PROTECTION_AT_LEAST = {"none": ["none", "secagg", "ckks"], "secagg": ["secagg", "ckks"], "ckks": ["ckks"]}


def _store_entry(policy_mod: Any, spec: Any) -> str:
    if hasattr(policy_mod, "store_location"):
        loc = policy_mod.store_location(spec)
        return loc.text() if callable(loc.text) else str(loc.text)
    if spec.kind == "local":
        return "file://" + str(Path(spec.root).resolve())
    return f"s3://{spec.endpoint_url.split('://', 1)[-1]}/{spec.bucket}"


def _build_policy(policy_mod: Any, config: Any, silo: str, rules: dict[str, Any]) -> Any:
    """ADAPT: the suite's rule vocabulary (module docstring) as a ``silotune.policy.SiloPolicy``.

    Written against the policy API merged into main after this suite's baseline (``SiloPolicy(silo,
    private_dir, train_path, eval_path, federations, coordinator_key, protection, require_signing, dp,
    stores)``); not yet run against it.
    """
    spec = config.silo(silo)
    rules = dict(rules)
    min_protection = rules.pop("min_protection", config.security.protection)
    require_signing = rules.pop("require_signing", config.security.signing)
    dp = {
        "require_sample_dp": rules.pop("require_sample_dp", config.privacy.sample_dp is not None),
        "min_noise_multiplier": rules.pop("min_noise_multiplier", None),
    }
    coordinator_key = Path(config.security.keys_dir) / "coordinator.pub.pem"
    fields: dict[str, Any] = {
        "silo": silo,
        "private_dir": str(Path(spec.private_folder).resolve()),
        "train_path": spec.train_path,
        "eval_path": spec.eval_path,
        "federations": [config.federation_id],
        "coordinator_key": str(coordinator_key) if coordinator_key.is_file() else None,
        "protection": _PROTECTION_AT_LEAST[min_protection],
        "require_signing": require_signing,
        "dp": {k: v for k, v in dp.items() if v is not None},
        "stores": [_store_entry(policy_mod, config.store)],
        **rules,
    }
    return policy_mod.SiloPolicy.model_validate(fields)


@pytest.fixture
def _policies() -> dict[str, Any]:
    """The policies ``silo_policy`` registered in this test, by silo."""
    return {}


@pytest.fixture
def silo_policy(_policies: dict[str, Any]) -> Iterator[Callable[..., Any]]:
    """``silo_policy(config, silo, **rules)``: give ``silo`` its own policy, derived from the honest ``config``.

    On main before the fix there is no ``silotune.policy``: this does nothing and returns None, and
    the attack tests fail on their assertions. With the new code it builds a ``SiloPolicy`` and
    registers it with ``tasks.runtime.register_silo_policy`` (removed again after the test).
    """
    runtime = importlib.import_module("tasks.runtime")

    def apply(config: Any, silo: str, **rules: Any) -> Any:
        policy_mod = _optional("silotune.policy")
        register = getattr(runtime, "register_silo_policy", None)
        if policy_mod is None or register is None:
            return None
        policy = _build_policy(policy_mod, config, silo, rules)
        if len(inspect.signature(register).parameters) == 1:
            register(policy)
        else:
            register(silo, policy)
        _policies[silo] = policy
        return policy

    yield apply
    registry = getattr(runtime, "SILO_POLICIES", None)
    for silo in _policies:
        if isinstance(registry, dict):
            registry.pop(silo, None)


@pytest.fixture
def silo_accepts(_policies: dict[str, Any]) -> Callable[[Any, str], None]:
    """``silo_accepts(config, silo)``: the silo signs this config's fingerprint at join time.

    Main before the fix has no notion of an accepted config: this does nothing. With the new code it
    calls ``silotune.policy.accept_config(policy, config, create_key=True)`` with the silo's policy.
    """

    def accept(config: Any, silo: str) -> None:
        policy_mod = _optional("silotune.policy")
        policy = _policies.get(silo)
        if policy_mod is None or policy is None or not hasattr(policy_mod, "accept_config"):
            return
        policy_mod.accept_config(policy, config, create_key=True)

    return accept


# -- what the silo trains: the plaintext the store must never see --------------------------------------


class Captured:
    """Every local training result (the silo's private delta) and the DP settings it ran with."""

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
                "noise_seed": getattr(dp, "noise_seed", None),
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
    the store(s) and of the Prefect result storage.
    """
    needles = [n for t in tensors for n in _needles(t)]
    items = {str(p): d for p, d in files_under(*roots).items()} | dict(blobs or {})
    return {name: len(data) for name, data in items.items() if any(n in data for n in needles)}


def new_files(before: dict[Path, bytes], *roots: Path) -> dict[str, int]:
    """Files created or changed under ``roots`` since ``before``: path -> size."""
    now = files_under(*roots)
    return {str(p): len(d) for p, d in now.items() if before.get(p) != d}


# -- reading a silo run as the coordinator does ---------------------------------------------------------


def run_error(state: Any) -> str:
    try:
        value = state.result(raise_on_failure=False)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return " ".join(str(x) for x in (state.message, getattr(value, "train_error", None)) if x)


def completed_with_update(state: Any) -> bool:
    """The silo run finished and handed an update to the coordinator."""
    if not state.is_completed():
        return False
    value = state.result(raise_on_failure=False)
    return getattr(value, "update", value) is not None


@pytest.fixture
def coordinator_reads() -> Callable[[Any], Any]:
    """How the coordinator turns a silo run's final state into a value: ``flows.runner.read_outcome``.

    ADAPT: the new runner reads the silo's signed result record from the store instead; point this at
    the function that does so for a run (it must still be handed whatever the silo's engine reported).
    """
    from flows import runner

    def read(state: Any) -> Any:
        return runner.read_outcome(state).value

    return read


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


# -- store layout: today's keys and the planned ones (ADAPT if the final layout differs) ----------------


def advert_keys(config: Any, silo: str, round_: int) -> list[str]:
    fid = config.federation_id
    return [
        f"federations/{fid}/rounds/{round_:05d}/secagg/adverts/{silo}",
        f"messages/{silo}/{fid}/{round_:05d}/secagg/advert",
    ]


def share_keys(config: Any, sender: str, recipient: str, round_: int) -> list[str]:
    fid = config.federation_id
    return [
        f"federations/{fid}/rounds/{round_:05d}/secagg/shares/{recipient}/{sender}",
        f"messages/{sender}/{fid}/{round_:05d}/secagg/shares/{recipient}",
    ]


def final_prefixes(config: Any, silo: str) -> list[str]:
    fid = config.federation_id
    return [f"federations/{fid}/final/", f"published/{silo}/{fid}/final/"]


def publish_survivors(config: Any, store: Any, round_: int, survivors: Sequence[str]) -> None:
    """The coordinator fixes a round's secure-aggregation survivors.

    ADAPT: the new code signs the list with the coordinator's key; use its function here.
    """
    from silotune import protection as prot

    fn = getattr(prot, "secagg_publish_survivors", None)
    if fn is None:
        raise AssertionError("ADAPT publish_survivors: no silotune.protection.secagg_publish_survivors")
    fn(config, round_, store, list(survivors))


def ckks_pointer(
    config: Any, store: Any, *, round_next: int, base: Any, aggregate: bytes, parts: Sequence[str]
) -> Any:
    """The coordinator names the next CKKS global: ``base`` plus the encrypted ``aggregate``.

    ``parts`` are the silos whose ciphertexts it claims to have summed (the new pointer lists them).
    ADAPT: today's pointer is ``{"round", "base", "aggregate"}``; the new one adds the parts and is signed.
    """
    from silotune import protection as prot
    from silotune.federation import ObjectRef
    from silotune.store import FederationLayout, sha256

    lay = FederationLayout(config.federation_id)
    agg_key = lay.aggregate(round_next - 1) + ".attack"
    store.put(agg_key, aggregate)
    pointer = prot.ckks_pointer(round_next, base.model_dump(), {"key": agg_key, "sha256": sha256(aggregate)})
    key = lay.global_pointer(round_next).removesuffix(".json") + ".attack.json"
    store.put(key, pointer)
    return ObjectRef(key=key, sha256=sha256(pointer))


def read_published(config: Any, store: Any, prefix: str) -> dict[str, bytes]:
    """What a consumer of the federation gets as its final adapter, from the prefix the flow returned.

    ADAPT: the new code reads only the designated publisher's slot and verifies it; use its reader.
    """
    mod = _optional("silotune.publish")
    for name in ("read_published", "load_published"):
        if mod is not None and hasattr(mod, name):
            return getattr(mod, name)(config, store)
    return {k.removeprefix(prefix): store.get(k) for k in store.list(prefix)}


# -- privacy ledger (ADAPT to silotune.privacy.ledger) ----------------------------------------------------


def silo_epsilon(config: Any, silo: str) -> tuple[float, int]:
    """The silo's ε in ``config``'s federation as its private ledger records it, and the number of rounds."""
    from silotune import protection as prot
    from silotune.keys import SiloVault

    dp = config.privacy.sample_dp
    vault = SiloVault.for_silo(config.silo(silo))
    doc = vault.read_ledger(config.federation_id)
    rounds = doc.get("rounds", {})
    if not rounds:
        return 0.0, 0
    ledger = prot._ledger_of(rounds, silo, config.federation_id, dp.accountant, 10**9)
    return float(ledger.epsilon(dp.delta)), len(rounds)


# -- S3 identities of the stack ---------------------------------------------------------------------------


def s3_actions(silos: Sequence[str], **kwargs: Any) -> dict[str, list[str]]:
    """The SeaweedFS actions the stack grants each identity (``flows.stack``)."""
    stack = importlib.import_module("flows.stack")
    fn = stack._identities
    accepted = set(inspect.signature(fn).parameters)
    return fn(silos, **{k: v for k, v in kwargs.items() if k in accepted})


def s3_allows(actions: Sequence[str], action: str, bucket: str, key: str) -> bool:
    """SeaweedFS semantics: ``Write`` alone is every bucket, ``Write:b`` all of b, ``Write:b/pat`` with ``*``
    matching any characters, ``/`` included."""
    import fnmatch

    target = f"{bucket}/{key}"
    for granted in actions:
        name, _, resource = granted.partition(":")
        if name != action:
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
