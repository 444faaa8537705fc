"""Attacks by a malicious silo.

The silo controls its own engine (so the state and result metadata it reports to the Prefect API), its
S3 identity (what the stack's policies let it write) and its own messages. Each test asserts that the
coordinator executes nothing, reads nothing it should not, and that readers and honest silos ignore
what the silo forged.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
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


# -- (9)-(11) what a silo run hands back ------------------------------------------------------------------
# The coordinator no longer reads Prefect results at all (``flows.runner.read_outcome`` reads the silo's
# signed record in its own results prefix, ``results/<silo>/<fid>/<r>/<stage>.json``, with a 1 MiB limit,
# ``json`` and a pydantic model). So each attack is made on both paths a malicious silo has: the Prefect
# result metadata its engine reports (the path of the baseline), AND a malicious record in its own results
# prefix, signed with its own key (the path the new coordinator actually reads).


def _silo_config(kit: Any, tmp_path: Path, demo_data, fid: str) -> Any:
    return kit.make_config(tmp_path, demo_data, fid)


def _outside(trace: Any, cfg: Any, silo: str, store_root: Path) -> list[str]:
    """Store keys and files the coordinator touched outside ``silo``'s results prefix of this federation
    (the package's own files, Python's and the venv's are not the coordinator reading silo data)."""
    prefix = f"results/{silo}/{cfg.federation_id}/"
    keys = [f"{m} {k}" for m, k in trace.keys if not k.startswith(prefix)]
    root = str(store_root.resolve())
    files = [
        f
        for f in trace.opened
        if not f.startswith((sys.prefix, sys.base_prefix, os.path.dirname(os.__file__)))
        and not (f.startswith(root + "/") and f[len(root) + 1 :].startswith(prefix))
        and not f.endswith((".py", ".pyc", ".so"))
        and "__pycache__" not in f
    ]
    return keys + files


# -- (9) a pickle result -------------------------------------------------------------------------------


class _Marker:
    """Unpickling this creates a file (harmless): proof that the reader executed the silo's code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickle_result_is_not_executed_by_the_coordinator(
    tmp_path: Path, demo_data, kit, coordinator_reads, prefect_results_dir
) -> None:
    """lab's engine reports its silo-round run as Completed with a result record whose metadata names the
    pickle serializer, the record in the results storage; and lab writes a pickle (and the Prefect record
    holding it) as its signed result record in its own results prefix, where the coordinator reads."""
    cfg = _silo_config(kit, tmp_path, demo_data, "adv-pickle")
    store = _store(cfg)
    marker = tmp_path / "EXECUTED-BY-COORDINATOR"
    key = f"adv-pickle-{uuid.uuid4().hex}"
    record, data = kit.result_record(_Marker(marker), storage_key=key, serializer="pickle")
    (prefect_results_dir / key).write_bytes(data)
    state = kit.report_state("silo-round", _completed(record))
    written = kit.silo_writes_result(cfg, store, "lab", 0, "round", pickle.dumps(_Marker(marker)))

    value, trace = coordinator_reads(cfg, "silo-round", "lab", 0, state)
    kit.silo_writes_result(cfg, store, "lab", 0, "round", data)  # the Prefect record itself, pickle inside
    value2, trace2 = coordinator_reads(cfg, "silo-round", "lab", 0, state)

    assert not marker.exists(), (
        f"the coordinator unpickled the silo's result and ran its code: {marker.name} was created "
        f"(read back as {type(value).__name__}, {type(value2).__name__})"
    )
    for v, t in ((value, trace), (value2, trace2)):
        assert not t.unpickled, f"the coordinator unpickled {t.unpickled} from the silo's result"
        assert not t.prefect_reads, f"the coordinator read the silo's Prefect result ({t.prefect_reads})"
        assert not _outside(t, cfg, "lab", Path(cfg.store.root)), (
            f"the coordinator read outside lab's results prefix: {_outside(t, cfg, 'lab', Path(cfg.store.root))}"
        )
        assert any(f.endswith(written) for f in t.opened), f"the trace saw no read of {written}: {t.opened}"
        assert isinstance(v, BaseException), f"the coordinator accepted a pickle result: {v!r}"
        assert "not a valid" in str(v) and written in str(v), f"no clear error for a pickle record: {v}"
    # the run's outcome is a failure at the coordinator, with that error
    from flows.runner import Outcome, wave_outcome

    wave = wave_outcome({"lab": Outcome(state, value)}, 0, evaluate=False)
    assert not wave.updates and [f.silo for f in wave.failures] == ["lab"], wave


# -- (10) an absolute-path result ------------------------------------------------------------------------


def test_absolute_path_result_is_not_read(
    tmp_path: Path, demo_data, kit, coordinator_reads, monkeypatch
) -> None:
    """lab's result metadata names an absolute ``storage_key``: a JSON file on the coordinator's own disk
    (here a stand-in for the stack's S3 credentials file), outside any result store. On the path the
    coordinator reads now, lab's signed round record names that absolute path (with its sha256) as its
    update, the one object the coordinator fetches on a silo's word."""
    from silotune.federation import ObjectRef, SiloRoundResult, UpdateRecord, screen_uploads
    from silotune.store import sha256

    cfg = _silo_config(kit, tmp_path, demo_data, "adv-abspath")
    store = _store(cfg)
    secret = tmp_path / "coordinator-only" / "credentials.json"
    secret.parent.mkdir()
    secret.write_text('{"coordinator": {"secret_key": "COORDINATOR-SECRET-42"}}')
    record, _ = kit.result_record({"silo": "lab"}, storage_key=str(secret), serializer="json")
    state = kit.report_state("silo-round", _completed(record))
    run_id = str(state.state_details.flow_run_id)
    forged = SiloRoundResult(
        silo="lab",
        round=0,
        run_id=run_id,
        update=UpdateRecord(
            silo="lab",
            round=0,
            update=ObjectRef(key=str(secret), sha256=sha256(secret.read_bytes())),
            num_examples=1,
            train={},
        ),
    )
    kit.silo_writes_result(cfg, store, "lab", 0, "round", forged.model_dump_json().encode())

    value, trace = coordinator_reads(cfg, "silo-round", "lab", 0, state)
    with kit.traced() as later:  # what the coordinator does with it: screen the round's uploads
        from flows.runner import Outcome, wave_outcome

        wave = wave_outcome({"lab": Outcome(state, value)}, 0, evaluate=False)
        valid, excluded = screen_uploads(cfg, store, 0, wave.updates)

    assert "COORDINATOR-SECRET-42" not in repr(value) + repr(valid), (
        f"the coordinator read {secret} (a file outside the result store) as the silo's result: {value!r}"
    )
    rkey = kit.result_key(cfg, "lab", 0, "round")
    assert any(f.endswith(rkey) for f in trace.opened), f"the trace saw no read of {rkey}: {trace.opened}"
    opened = [f for t in (trace, later) for f in t.opened if Path(f).resolve() == secret.resolve()]
    assert not opened, f"the coordinator opened {secret}: {opened}"
    assert not trace.prefect_reads, f"the coordinator read the silo's Prefect result ({trace.prefect_reads})"
    assert not _outside(trace, cfg, "lab", Path(cfg.store.root)), _outside(
        trace, cfg, "lab", Path(cfg.store.root)
    )
    assert "lab" not in valid and "slot" in excluded.get("lab", ""), (
        f"an update at an absolute path should be refused as not lab's slot: valid={sorted(valid)}, "
        f"excluded={excluded}"
    )


# -- (11) an oversized result ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["just-over-the-limit", "64MiB"])
def test_oversized_result_is_refused_without_reading_it(
    tmp_path: Path, demo_data, kit, coordinator_reads, prefect_results_dir, size
) -> None:
    """lab reports a (valid, JSON) result of 64 MiB: as a Prefect result record, and as its signed record
    in its own results prefix (where the coordinator reads, with a 1 MiB limit). ``just-over-the-limit``:
    a record one byte over ``silotune.results.MAX_RESULT_BYTES``."""
    from silotune.results import MAX_RESULT_BYTES

    cfg = _silo_config(kit, tmp_path, demo_data, f"adv-big-{size[:4].lower()}")
    store = _store(cfg)
    total = kit.OVERSIZE if size == "64MiB" else MAX_RESULT_BYTES + 1
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
    # lab's own record: a valid SiloRoundResult padded with whitespace to ``total`` bytes, signed
    body = json.dumps({"silo": "lab", "round": 0, "run_id": str(state.state_details.flow_run_id)}).encode()
    rkey = kit.result_key(cfg, "lab", 0, "round")
    (Path(cfg.store.root) / rkey).parent.mkdir(parents=True, exist_ok=True)
    with (Path(cfg.store.root) / rkey).open("wb") as f:
        f.write(body[:-1])
        pad = b" " * 2**20
        left = total - len(body)
        while left > 0:
            f.write(pad[: min(left, len(pad))])
            left -= min(left, len(pad))
        f.write(body[-1:])
    big = (Path(cfg.store.root) / rkey).stat().st_size
    assert big == total
    sig = kit.silo_keypair(cfg, "lab").sign(
        (Path(cfg.store.root) / rkey).read_bytes(),
        federation_id=cfg.federation_id,
        round=0,
        silo="lab",
        purpose="result",
    )
    store.put(rkey + ".sig", sig)

    tracemalloc.start()
    try:
        value, trace = coordinator_reads(cfg, "silo-round", "lab", 0, state)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    got = len(value) if isinstance(value, str) else None
    if size == "64MiB":
        assert peak < big // 4, (
            f"the coordinator read a {big / 2**20:.0f} MiB silo result into memory "
            f"(peak {peak / 2**20:.0f} MiB traced; returned {type(value).__name__}"
            + (f" of {got / 2**20:.0f} MiB)" if got else ")")
        )
    assert not trace.prefect_reads, f"the coordinator read the silo's Prefect result ({trace.prefect_reads})"
    assert isinstance(value, BaseException) and any(
        w in str(value).lower() for w in ("size", "large", "limit")
    ), f"an oversized result should be refused with a clear error, got {type(value).__name__}: {value}"


# -- (12) an overwritten final adapter -----------------------------------------------------------------


def _forged(name: str, data: bytes) -> bytes:
    """The same adapter files with every LoRA B tensor shifted: what lab wants people to deploy."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    if not name.endswith(".safetensors"):
        return data
    return st_save({k: v + 1.0 if "lora_B" in k else v for k, v in st_load(data).items()})


def test_overwritten_final_adapter_is_ignored(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, captured, prefect_records
) -> None:
    """CKKS: clinic (the designated publisher) publishes the final adapter; then lab, not the publisher,
    writes its own (forged) adapter over every final prefix its S3 identity lets it write: under the new
    layout, ``published/lab/<fid>/final/`` (its own prefix); ``published/clinic/…`` and
    ``federations/<fid>/final/`` only if the stack's grants allowed it (they are checked, and each
    refusal is recorded). Readers, and the coordinator's check of the prefix a publisher reports
    (``tasks.runtime.published_location``), take only the designated publisher's prefix."""
    from flows.silo import silo_round
    from ops.state import DATA_BUCKET
    from silotune.federation import aggregate_round, start_federation
    from silotune.store import FederationLayout
    from tasks.runtime import published_location

    cfg = kit.make_config(tmp_path, demo_data, "adv-final", protection="ckks", signing=True, rounds=1)
    kit.setup_keys(cfg)
    for s in cfg.silos:
        silo_policy(cfg, s.name)
        silo_accepts(cfg, s.name)
    store, lay = _store(cfg), FederationLayout(cfg.federation_id)
    g0 = start_federation(cfg, store, tiny_adapter).global_ref
    runs = {s.name: silo_round(cfg, s.name, 0, g0, evaluate=False, return_state=True) for s in cfg.silos}
    for r in runs.values():
        _control(kit, r, "an encrypted upload")
    agg = aggregate_round(cfg, store, 0, g0, [kit.update_record(cfg, s, 0, r) for s, r in runs.items()])
    assert cfg.ckks_publisher == "clinic"
    pub = _step(cfg, "clinic", "publish", 1, agg.next_global)
    _control(kit, pub, "clinic's publication")
    reported = kit.outcome(cfg, "silo-step", "clinic", 1, pub, stage="publish")
    assert not isinstance(reported, BaseException), reported
    prefix = reported.objects[0]
    published_location(cfg, prefix)  # the coordinator accepts clinic's prefix
    honest = kit.read_published(cfg, store)
    assert honest, f"nothing was published under {prefix}"

    lab_may = kit.s3_actions([s.name for s in cfg.silos])["silo-lab"]
    written, refused = [], []
    for silo in ("clinic", "lab"):
        for p in kit.final_prefixes(cfg, silo):
            for name, data in honest.items():
                if kit.s3_allows(lab_may, "Write", DATA_BUCKET, p + name):
                    store.put(p + name, _forged(name, data))
                    written.append(p + name)
                else:
                    refused.append(p + name)

    got = kit.read_published(cfg, store)
    changed = sorted(n for n in honest if got.get(n) != honest[n])
    assert not changed, (
        f"lab (not the publisher) overwrote the published adapter under {prefix} and readers take its "
        f"files: {changed} (lab could write {written})"
    )
    assert all(k.startswith(lay.published("lab", "")) for k in written), (
        f"lab's identity may write no final prefix but its own published/ one: wrote {written}, refused {refused}"
    )
    with pytest.raises(ValueError, match="published prefix"):  # lab reporting its own prefix as the final
        published_location(cfg, lay.published("lab", ""))
    deltas = captured.tensors()
    assert len(captured.deltas()) == 2, "both silos' training should have been captured"
    leaks = kit.plaintext_leaks(deltas, Path(cfg.store.root), *prefect_records)
    assert not leaks, f"a silo's plaintext update is in {kit.describe(leaks, Path(cfg.store.root))}"


