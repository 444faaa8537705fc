"""Attacks by a malicious coordinator (or anyone who can create runs on a silo's pool, or runs the store).

The attacker may send any config, run, pointer or object; it holds the coordinator's keys but cannot
break the cryptography. Each test runs the attack through the silo's own flows (``flows.silo``) and
asserts the defence: the silo refuses, nothing private leaves it.
"""

from __future__ import annotations

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
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, captured, prefect_results_dir
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
    before = kit.files_under(store_root, prefect_results_dir)

    run = _train(weak, "clinic", 0, ref)

    leaks = kit.plaintext_leaks(captured.tensors("clinic"), store_root, prefect_results_dir)
    written = kit.new_files(before, store_root)
    assert not kit.completed_with_update(run) and not leaks, (
        f"clinic's policy requires secagg + signing + DP-SGD, yet it ran the coordinator's config with "
        f"protection 'none' and no DP (run {run.type.name}) and uploaded its plaintext update: "
        f"{kit.describe(leaks, store_root)}"
    )
    assert not [k for k in written if "update" in k], f"the refused run still uploaded: {sorted(written)}"
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
    assert not kit.completed_with_update(run) and not loot, (
        f"clinic trained under a config whose store is the attacker's {where} (run {run.type.name}) and "
        f"wrote {len(loot)} object(s) there ({sorted(loot)[:3]}); its plaintext update is in: {sorted(leaks)}"
    )
    assert not captured.runs, "the silo trained on its data before refusing the config"
    assert "store" in kit.run_error(run), f"the refusal should name the store: {kit.run_error(run)!r}"
    # the honest config still runs
    _control(kit, _train(honest, "clinic", 0, _start(honest, tiny_adapter).global_ref), "the honest config")


# -- (3) rewound round ----------------------------------------------------------------------------------


def test_rewound_round_does_not_rewind_the_ledger_or_reuse_noise(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, captured
) -> None:
    """After rounds 1 and 2 the coordinator asks for round 1 again, from a different global."""
    from silotune.store import FederationLayout, get_tensors

    cfg = kit.make_config(tmp_path, demo_data, "adv-rewind", sample_dp=DP, rounds=3)
    silo_policy(cfg, "clinic", require_sample_dp=True)
    silo_accepts(cfg, "clinic")
    store, lay = _store(cfg), FederationLayout(cfg.federation_id)
    g0 = _start(cfg, tiny_adapter).global_ref
    _control(kit, _train(cfg, "clinic", 0, g0), "round 1")
    g0_tensors = get_tensors(store, g0.key)
    g1 = kit.coordinator_put_global(cfg, store, lay.global_adapter(1), kit.perturbed(g0_tensors, 1))
    _control(kit, _train(cfg, "clinic", 1, g1), "round 2")
    eps_before, n_before = kit.silo_epsilon(cfg, "clinic")
    assert n_before == 2 and eps_before > 0

    other = kit.coordinator_put_global(cfg, store, lay.global_adapter(0), kit.perturbed(g0_tensors, 2))
    attack = _train(cfg, "clinic", 0, other)

    eps_after, n_after = kit.silo_epsilon(cfg, "clinic")
    assert eps_after >= eps_before and n_after >= n_before, (
        f"the coordinator rewound clinic's DP ledger: ε {eps_before:.3f} over {n_before} rounds before, "
        f"{eps_after:.3f} over {n_after} round(s) after re-running round 1 from another global "
        f"(run {attack.type.name}): round 2's entry was deleted"
    )
    if kit.completed_with_update(attack):
        seeds = [r["noise_seed"] for r in captured.runs]
        assert seeds[-1] != seeds[0], (
            "round 1 was released twice, from two different globals, with the same DP noise seed"
        )
        assert eps_after > eps_before, "a second release of round 1 was not charged to the ledger"


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
        index = {n: i + 1 for i, n in enumerate(sorted(adverts))}
        points = {}
        for name, client in fakes.items():
            client.share_keys(adverts)
            blob = next(store.get(k) for k in kit.share_keys(cfg, victim, name, 0) if store.exists(k))
            points[index[name]] = client._open_shares({victim: blob})[victim][0]
        t = secagg.SecAggParams(max_dropout_fraction=cfg.security.secagg_max_dropout).threshold(len(adverts))
        raw = secagg._shamir_combine(dict(list(points.items())[:t]))
        key = secagg.X25519PrivateKey.from_private_bytes(raw)
        ok = secagg._raw_public(key) == secagg.Advert.parse(adverts[victim]).mask_key
        return f"with t={t} of {len(adverts)}, the fakes rebuilt {victim}'s mask key: {ok}"
    except Exception as exc:
        return f"(could not rebuild {victim}'s key: {type(exc).__name__}: {exc})"


