"""Attacks by a malicious coordinator (or anyone who can create runs on a silo's pool, or runs the store).

The attacker may send any config, run, pointer or object; it holds the coordinator's keys but cannot
break the cryptography. Each test runs the attack through the silo's own flows (``flows.silo``) and
asserts the defence: the silo refuses, nothing private leaves it.

Every silo here enforces its own policy (``silo_policy``: a ``silotune.policy.SiloPolicy`` registered
with ``tasks.runtime.register_silo_policy``) and accepted the honest config (``silo_accepts``); every
config pins the silos' and the coordinator's keys (``silotune.keys.pin_local_keys``). The attacker holds
the coordinator's signing key, so whatever it forges (globals, survivor sets, CKKS pointers) it signs.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]

DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3}


def _store(cfg: Any) -> Any:
    from silotune.store import LocalStore

    return LocalStore(cfg.store.root)


def _start(cfg: Any, adapter: Any) -> Any:
    """The coordinator writes the initial global (its own code, so whatever config it chose)."""
    from silotune.federation import start_federation

    return start_federation(cfg, _store(cfg), adapter)


def _train(cfg: Any, silo: str, round_: int, ref: Any) -> Any:
    from flows.silo import silo_round

    return silo_round(cfg, silo, round_, ref, evaluate=False, return_state=True)


def _step(cfg: Any, silo: str, stage: str, round_: int, ref: Any = None) -> Any:
    from flows.silo import silo_step

    return silo_step(cfg, silo, stage, round_, ref, None, return_state=True)


def _control(kit: Any, state: Any, what: str) -> None:
    """An honest step of the protocol must still work (guards against a defence that refuses everything)."""
    assert state.is_completed(), f"control: {what} was refused: {kit.run_error(state)}"


# -- (1) weakened config ----------------------------------------------------------------------------


def test_weakened_config_is_refused_and_nothing_is_uploaded(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, captured, prefect_records
) -> None:
    """The silo's policy requires secure aggregation, signing and DP-SGD; the coordinator's run carries the
    federation config with ``security.protection: none``, no signing and DP dropped."""
    honest = kit.make_config(tmp_path, demo_data, "adv-weak", protection="secagg", signing=True, sample_dp=DP)
    kit.setup_keys(honest)
    silo_policy(honest, "clinic", min_protection="secagg", require_signing=True, require_sample_dp=True)
    silo_accepts(honest, "clinic")
    weak = kit.with_changes(
        honest, **{"security.protection": "none", "security.signing": False, "privacy.sample_dp": None}
    )
    store_root = Path(weak.store.root)
    ref = _start(weak, tiny_adapter).global_ref
    before = kit.files_under(store_root, *prefect_records)

    run = _train(weak, "clinic", 0, ref)

    leaks = kit.plaintext_leaks(captured.tensors("clinic"), store_root, *prefect_records)
    written = kit.new_files(before, store_root)
    assert not kit.completed_with_update(weak, "clinic", 0, run) and not leaks, (
        f"clinic's policy requires secagg + signing + DP-SGD, yet it ran the coordinator's config with "
        f"protection 'none' and no DP (run {run.type.name}) and uploaded its plaintext update: "
        f"{kit.describe(leaks, store_root)}"
    )
    assert not [k for k in written if "update" in k or "/results/" in k], (
        f"the refused run still uploaded: {sorted(written)}"
    )
    assert not captured.runs, "the silo trained on its data before refusing the config"
    assert "protection" in kit.run_error(run), f"the refusal should name the field: {kit.run_error(run)!r}"


# -- (2) swapped store ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["folder", "endpoint"])
def test_swapped_store_is_refused(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, captured, where
) -> None:
    """The coordinator points ``config.store`` at a folder (or an S3 endpoint) it controls; everything
    else is as the silo's policy allows (protection none is allowed here, so only the store decides)."""
    from silotune.federation import start_federation
    from silotune.store import LocalStore, open_store

    honest = kit.make_config(tmp_path, demo_data, f"adv-store-{where}")
    silo_policy(honest, "clinic")
    silo_accepts(honest, "clinic")  # the store is not in the fingerprint: only the policy can refuse it
    loot: dict[str, bytes]
    if where == "folder":
        evil = kit.with_changes(honest, store={"kind": "local", "root": str(tmp_path / "attacker")})
        ref = start_federation(evil, LocalStore(evil.store.root), tiny_adapter).global_ref
        before = kit.files_under(tmp_path / "attacker")
        run = _train(evil, "clinic", 0, ref)
        written = kit.new_files(before, tmp_path / "attacker")
        loot = {p: Path(p).read_bytes() for p in written}
    else:
        with kit.FakeS3() as s3, kit.env(ADV_S3_KEY="attacker", ADV_S3_SECRET="attacker-secret"):
            evil = kit.with_changes(
                honest,
                store={
                    "kind": "s3",
                    "endpoint_url": s3.url,
                    "bucket": "loot",
                    "access_key_env": "ADV_S3_KEY",
                    "secret_key_env": "ADV_S3_SECRET",
                },
            )
            ref = start_federation(evil, open_store(evil.store), tiny_adapter).global_ref
            assert s3.objects, "the fake endpoint did not receive the coordinator's global (test setup)"
            before = dict(s3.objects)
            run = _train(evil, "clinic", 0, ref)
            loot = {k: v for k, v in s3.objects.items() if before.get(k) != v}

    leaks = kit.plaintext_leaks(captured.tensors("clinic"), blobs=loot)
    assert not kit.completed_with_update(honest, "clinic", 0, run) and not loot, (
        f"clinic trained under a config whose store is the attacker's {where} (run {run.type.name}) and "
        f"wrote {len(loot)} object(s) there ({sorted(loot)[:3]}); its plaintext update is in: {sorted(leaks)}"
    )
    assert not captured.runs, "the silo trained on its data before refusing the config"
    assert "store" in kit.run_error(run), f"the refusal should name the store: {kit.run_error(run)!r}"
    # the honest config still runs
    _control(kit, _train(honest, "clinic", 0, _start(honest, tiny_adapter).global_ref), "the honest config")