def test_non_publisher_silo_cannot_write_the_final_adapter(kit) -> None:
    """The stack's S3 identities (SeaweedFS: ``*`` crosses ``/``): may lab write the final adapter?"""
    from ops.state import DATA_BUCKET

    actions = kit.s3_actions(["clinic", "lab"])
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
    own keys (signed with lab's key: it cannot sign as clinic); bank then shares its keys, encrypting
    clinic's shares to whatever clinic's advert says.

    On the stack lab's S3 identity may not write ``messages/clinic/`` at all (see
    ``test_silo_s3_identity_cannot_write_another_partys_objects[clinic-advert]``); here the store lets it,
    as a storage operator colluding with lab would, so the silos' own check is what is tested."""
    from silotune.crypto.secagg import SecAggClient, SecAggParams

    cfg = _secagg_config(kit, tmp_path, demo_data, "adv-impostor", silo_policy, silo_accepts)
    store = _store(cfg)
    for s in cfg.silos:
        _control(kit, _step(cfg, s.name, "secagg-advertise", 0), f"{s.name}'s advert")
    params = SecAggParams(max_dropout_fraction=cfg.security.secagg_max_dropout)
    roster = [s.name for s in cfg.silos]
    impostor = SecAggClient("clinic", round_id=f"{cfg.federation_id}/0", params=params, roster=roster)
    advert = impostor.advertise()
    sig = kit.silo_keypair(cfg, "lab").sign(
        advert, federation_id=cfg.federation_id, round=0, silo="clinic", purpose="advert"
    )
    replaced = [k for k in kit.advert_keys(cfg, "clinic", 0) if store.exists(k)]
    assert replaced, "clinic's advert is not where the suite expects it (silotune.store.FederationLayout)"
    for key in replaced:
        store.put(key, advert)
        store.put(key + ".sig", sig)

    run = _step(cfg, "bank", "secagg-share", 0)

    share = next((store.get(k) for k in kit.share_keys(cfg, "bank", "clinic", 0) if store.exists(k)), None)
    opened = None
    if share is not None:
        try:
            impostor.share_keys(_adverts(kit, cfg, store, roster))
            opened = impostor._open_shares({"bank": share})
        except Exception:
            opened = None
    assert opened is None, (
        f"bank accepted lab's advert in clinic's name ({replaced}; run {run.type.name}) and encrypted "
        "clinic's shares of its secrets to lab's key: lab opened them"
    )
    assert not run.is_completed() and "clinic" in kit.run_error(run), (
        f"bank should refuse the round, naming clinic's advert: {run.type.name} {kit.run_error(run)!r}"
    )


