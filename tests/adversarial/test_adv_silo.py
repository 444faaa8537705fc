"""Attacks by a malicious silo.

The silo controls its own engine (so the state and result metadata it reports to the Prefect API), its
S3 identity (what the stack's policies let it write) and its own messages. Each test asserts that the
coordinator executes nothing, reads nothing it should not, and that readers and honest silos ignore
what the silo forged.
"""

from __future__ import annotations

import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


def _store(cfg: Any) -> Any:
    from silotune.store import LocalStore

    return LocalStore(cfg.store.root)


def _step(cfg: Any, silo: str, stage: str, round_: int, ref: Any = None) -> Any:
    from flows.silo import silo_step

    return silo_step(cfg, silo, stage, round_, ref, None, return_state=True)


def _control(kit: Any, state: Any, what: str) -> None:
    assert state.is_completed(), f"control: {what} was refused: {kit.run_error(state)}"


def _completed(record: Any) -> Any:
    from prefect.states import Completed

    return Completed(data=record)


# -- (9) a pickle result -------------------------------------------------------------------------------


class _Marker:
    """Unpickling this creates a file (harmless): proof that the reader executed the silo's code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickle_result_is_not_executed_by_the_coordinator(
    tmp_path: Path, kit, coordinator_reads, prefect_results_dir
) -> None:
    """The silo's engine reports its silo-round run as Completed with a result record whose metadata names
    the pickle serializer, and writes the record into the results storage its identity may write."""
    marker = tmp_path / "EXECUTED-BY-COORDINATOR"
    key = f"adv-pickle-{uuid.uuid4().hex}"
    record, data = kit.result_record(_Marker(marker), storage_key=key, serializer="pickle")
    (prefect_results_dir / key).write_bytes(data)
    state = kit.report_state("silo-round", _completed(record))

    value = coordinator_reads(state)

    assert not marker.exists(), (
        f"the coordinator unpickled the silo's result and ran its code: {marker.name} was created "
        f"(read back as {type(value).__name__})"
    )
    assert isinstance(value, BaseException), f"the coordinator accepted a pickle result: {value!r}"


# -- (10) an absolute-path result ------------------------------------------------------------------------


def test_absolute_path_result_is_not_read(tmp_path: Path, kit, coordinator_reads) -> None:
    """The silo's result metadata names an absolute ``storage_key``: a JSON file on the coordinator's own
    disk (here a stand-in for the stack's S3 credentials file), outside any result store."""
    secret = tmp_path / "coordinator-only" / "credentials.json"
    secret.parent.mkdir()
    secret.write_text('{"coordinator": {"secret_key": "COORDINATOR-SECRET-42"}}')
    record, _ = kit.result_record({"silo": "lab"}, storage_key=str(secret), serializer="json")
    state = kit.report_state("silo-step", _completed(record))

    value = coordinator_reads(state)

    assert "COORDINATOR-SECRET-42" not in repr(value), (
        f"the coordinator read {secret} (a file outside the result store) as the silo's result: {value!r}"
    )
    assert isinstance(value, BaseException), f"the coordinator accepted an absolute-path result: {value!r}"


# -- (11) an oversized result ----------------------------------------------------------------------------


def test_oversized_result_is_refused_without_reading_it(
    tmp_path: Path, kit, coordinator_reads, prefect_results_dir
) -> None:
    """The silo reports a (valid, JSON) result of 64 MiB."""
    key = f"adv-big-{uuid.uuid4().hex}"
    _, data = kit.result_record("PLACEHOLDER", storage_key=key, serializer="json")
    head, tail = data.split(b"PLACEHOLDER")
    path = prefect_results_dir / key
    with path.open("wb") as f:
        f.write(head)
        chunk = b"x" * 2**20
        for _ in range(kit.OVERSIZE // len(chunk)):
            f.write(chunk)
        f.write(tail)
    record, _ = kit.result_record("PLACEHOLDER", storage_key=key, serializer="json")
    state = kit.report_state("silo-round", _completed(record))
    size = path.stat().st_size

    tracemalloc.start()
    try:
        value = coordinator_reads(state)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    got = len(value) if isinstance(value, str) else None
    assert peak < size // 4, (
        f"the coordinator read a {size / 2**20:.0f} MiB silo result into memory "
        f"(peak {peak / 2**20:.0f} MiB traced; returned {type(value).__name__}"
        + (f" of {got / 2**20:.0f} MiB)" if got else ")")
    )
    assert isinstance(value, BaseException) and any(
        w in str(value).lower() for w in ("size", "large", "limit")
    ), f"an oversized result should be refused with a clear error, got {type(value).__name__}"


# -- (12) an overwritten final adapter -----------------------------------------------------------------


def _forged(name: str, data: bytes) -> bytes:
    """The same adapter files with every LoRA B tensor shifted: what lab wants people to deploy."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    if not name.endswith(".safetensors"):
        return data
    return st_save({k: v + 1.0 if "lora_B" in k else v for k, v in st_load(data).items()})


def test_overwritten_final_adapter_is_ignored(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts
) -> None:
    """CKKS: clinic (the designated publisher) publishes the final adapter; then lab, not the publisher,
    writes its own adapter over ``federations/<fid>/final/`` (and under the new ``published/`` prefixes)."""
    from flows.silo import silo_round
    from silotune.federation import aggregate_round, start_federation

    cfg = kit.make_config(tmp_path, demo_data, "adv-final", protection="ckks", signing=True, rounds=1)
    kit.setup_keys(cfg)
    for s in cfg.silos:
        silo_policy(cfg, s.name)
        silo_accepts(cfg, s.name)
    store = _store(cfg)
    g0 = start_federation(cfg, store, tiny_adapter).global_ref
    runs = [silo_round(cfg, s.name, 0, g0, evaluate=False, return_state=True) for s in cfg.silos]
    for r in runs:
        _control(kit, r, "an encrypted upload")
    agg = aggregate_round(cfg, store, 0, g0, [r.result().update for r in runs])
    pub = _step(cfg, "clinic", "publish", 1, agg.next_global)
    _control(kit, pub, "clinic's publication")
    where = str(pub.result())
    prefix = next(where[where.index(m) :] for m in ("published/", "federations/") if m in where)
    honest = kit.read_published(cfg, store, prefix)
    assert honest, f"nothing was published under {prefix}"

    for silo in ("clinic", "lab"):
        for p in kit.final_prefixes(cfg, silo):
            for name, data in honest.items():
                store.put(p + name, _forged(name, data))

    got = kit.read_published(cfg, store, prefix)
    changed = sorted(n for n in honest if got.get(n) != honest[n])
    assert not changed, (
        f"lab (not the publisher) overwrote the published adapter under {prefix} and readers take its "
        f"files: {changed}"
    )


def test_non_publisher_silo_cannot_write_the_final_adapter(kit) -> None:
    """The stack's S3 identities (SeaweedFS: ``*`` crosses ``/``): may lab write the final adapter?"""
    from flows.stack import DATA_BUCKET

    actions = kit.s3_actions(["clinic", "lab"], publisher="clinic")
    keys = [
        "federations/fed/final/adapter_model.safetensors",
        "published/clinic/fed/final/adapter_model.safetensors",
    ]
    allowed = [k for k in keys if kit.s3_allows(actions["silo-lab"], "Write", DATA_BUCKET, k)]
    assert not allowed, f"silo-lab's S3 identity may write the final adapter: {allowed}"


# -- (13) fake adverts in another silo's name -------------------------------------------------------------


def _adverts(kit: Any, cfg: Any, store: Any, names: list[str]) -> dict[str, bytes]:
    out = {}
    for n in names:
        for key in kit.advert_keys(cfg, n, 0):
            if store.exists(key):
                out[n] = store.get(key)
                break
    return out


def _secagg_config(kit: Any, tmp_path: Path, demo_data, fid: str, policy, accepts) -> Any:
    cfg = kit.make_config(
        tmp_path, demo_data, fid, silos=("clinic", "bank", "lab"), protection="secagg", signing=True
    )
    kit.setup_keys(cfg)
    for s in cfg.silos:
        policy(cfg, s.name)
        accepts(cfg, s.name)
    return cfg


def test_advert_in_another_silos_name_is_refused(
    tmp_path: Path, demo_data, kit, silo_policy, silo_accepts
) -> None:
    """After everyone advertised, lab replaces clinic's advert with one carrying clinic's name and lab's
    own keys; bank then shares its keys, encrypting clinic's shares to whatever clinic's advert says."""
    from silotune.crypto.secagg import SecAggClient, SecAggParams

    cfg = _secagg_config(kit, tmp_path, demo_data, "adv-impostor", silo_policy, silo_accepts)
    store = _store(cfg)
    for s in cfg.silos:
        _control(kit, _step(cfg, s.name, "secagg-advertise", 0), f"{s.name}'s advert")
    params = SecAggParams(max_dropout_fraction=cfg.security.secagg_max_dropout)
    impostor = SecAggClient("clinic", round_id=f"{cfg.federation_id}/0", params=params)
    replaced = [k for k in kit.advert_keys(cfg, "clinic", 0) if store.exists(k)]
    for key in replaced:
        store.put(key, impostor.advertise())

    run = _step(cfg, "bank", "secagg-share", 0)

    share = next((store.get(k) for k in kit.share_keys(cfg, "bank", "clinic", 0) if store.exists(k)), None)
    opened = None
    if share is not None:
        try:
            impostor.share_keys(_adverts(kit, cfg, store, [s.name for s in cfg.silos]))
            opened = impostor._open_shares({"bank": share})
        except Exception:
            opened = None
    assert opened is None, (
        f"bank accepted lab's advert in clinic's name ({replaced}; run {run.type.name}) and encrypted "
        "clinic's shares of its secrets to lab's key: lab opened them"
    )


def test_advert_injected_through_the_s3_wildcard_is_refused(
    tmp_path: Path, demo_data, kit, silo_policy, silo_accepts
) -> None:
    """lab's S3 identity may write ``*/secagg/adverts/lab``, and ``*`` crosses ``/``: it writes an advert for
    a made-up silo ``mallory/secagg/adverts/lab`` that the honest silos' listing of adverts picks up."""
    from flows.stack import DATA_BUCKET
    from silotune.crypto.secagg import SecAggClient, SecAggParams

    cfg = _secagg_config(kit, tmp_path, demo_data, "adv-wildcard", silo_policy, silo_accepts)
    store = _store(cfg)
    fake = "mallory/secagg/adverts/lab"
    key = f"federations/{cfg.federation_id}/rounds/00000/secagg/adverts/{fake}"
    may_write = kit.s3_allows(
        kit.s3_actions([s.name for s in cfg.silos])["silo-lab"], "Write", DATA_BUCKET, key
    )
    for s in cfg.silos:
        _control(kit, _step(cfg, s.name, "secagg-advertise", 0), f"{s.name}'s advert")
    params = SecAggParams(max_dropout_fraction=cfg.security.secagg_max_dropout)
    store.put(key, SecAggClient(fake, round_id=f"{cfg.federation_id}/0", params=params).advertise())

    runs = {s: _step(cfg, s, "secagg-share", 0) for s in ("clinic", "bank")}

    to_fake = sorted(k for s in runs for k in kit.share_keys(cfg, s, fake, 0) if store.exists(k))
    assert not may_write and not to_fake, (
        f"silo-lab's S3 identity may write {key} ({may_write}) and the honest silos shared their keys with "
        f"the made-up silo {fake!r} ({', '.join(f'{s}: {r.type.name}' for s, r in runs.items())}): {to_fake}"
    )


@pytest.mark.parametrize(
    "bucket_key",
    [
        ("results", "0f3c2d8e6a1b4c5d9e7f8a9b0c1d2e3f"),
        ("data", "results/clinic/fed/00000/round.json"),
        ("data", "messages/clinic/fed/00000/secagg/advert"),
        ("data", "federations/fed/rounds/00000/secagg/survivors.json"),
        ("data", "federations/fed/rounds/00000/secagg/unmask/clinic/secagg/unmask/lab"),
    ],
    ids=[
        "prefect-result-of-anyone",
        "clinic-result-record",
        "clinic-advert",
        "coordinator-survivors",
        "unmask-answer-via-wildcard",
    ],
)
def test_silo_s3_identity_cannot_write_another_partys_objects(kit, bucket_key) -> None:
    """What lab's S3 identity may write: never an object another party (silo or coordinator) is read as."""
    from flows.stack import DATA_BUCKET, RESULTS_BUCKET

    bucket, key = bucket_key
    name = {"results": RESULTS_BUCKET, "data": DATA_BUCKET}[bucket]
    actions = kit.s3_actions(["clinic", "lab"], publisher="clinic")["silo-lab"]
    assert not kit.s3_allows(actions, "Write", name, key), f"silo-lab may write {name}/{key}: {actions}"