# -- (3) rewound round ----------------------------------------------------------------------------------


@pytest.mark.parametrize("folders", ["silo-folders", "fresh-private-dir-and-data"])
def test_rewound_round_does_not_rewind_the_ledger_or_reuse_noise(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, captured, folders
) -> None:
    """After rounds 1 and 2 the coordinator asks for round 1 again, from a different global (which it
    writes over round 1's global and signs with its key). ``fresh-private-dir-and-data``: the config it
    sends also points clinic's ``private_dir`` at a fresh folder (a fresh ledger and noise secret) and
    its ``train_path`` at another file; both are outside the accepted fingerprint (per-machine fields),
    so only the silo's policy, which replaces them by its own, stands in the way."""
    from silotune.store import FederationLayout, get_tensors

    cfg = kit.make_config(tmp_path, demo_data, f"adv-rewind-{folders[:5]}", sample_dp=DP, rounds=3)
    silo_policy(cfg, "clinic", require_sample_dp=True)
    silo_accepts(cfg, "clinic")
    store, lay = _store(cfg), FederationLayout(cfg.federation_id)
    g0 = _start(cfg, tiny_adapter).global_ref
    first = _train(cfg, "clinic", 0, g0)
    _control(kit, first, "round 1")
    g0_tensors = get_tensors(store, g0.key)
    g1 = kit.coordinator_put_global(cfg, store, lay.global_adapter(1), kit.perturbed(g0_tensors, 1))
    _control(kit, _train(cfg, "clinic", 1, g1), "round 2")
    eps_before, n_before = kit.silo_epsilon(cfg, "clinic")
    assert n_before == 2 and eps_before > 0

    first_upload = store.get(kit.update_record(cfg, "clinic", 0, first).update.key)
    other = kit.coordinator_put_global(cfg, store, lay.global_adapter(0), kit.perturbed(g0_tensors, 2))
    n_runs = len(captured.runs)
    sent, fresh = cfg, tmp_path / "attacker" / "fresh-clinic"
    if folders == "fresh-private-dir-and-data":
        silos = [s.model_dump(mode="json") for s in cfg.silos]
        silos[0].update(private_dir=str(fresh), train_path=str(demo_data["lab"]["train"]))
        sent = kit.with_changes(cfg, silos=silos)
        assert sent.fingerprint() != cfg.fingerprint()  # (the acceptance fingerprint ignores these fields)
    attack = _train(sent, "clinic", 0, other)

    eps_after, n_after = kit.silo_epsilon(cfg, "clinic")
    assert eps_after >= eps_before and n_after >= n_before, (
        f"the coordinator rewound clinic's DP ledger: ε {eps_before:.3f} over {n_before} rounds before, "
        f"{eps_after:.3f} over {n_after} round(s) after re-running round 1 from another global "
        f"(run {attack.type.name}): round 2's entry was deleted"
    )
    if kit.completed_with_update(cfg, "clinic", 0, attack):
        keys = [r["noise_key"] for r in captured.runs]
        assert keys[-1] != keys[0], (
            "round 1 was released twice, from two different globals, with the same DP noise key"
        )
        assert eps_after > eps_before, "a second release of round 1 was not charged to the ledger"
    else:  # refused: before training, and round 1's release stays the one that went out
        assert len(captured.runs) == n_runs, "the silo trained on its data before refusing the rewound round"
        layout = FederationLayout(cfg.federation_id)
        assert store.get(layout.update(0, "clinic")) == first_upload, "round 1's upload was replaced"
        why = kit.run_error(attack)
        assert "ledger" in why, f"the refusal should say the ledger holds round 1 already: {why!r}"
    assert not kit.files_under(fresh), f"the silo wrote into the folder the coordinator chose: {fresh}"