def test_advert_injected_through_the_s3_wildcard_is_refused(
    tmp_path: Path, demo_data, kit, silo_policy, silo_accepts
) -> None:
    """On main before the fix lab's S3 identity could write ``*/secagg/adverts/lab``, and ``*`` crosses
    ``/``: it wrote an advert for a made-up silo ``mallory/secagg/adverts/lab`` that the honest silos'
    listing of adverts picked up. Under the new layout lab may write ``messages/lab/*`` (``*`` still
    crosses ``/``): it writes a made-up silo's advert under its own prefix
    (``messages/lab/mallory/<fid>/<r>/secagg/advert``), and tries the legacy key and mallory's own
    ``messages/mallory/…`` slot (written here as if the store let it)."""
    from ops.state import DATA_BUCKET
    from silotune.crypto.secagg import SecAggClient, SecAggParams
    from silotune.crypto.signing import SiloKeyPair

    cfg = _secagg_config(kit, tmp_path, demo_data, "adv-wildcard", silo_policy, silo_accepts)
    store = _store(cfg)
    fid = cfg.federation_id
    legacy_name = "mallory/secagg/adverts/lab"
    attempts = {  # key -> the silo name the advert carries
        f"federations/{fid}/rounds/00000/secagg/adverts/{legacy_name}": legacy_name,
        f"messages/mallory/{fid}/00000/secagg/advert": "mallory",
        f"messages/lab/mallory/{fid}/00000/secagg/advert": "mallory",
        f"messages/lab/{fid}/00000/secagg/adverts/mallory": "mallory",
    }
    lab_may = kit.s3_actions([s.name for s in cfg.silos])["silo-lab"]
    may_write = {k: kit.s3_allows(lab_may, "Write", DATA_BUCKET, k) for k in attempts}
    for s in cfg.silos:
        _control(kit, _step(cfg, s.name, "secagg-advertise", 0), f"{s.name}'s advert")
    params = SecAggParams(max_dropout_fraction=cfg.security.secagg_max_dropout)
    mallory_key = SiloKeyPair.generate()
    for key, name in attempts.items():
        roster = [s.name for s in cfg.silos] + [name]
        advert = SecAggClient(name, round_id=f"{fid}/0", params=params, roster=roster).advertise()
        sig = mallory_key.sign(advert, federation_id=fid, round=0, silo=name, purpose="advert")
        store.put(key, advert)
        store.put(key + ".sig", sig)

    runs = {s: _step(cfg, s, "secagg-share", 0) for s in ("clinic", "bank")}

    to_fake = sorted(
        k
        for s in runs
        for name in set(attempts.values())
        for k in kit.share_keys(cfg, s, name, 0)
        if store.exists(k)
    )
    legacy_ok = (
        not may_write[next(iter(attempts))] and not may_write[f"messages/mallory/{fid}/00000/secagg/advert"]
    )
    assert legacy_ok and not to_fake, (
        f"silo-lab's S3 identity may write {sorted(k for k, v in may_write.items() if v)} and the honest "
        f"silos shared their keys with a made-up silo "
        f"({', '.join(f'{s}: {r.type.name}' for s, r in runs.items())}): {to_fake}"
    )
    for s, r in runs.items():  # the made-up silo is ignored, the round goes on
        _control(kit, r, f"{s}'s shares")