@pytest.mark.parametrize("via", ["store", "config"])
def test_injected_roster_is_refused(tmp_path: Path, demo_data, kit, silo_policy, silo_accepts, via) -> None:
    """The coordinator adds four fake silos to the round's roster: their adverts in the store (``store``),
    or also in the config it sends (``config``). With 6 silos t=4, so the fakes would hold t shares of
    every honest silo's secrets and could unmask each update alone."""
    from silotune.crypto.secagg import SecAggClient, SecAggParams

    cfg = kit.make_config(tmp_path, demo_data, f"adv-roster-{via}", protection="secagg", signing=True)
    kit.setup_keys(cfg)
    honest = [s.name for s in cfg.silos]
    for s in honest:
        silo_policy(cfg, s)
        silo_accepts(cfg, s)
    sent = cfg
    if via == "config":
        extra = [
            {**cfg.silos[0].model_dump(mode="json"), "name": m, "private_dir": str(tmp_path / "attacker" / m)}
            for m in FAKES
        ]
        sent = kit.with_changes(cfg, silos=[*[s.model_dump(mode="json") for s in cfg.silos], *extra])
    store = _store(cfg)
    for s in honest:
        _control(kit, _step(cfg, s, "secagg-advertise", 0), f"{s}'s advert")
    rid = f"{cfg.federation_id}/0"
    params = SecAggParams(max_dropout_fraction=cfg.security.secagg_max_dropout)
    fakes = {m: SecAggClient(m, round_id=rid, params=params) for m in FAKES}
    for m, client in fakes.items():
        for key in kit.advert_keys(cfg, m, 0):
            store.put(key, client.advertise())

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