# -- (4) injected roster ------------------------------------------------------------------------------


FAKES = ("mallory1", "mallory2", "mallory3", "mallory4")


def _attacker_rebuilds(kit: Any, cfg: Any, store: Any, fakes: dict[str, Any], victim: str, rid: str) -> str:
    """Evidence only: can the fake silos, holding their shares, rebuild the victim's mask key?"""
    from silotune.crypto import secagg

    adverts = {}
    for name in [s.name for s in cfg.silos if s.name not in fakes] + list(fakes):
        for key in kit.advert_keys(cfg, name, 0):
            if store.exists(key):
                adverts[name] = store.get(key)
                break
    try:
        roster = next(iter(fakes.values())).roster
        index = {n: i + 1 for i, n in enumerate(roster)}
        points = {}
        for name, client in fakes.items():
            client.share_keys(adverts)
            blob = next(store.get(k) for k in kit.share_keys(cfg, victim, name, 0) if store.exists(k))
            points[index[name]] = client._open_shares({victim: blob})[victim][0]
        t = secagg.SecAggParams(max_dropout_fraction=cfg.security.secagg_max_dropout).threshold(len(roster))
        raw = secagg._shamir_combine(dict(list(points.items())[:t]))
        key = secagg.X25519PrivateKey.from_private_bytes(raw)
        ok = secagg._raw_public(key) == secagg.Advert.parse(adverts[victim]).mask_key
        return f"with t={t} of {len(adverts)}, the fakes rebuilt {victim}'s mask key: {ok}"
    except Exception as exc:
        return f"(could not rebuild {victim}'s key: {type(exc).__name__}: {exc})"


@pytest.mark.parametrize("via", ["store", "config"])
def test_injected_roster_is_refused(tmp_path: Path, demo_data, kit, silo_policy, silo_accepts, via) -> None:
    """The coordinator adds four fake silos to the round's roster: their adverts in the store (``store``),
    or also in the config it sends (``config``, each fake with a public key the attacker holds). With 6
    silos t=4, so the fakes would hold t shares of every honest silo's secrets and could unmask each
    update alone. The fakes sign their adverts with their own keys (the attacker made them)."""
    from silotune.crypto.secagg import SecAggClient, SecAggParams
    from silotune.crypto.signing import SiloKeyPair, public_key_hex

    cfg = kit.make_config(tmp_path, demo_data, f"adv-roster-{via}", protection="secagg", signing=True)
    kit.setup_keys(cfg)
    honest = [s.name for s in cfg.silos]
    for s in honest:
        silo_policy(cfg, s)
        silo_accepts(cfg, s)
    fake_keys = {m: SiloKeyPair.generate() for m in FAKES}
    sent = cfg
    if via == "config":
        extra = [
            {
                **cfg.silos[0].model_dump(mode="json"),
                "name": m,
                "private_dir": str(tmp_path / "attacker" / m),
                "public_key": public_key_hex(fake_keys[m].public_key),
            }
            for m in FAKES
        ]
        sent = kit.with_changes(cfg, silos=[*[s.model_dump(mode="json") for s in cfg.silos], *extra])
    store = _store(cfg)
    for s in honest:
        _control(kit, _step(cfg, s, "secagg-advertise", 0), f"{s}'s advert")
    rid = f"{cfg.federation_id}/0"
    params = SecAggParams(max_dropout_fraction=cfg.security.secagg_max_dropout)
    roster = [*honest, *FAKES]
    fakes = {m: SecAggClient(m, round_id=rid, params=params, roster=roster) for m in FAKES}
    for m, client in fakes.items():
        advert = client.advertise()
        sig = fake_keys[m].sign(advert, federation_id=cfg.federation_id, round=0, silo=m, purpose="advert")
        for key in kit.advert_keys(cfg, m, 0):
            store.put(key + ".sig", sig)
            store.put(key, advert)

    runs = {s: _step(sent, s, "secagg-share", 0) for s in honest}

    to_fakes = sorted(
        key for s in honest for m in FAKES for key in kit.share_keys(cfg, s, m, 0) if store.exists(key)
    )
    evidence = _attacker_rebuilds(kit, cfg, store, fakes, "clinic", rid) if to_fakes else ""
    assert not to_fakes, (
        f"honest silos shared their keys with {len(FAKES)} injected silos "
        f"({', '.join(f'{s}: {r.type.name}' for s, r in runs.items())}): {len(to_fakes)} shares, "
        f"e.g. {to_fakes[0]}; {evidence}"
    )
    if via == "store":  # the fakes are ignored; the honest silos still share with each other
        for s, r in runs.items():
            _control(kit, r, f"{s}'s shares")
        peers = [k for s in honest for p in honest if p != s for k in kit.share_keys(cfg, s, p, 0)[:1]]
        assert all(store.exists(k) for k in peers), f"the honest silos did not share with each other: {peers}"
    else:  # a roster the silos never accepted: refused
        for s, r in runs.items():
            assert not r.is_completed(), f"{s} ran the share step under a config with 4 more silos"
            assert "fingerprint" in kit.run_error(r), f"{s}'s refusal: {kit.run_error(r)!r}"