@pytest.mark.parametrize(
    "bucket_key",
    [
        ("results", "0f3c2d8e6a1b4c5d9e7f8a9b0c1d2e3f"),
        ("data", "results/clinic/fed/00000/round.json"),
        ("data", "messages/clinic/fed/00000/secagg/advert"),
        ("data", "messages/clinic/fed/00000/secagg/unmask"),
        ("data", "updates/clinic/fed/00000/update.masked"),
        ("data", "published/clinic/fed/final/adapter_model.safetensors"),
        ("data", "federations/fed/rounds/00000/secagg/survivors.json"),
        ("data", "federations/fed/rounds/00001/global.safetensors"),
        ("data", "federations/fed/rounds/00000/secagg/unmask/clinic/secagg/unmask/lab"),
    ],
    ids=[
        "prefect-result-of-anyone",
        "clinic-result-record",
        "clinic-advert",
        "clinic-unmask-answer",
        "clinic-update",
        "clinic-published-final",
        "coordinator-survivors",
        "coordinator-global",
        "unmask-answer-via-wildcard",
    ],
)
def test_silo_s3_identity_cannot_write_another_partys_objects(kit, bucket_key) -> None:
    """What lab's S3 identity may write: never an object another party (silo or coordinator) is read as."""
    from ops.state import DATA_BUCKET, RESULTS_BUCKET

    bucket, key = bucket_key
    name = {"results": RESULTS_BUCKET, "data": DATA_BUCKET}[bucket]
    actions = kit.s3_actions(["clinic", "lab"])["silo-lab"]
    assert not kit.s3_allows(actions, "Write", name, key), f"silo-lab may write {name}/{key}: {actions}"


@pytest.mark.parametrize(
    "key",
    [
        "updates/clinic/fed/00000/update.safetensors",
        "updates/clinic/fed/00000/update.masked",
        "results/clinic/fed/00000/round.json",
    ],
    ids=["clinic-plaintext-update", "clinic-masked-update", "clinic-result-record"],
)
def test_silo_s3_identity_cannot_read_another_silos_update(kit, key) -> None:
    """What lab's S3 identity may read of clinic's: not its (plaintext or masked) update, nor its records."""
    from ops.state import DATA_BUCKET

    actions = kit.s3_actions(["clinic", "lab"])["silo-lab"]
    assert not kit.s3_allows(actions, "Read", DATA_BUCKET, key), f"silo-lab may read {key}: {actions}"