def test_second_unmask_with_other_survivors_is_refused(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, unmask_answers
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


def test_concurrent_unmasks_with_other_survivors_answer_once(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, unmask_answers, monkeypatch
) -> None:
    """As above, but the two unmask runs overlap: the second reads the silo's secure-aggregation state
    before the first has used it up (the interleaving is forced at ``SecAggClient.from_state``)."""
    from silotune.crypto.secagg import SecAggClient

    cfg, store = _secagg_round_to_unmask(
        kit, tmp_path, demo_data, tiny_adapter, "adv-unmask-par", silo_policy, silo_accepts
    )
    loaded, release = threading.Event(), threading.Event()
    calls = {"n": 0}
    real = SecAggClient.from_state.__func__

    def paused(cls, blob):
        client = real(cls, blob)
        calls["n"] += 1
        if calls["n"] == 1:  # the first unmask run: wait (bounded) while the second one runs
            loaded.set()
            release.wait(timeout=60)
        return client

    monkeypatch.setattr(SecAggClient, "from_state", classmethod(paused))
    kit.publish_survivors(cfg, store, 0, ALL)
    states: dict[str, Any] = {}
    first = threading.Thread(
        target=lambda: states.setdefault("first", _step(cfg, "clinic", "secagg-unmask", 0))
    )
    first.start()
    loaded.wait(timeout=120)
    kit.publish_survivors(cfg, store, 0, DROPPED_BANK)
    states["second"] = _step(cfg, "clinic", "secagg-unmask", 0)
    release.set()
    first.join(timeout=300)
    assert not first.is_alive(), "the first unmask run did not finish"
    assert len(unmask_answers) <= 1, (
        f"clinic answered two overlapping unmask requests with different survivor sets: {unmask_answers} "
        f"(runs {states['first'].type.name}, {states['second'].type.name}): with both, bank's seed and "
        "mask-key shares are out"
    )


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


def test_replicated_ckks_ciphertext_is_not_decrypted_or_published(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, captured
) -> None:
    """The coordinator sums clinic's ciphertext three times (weight 3 x 1/3 = 1, count 3: every check of
    ``sum_encrypted`` and ``decrypt_update`` passes) and asks bank to publish the 'aggregate'."""
    from silotune.crypto.ckks import sum_encrypted
    from silotune.keys import CoordinatorKeys
    from silotune.store import get_tensors

    cfg = kit.make_config(
        tmp_path, demo_data, "adv-ckks-rep", silos=("clinic", "bank", "lab"), protection="ckks", signing=True
    )
    kit.setup_keys(cfg)
    for s in cfg.silos:
        silo_policy(cfg, s.name)
        silo_accepts(cfg, s.name)
    store = _store(cfg)
    g0 = _start(cfg, tiny_adapter).global_ref
    run = _train(cfg, "clinic", 0, g0)
    _control(kit, run, "clinic's encrypted upload")
    blob = store.get(run.result().update.update.key)
    total = sum_encrypted(
        [blob] * 3, CoordinatorKeys.for_config(cfg).ckks_public(), silos=["clinic", "bank", "lab"]
    )
    ptr = kit.ckks_pointer(
        cfg, store, round_next=1, base=g0, aggregate=total, parts=["clinic", "bank", "lab"]
    )

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


# -- (7) rebased CKKS pointer ------------------------------------------------------------------------


def test_rebased_ckks_pointer_is_refused(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts
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
    runs = [_train(cfg, s.name, 0, g0) for s in cfg.silos]
    for r in runs:
        _control(kit, r, "an encrypted upload")
    agg = aggregate_round(cfg, store, 0, g0, [r.result().update for r in runs])
    assert agg.included == ["clinic", "lab"]
    chosen = kit.perturbed(get_tensors(store, g0.key), 7, scale=0.5)
    base = kit.coordinator_put_global(cfg, store, f"{lay.prefix}/rounds/00000/rebase.safetensors", chosen)
    ptr = kit.ckks_pointer(
        cfg, store, round_next=1, base=base, aggregate=store.get(lay.aggregate(0)), parts=["clinic", "lab"]
    )

    pub = _step(cfg, "clinic", "publish", 1, ptr)

    published = _published(kit, cfg, store)
    assert not pub.is_completed() and not published, (
        f"clinic decrypted round 1's aggregate onto a base it never held ({base.key}) and published the "
        f"result ({pub.type.name}, {len(published)} file(s) under {kit.final_prefixes(cfg, 'clinic')[0]})"
    )


# -- (8) changed config fingerprint ------------------------------------------------------------------------


def test_changed_config_fingerprint_is_refused(
    tmp_path: Path, demo_data, tiny_adapter, kit, silo_policy, silo_accepts, captured, prefect_results_dir
) -> None:
    """The silo joined (accepted) one config; in round 2 the coordinator sends another one (a different
    learning rate and seed: within the policy, but not what the silo signed).

    Today a silo accepts nothing at join (``silo_accepts`` does nothing on main before the fix): the
    attack is expressible, the defence has nothing to compare against.
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
        prefect_results_dir,
    )
    uploads = sorted(k for k in written if "update" in k)
    assert not kit.completed_with_update(run) and not uploads and not leaks, (
        f"clinic accepted config {cfg.fingerprint()} but trained round 2 under {changed.fingerprint()} "
        f"(run {run.type.name}) and uploaded {uploads} (its plaintext update is in {len(leaks)} file(s))"
    )
    assert len(captured.runs) == n_runs, "the silo trained on its data before refusing the config"
    assert "fingerprint" in kit.run_error(run), (
        f"the refusal should name the fingerprint: {kit.run_error(run)!r}"
    )