# -- (5) double unmask -----------------------------------------------------------------------------------


@pytest.fixture
def unmask_answers(monkeypatch) -> list[list[str]]:
    """The survivor sets a silo answered an unmask request for (spy on ``SecAggClient.unmask``)."""
    from silotune.crypto.secagg import SecAggClient

    answers: list[list[str]] = []
    real = SecAggClient.unmask

    def spy(self, survivors):
        out = real(self, survivors)
        answers.append(sorted(survivors))
        return out

    monkeypatch.setattr(SecAggClient, "unmask", spy)
    return answers


def _secagg_round_to_unmask(kit: Any, tmp_path: Path, demo_data, tiny_adapter, fid: str, policy, accepts):
    cfg = kit.make_config(
        tmp_path, demo_data, fid, silos=("clinic", "bank", "lab"), protection="secagg", signing=True
    )
    kit.setup_keys(cfg)
    for s in cfg.silos:
        policy(cfg, s.name)
        accepts(cfg, s.name)
    ref = _start(cfg, tiny_adapter).global_ref
    for phase in ("secagg-advertise", "secagg-share"):
        for s in cfg.silos:
            _control(kit, _step(cfg, s.name, phase, 0), f"{s.name}'s {phase}")
    _control(kit, _train(cfg, "clinic", 0, ref), "clinic's masked upload")
    return cfg, _store(cfg)


ALL, DROPPED_BANK = ["bank", "clinic", "lab"], ["clinic", "lab"]


def _no_plaintext(kit: Any, cfg: Any, captured: Any, prefect_records: list[Path], *silos: str) -> None:
    """Nothing of the silos' trained deltas is in the store (every prefix) or Prefect's records."""
    root = Path(cfg.store.root)
    tensors = [t for s in silos for t in captured.tensors(s)]
    assert tensors, f"no training of {silos} was captured"
    leaks = kit.plaintext_leaks(tensors, root, *prefect_records)
    assert not leaks, f"the plaintext update of {silos} is in {kit.describe(leaks, root)}"


def test_second_unmask_with_other_survivors_is_refused(
    tmp_path: Path,
    demo_data,
    tiny_adapter,
    kit,
    silo_policy,
    silo_accepts,
    unmask_answers,
    captured,
    prefect_records,
) -> None:
    """The coordinator asks clinic to unmask for survivors {bank, clinic, lab} (bank's seed share), then
    again for {clinic, lab}: bank 'dropped' (bank's mask-key share). Both answers unmask bank's update.

    One after the other, main before the fix already refuses the second request (the first deletes the
    silo's round state); the overlapping variant below is the one that gets two answers.
    """
    cfg, store = _secagg_round_to_unmask(
        kit, tmp_path, demo_data, tiny_adapter, "adv-unmask-seq", silo_policy, silo_accepts
    )
    kit.publish_survivors(cfg, store, 0, ALL)
    first = _step(cfg, "clinic", "secagg-unmask", 0)
    kit.publish_survivors(cfg, store, 0, DROPPED_BANK)
    second = _step(cfg, "clinic", "secagg-unmask", 0)
    assert len(unmask_answers) <= 1, (
        f"clinic answered two unmask requests with different survivor sets: {unmask_answers} "
        f"(runs {first.type.name}, {second.type.name})"
    )
    _control(kit, first, "the first unmask request")
    assert "already answered" in kit.run_error(second), f"the second request: {kit.run_error(second)!r}"
    _no_plaintext(kit, cfg, captured, prefect_records, "clinic")


def test_concurrent_unmasks_with_other_survivors_answer_once(
    tmp_path: Path,
    demo_data,
    tiny_adapter,
    kit,
    silo_policy,
    silo_accepts,
    unmask_answers,
    monkeypatch,
    captured,
    prefect_records,
) -> None:
    """As above, but the two unmask runs overlap: the second reads the silo's secure-aggregation state
    before the first has used it up (the interleaving is forced at ``SecAggClient.from_state``).

    The fixed silo claims its state under an exclusive lock, so the second run waits for the first
    instead of reading the state alongside it: the test then releases the first run as soon as the
    second one is seen waiting on the lock (or has finished), rather than after a fixed timeout.
    """
    import fcntl
    import types

    import silotune.protection.secagg as secagg_scheme
    from silotune.crypto.secagg import SecAggClient

    cfg, store = _secagg_round_to_unmask(
        kit, tmp_path, demo_data, tiny_adapter, "adv-unmask-par", silo_policy, silo_accepts
    )
    loaded, release, second_stuck = threading.Event(), threading.Event(), threading.Event()
    calls = {"n": 0}
    overlap: list[str] = []  # how the second run met the first: "state", "lock", or "finished" (none)
    real = SecAggClient.from_state.__func__

    def paused(cls, blob):
        client = real(cls, blob)
        calls["n"] += 1
        if calls["n"] == 1:  # the first unmask run: wait (bounded) while the second one runs
            loaded.set()
            release.wait(timeout=60)
        else:  # the second run read the state while the first holds it: the overlap happened
            overlap.append("state")
            second_stuck.set()
        return client

    def flock(fd, op):
        if op & fcntl.LOCK_EX and not op & fcntl.LOCK_NB and loaded.is_set():
            try:
                return fcntl.flock(fd, op | fcntl.LOCK_NB)
            except BlockingIOError:
                overlap.append("lock")
                second_stuck.set()  # the second run waits for the first: release the first
        return fcntl.flock(fd, op)

    monkeypatch.setattr(SecAggClient, "from_state", classmethod(paused))
    lock_spy = types.SimpleNamespace(**{n: getattr(fcntl, n) for n in dir(fcntl) if n.isupper()}, flock=flock)
    monkeypatch.setattr(secagg_scheme, "fcntl", lock_spy, raising=False)
    kit.publish_survivors(cfg, store, 0, ALL)
    states: dict[str, Any] = {}
    first = threading.Thread(
        target=lambda: states.setdefault("first", _step(cfg, "clinic", "secagg-unmask", 0))
    )
    first.start()
    assert loaded.wait(timeout=120), "the first unmask run never loaded the silo's state"
    kit.publish_survivors(cfg, store, 0, DROPPED_BANK)

    def second_run() -> None:
        try:
            states["second"] = _step(cfg, "clinic", "secagg-unmask", 0)
        finally:
            overlap.append("finished")
            second_stuck.set()

    second = threading.Thread(target=second_run)
    second.start()
    second_stuck.wait(timeout=60)
    release.set()
    first.join(timeout=300)
    second.join(timeout=300)
    assert not first.is_alive() and not second.is_alive(), "an unmask run did not finish"
    assert overlap and overlap[0] in ("state", "lock"), (
        f"the two runs did not overlap ({overlap}): the test forced no interleaving"
    )
    assert len(unmask_answers) <= 1, (
        f"clinic answered two overlapping unmask requests with different survivor sets: {unmask_answers} "
        f"(runs {states['first'].type.name}, {states['second'].type.name}): with both, bank's seed and "
        "mask-key shares are out"
    )
    refused = [n for n, st in states.items() if "already answered" in kit.run_error(st)]
    assert len(unmask_answers) == 1 and len(refused) == 1, (
        f"one request should be answered and the other refused: answers {unmask_answers}, "
        f"{ {n: kit.run_error(st) for n, st in states.items()} }"
    )
    _no_plaintext(kit, cfg, captured, prefect_records, "clinic")


# -- (6) replicated CKKS ciphertext -------------------------------------------------------------------


def _published(kit: Any, cfg: Any, store: Any) -> dict[str, bytes]:
    return {
        k: store.get(k) for s in cfg.silos for p in kit.final_prefixes(cfg, s.name) for k in store.list(p)
    }


def _closest(published: dict[str, bytes], target: dict[str, torch.Tensor]) -> float:
    """max over ``target``'s tensors of the smallest max-abs difference to a published tensor of its shape."""
    from safetensors.torch import load as st_load

    tensors = [t for k, b in published.items() if k.endswith(".safetensors") for t in st_load(b).values()]
    worst = 0.0
    for v in target.values():
        diffs = [float((t.double() - v.double()).abs().max()) for t in tensors if t.shape == v.shape]
        worst = max(worst, min(diffs, default=float("inf")))
    return worst


@pytest.mark.parametrize("listing", ["clinic-thrice", "copied-into-peers-slots", "encrypted-zeros-as-peers"])
def test_replicated_ckks_ciphertext_is_not_decrypted_or_published(
    tmp_path: Path,
    demo_data,
    tiny_adapter,
    kit,
    silo_policy,
    silo_accepts,
    captured,
    prefect_records,
    listing,
) -> None:
    """The coordinator sums clinic's ciphertext three times (weight 3 x 1/3 = 1, count 3: every check of
    ``sum_encrypted`` and ``decrypt_update`` passes) and asks bank, the federation's designated CKKS
    publisher, to publish the 'aggregate'.

    The new pointer lists the contributions it summed, so the attacker must name them: clinic's upload
    three times (``clinic-thrice``), or clinic's ciphertext and signature copied into bank's and lab's
    upload slots, listed as theirs (``copied-into-peers-slots``: it runs the store), or, since the
    coordinator's public CKKS context can encrypt, zeros encrypted by the coordinator in bank's and lab's
    slots (``encrypted-zeros-as-peers``: distinct ciphertexts whose sum decrypts to a third of clinic's
    update; only the silos' signatures tell them apart)."""
    from silotune.crypto.ckks import encrypt_update, sum_encrypted
    from silotune.keys import CoordinatorKeys
    from silotune.store import FederationLayout, get_tensors, sha256

    cfg = kit.make_config(
        tmp_path, demo_data, f"adv-ckks-rep-{listing[:6]}", silos=("clinic", "bank", "lab"), protection="ckks"
    )
    cfg = kit.with_changes(cfg, **{"security.publisher": "bank"})  # bank publishes, by the config
    kit.setup_keys(cfg)
    for s in cfg.silos:
        silo_policy(cfg, s.name)
        silo_accepts(cfg, s.name)
    store, lay = _store(cfg), FederationLayout(cfg.federation_id)
    g0 = _start(cfg, tiny_adapter).global_ref
    run = _train(cfg, "clinic", 0, g0)
    _control(kit, run, "clinic's encrypted upload")
    key = kit.update_record(cfg, "clinic", 0, run).update.key
    blob = store.get(key)
    total = sum_encrypted(
        [blob] * 3, CoordinatorKeys.for_config(cfg).ckks_public(), silos=["clinic", "bank", "lab"]
    )
    if listing == "clinic-thrice":
        parts = [("clinic", key, sha256(blob))] * 3
    elif listing == "encrypted-zeros-as-peers":
        public = CoordinatorKeys.for_config(cfg).ckks_public()
        zeros = {k: torch.zeros_like(v) for k, v in captured.deltas("clinic")[0].items()}
        blobs = {"clinic": blob}
        for s in ("bank", "lab"):
            blobs[s] = encrypt_update(zeros, public, weight=1 / 3)
            store.put(lay.update(0, s, "ckks"), blobs[s])
        names = sorted(blobs)
        total = sum_encrypted([blobs[s] for s in names], public, silos=names)
        parts = [(s, lay.update(0, s, "ckks"), sha256(blobs[s])) for s in names]
    else:
        parts = []
        for s in ("clinic", "bank", "lab"):
            slot = lay.update(0, s, "ckks")
            if s != "clinic":
                store.put(slot, blob)
                store.put(slot + ".sig", store.get(key + ".sig"))
            parts.append((s, slot, sha256(blob)))
    ptr = kit.ckks_pointer(cfg, store, round_next=1, base=g0, aggregate=total, contributions=parts)

    pub = _step(cfg, "bank", "publish", 1, ptr)

    published = _published(kit, cfg, store)
    base = get_tensors(store, g0.key)
    leaked = {k: base[k] + v for k, v in captured.deltas("clinic")[0].items() if k in base}
    diff = _closest(published, leaked) if published else float("inf")
    assert not pub.is_completed() and not published, (
        f"bank decrypted an 'aggregate' of clinic's ciphertext x3 and published it ({pub.type.name}, "
        f"{len(published)} file(s)): the published adapter is the initial global + clinic's own update "
        f"(max difference {diff:.2e})"
    )
    why = kit.run_error(pub)
    assert "refuses to decrypt" in why, f"bank's refusal should say what it refused: {why!r}"
    decrypted = [t + base[k] for k, t in captured.deltas("clinic")[0].items() if k in base]
    leaks = kit.plaintext_leaks(
        decrypted + captured.tensors("clinic"), Path(cfg.store.root), *prefect_records
    )
    assert not leaks, f"clinic's update (or g0 + it) is in {kit.describe(leaks, Path(cfg.store.root))}"


PAIRS = {"clinic": ("bank", "lab"), "bank": ("clinic", "lab"), "lab": ("bank", "clinic")}


def test_ckks_subset_pointers_do_not_isolate_one_silos_update(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, captured
) -> None:
    """A variant of (6) that passes every check of a single pointer: after an honest round of three silos
    the coordinator names three different round-1 globals, each the mean of two silos' real, signed,
    current-round uploads (``min_silos`` = 2 distinct contributions, the sum recomputable), and asks a
    different silo to publish each (clinic: bank+lab, bank: clinic+lab, lab: bank+clinic). No silo decrypts
    two pointers of one round, but from the three publications the coordinator solves for each silo's
    update: g0 + c = P(c+l) + P(c+b) - P(b+l). Only the designated publisher (clinic) should publish."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from silotune.crypto.ckks import sum_encrypted
    from silotune.keys import CoordinatorKeys
    from silotune.store import FederationLayout, get_tensors, sha256

    cfg = kit.make_config(
        tmp_path, demo_data, "adv-ckks-subsets", silos=("clinic", "bank", "lab"), protection="ckks", rounds=1
    )
    for s in cfg.silos:
        silo_policy(cfg, s.name)
        silo_accepts(cfg, s.name)
    assert cfg.ckks_publisher == "clinic"
    store, lay = _store(cfg), FederationLayout(cfg.federation_id)
    g0 = _start(cfg, tiny_adapter).global_ref
    records = {}
    for s in cfg.silos:
        run = _train(cfg, s.name, 0, g0)
        _control(kit, run, f"{s.name}'s encrypted upload")
        records[s.name] = kit.update_record(cfg, s.name, 0, run)
    blobs = {s: store.get(r.update.key) for s, r in records.items()}
    public = CoordinatorKeys.for_config(cfg).ckks_public()  # all the coordinator holds

    runs, published = {}, {}
    for publisher, pair in PAIRS.items():
        names = sorted(pair)
        total = sum_encrypted([blobs[s] for s in names], public, silos=names)
        parts = [(s, records[s].update.key, sha256(blobs[s])) for s in names]
        ref = kit.ckks_pointer(
            cfg, store, round_next=1, base=g0, aggregate=total, contributions=parts, tag=f"attack-{publisher}"
        )
        runs[publisher] = _step(cfg, publisher, "publish", 1, ref)
        files = {k: store.get(k) for k in store.list(lay.published(publisher, ""))}
        published[publisher] = next(
            (dict(st_load(b)) for k, b in files.items() if k.endswith(".safetensors")), None
        )

    done = sorted(p for p, r in runs.items() if r.is_completed() and published[p] is not None)
    evidence = ""
    if len(done) == 3:
        keys = published["clinic"].keys()
        solved = {k: published["lab"][k] + published["bank"][k] - published["clinic"][k] for k in keys}
        base = get_tensors(store, g0.key)
        target = {k: base[k] + v for k, v in captured.deltas("clinic")[0].items() if k in base}
        evidence = (
            f"; g0 + clinic's update solved from them to within "
            f"{_closest({'solved.safetensors': st_save(solved)}, target):.2e}"
        )
    assert len(done) < 3, (
        f"three silos each decrypted and published a different two-silo 'aggregate' of round 1 ({done})"
        f"{evidence}"
    )
    for s in ("bank", "lab"):
        assert not (runs[s].is_completed() and published[s] is not None), (
            f"{s}, not the designated publisher, decrypted and published a global: {kit.run_error(runs[s])!r}"
        )


# -- (7) rebased CKKS pointer ------------------------------------------------------------------------


def test_rebased_ckks_pointer_is_refused(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, captured, prefect_records
) -> None:
    """After an honest round 1, the coordinator names round 2's global as (a base of its choosing, round
    1's encrypted mean) instead of (the global the silo trained from, the mean)."""
    from silotune.federation import aggregate_round
    from silotune.store import FederationLayout, get_tensors

    cfg = kit.make_config(tmp_path, demo_data, "adv-ckks-rebase", protection="ckks", signing=True)
    kit.setup_keys(cfg)
    for s in cfg.silos:
        silo_policy(cfg, s.name)
        silo_accepts(cfg, s.name)
    store, lay = _store(cfg), FederationLayout(cfg.federation_id)
    g0 = _start(cfg, tiny_adapter).global_ref
    runs = {s.name: _train(cfg, s.name, 0, g0) for s in cfg.silos}
    for r in runs.values():
        _control(kit, r, "an encrypted upload")
    agg = aggregate_round(cfg, store, 0, g0, [kit.update_record(cfg, s, 0, r) for s, r in runs.items()])
    assert agg.included == ["clinic", "lab"]
    honest = json.loads(store.get(agg.next_global.key))
    chosen = kit.perturbed(get_tensors(store, g0.key), 7, scale=0.5)
    base = kit.coordinator_put_global(cfg, store, f"{lay.prefix}/rounds/00000/rebase.safetensors", chosen)
    parts = [(c["silo"], c["key"], c["sha256"]) for c in honest["contributions"]]
    ptr = kit.ckks_pointer(
        cfg, store, round_next=1, base=base, aggregate=store.get(lay.aggregate(0)), contributions=parts
    )

    pub = _step(cfg, "clinic", "publish", 1, ptr)

    published = _published(kit, cfg, store)
    assert not pub.is_completed() and not published, (
        f"clinic decrypted round 1's aggregate onto a base it never held ({base.key}) and published the "
        f"result ({pub.type.name}, {len(published)} file(s) under {kit.final_prefixes(cfg, 'clinic')[0]})"
    )
    why = kit.run_error(pub)
    assert "rebased" in why, f"clinic's refusal should name the rebased pointer: {why!r}"
    _no_plaintext(kit, cfg, captured, prefect_records, "clinic", "lab")
    # control: the honest pointer (same aggregate, the base clinic held) is decrypted and published
    _control(kit, _step(cfg, "clinic", "publish", 1, agg.next_global), "publishing the honest pointer")


# -- (8) changed config fingerprint ------------------------------------------------------------------------


def test_changed_config_fingerprint_is_refused(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, captured, prefect_records
) -> None:
    """The silo joined (accepted) one config; in round 2 the coordinator sends another one (a different
    learning rate and seed: within the policy, but not what the silo signed).

    On main before the fix a silo accepted nothing at join: the attack was expressible, the defence had
    nothing to compare against. Now ``silo_accepts`` is ``silotune.policy.accept_config``.
    """
    from silotune.store import FederationLayout, get_tensors

    cfg = kit.make_config(tmp_path, demo_data, "adv-fingerprint", rounds=3)
    silo_policy(cfg, "clinic")
    silo_accepts(cfg, "clinic")
    store, lay = _store(cfg), FederationLayout(cfg.federation_id)
    g0 = _start(cfg, tiny_adapter).global_ref
    _control(kit, _train(cfg, "clinic", 0, g0), "round 1 under the accepted config")
    g1 = kit.coordinator_put_global(
        cfg, store, lay.global_adapter(1), kit.perturbed(get_tensors(store, g0.key), 1)
    )
    changed = kit.with_changes(cfg, **{"train.learning_rate": 0.9, "seed": 4})
    assert changed.fingerprint() != cfg.fingerprint()
    before = kit.files_under(Path(cfg.store.root))
    n_runs = len(captured.runs)

    run = _train(changed, "clinic", 1, g1)

    written = kit.new_files(before, Path(cfg.store.root))
    leaks = kit.plaintext_leaks(
        [t for r in captured.runs[n_runs:] for t in r["delta"].values()],
        Path(cfg.store.root),
        *prefect_records,
    )
    uploads = sorted(k for k in written if "update" in k)
    assert not kit.completed_with_update(changed, "clinic", 1, run) and not uploads and not leaks, (
        f"clinic accepted config {cfg.fingerprint()} but trained round 2 under {changed.fingerprint()} "
        f"(run {run.type.name}) and uploaded {uploads} (its plaintext update is in {len(leaks)} file(s))"
    )
    assert len(captured.runs) == n_runs, "the silo trained on its data before refusing the config"
    assert "fingerprint" in kit.run_error(run), (
        f"the refusal should name the fingerprint: {kit.run_error(run)!r}"
    )
