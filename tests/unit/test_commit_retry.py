"""A retried commit task never commits a round twice (the coordinator's store steps are retried)."""

from __future__ import annotations

from pathlib import Path

import tasks.commit as commit_task
from silotune.config import parse_config
from silotune.federation.commit import load_state, save_state
from silotune.records import AggregateRecord, FederationState, ObjectRef
from silotune.store import LocalStore


def _setup(tmp_path: Path):
    config = parse_config(
        {
            "federation_id": "f",
            "silos": [{"name": "a", "train_path": "a.jsonl"}],
            "store": {"kind": "local", "root": str(tmp_path / "store")},
        }
    )
    before = FederationState(
        federation_id="f", fingerprint=config.fingerprint(), global_ref=ObjectRef(key="g0", sha256="0" * 64)
    )
    out = ObjectRef(key="g1", sha256="1" * 64)
    agg = AggregateRecord(round=0, included=["a"], excluded={}, next_global=out, delta_norm=1.0, seconds=0.1)
    return config, before, agg


def test_a_retry_after_the_commit_point_returns_the_committed_round(tmp_path: Path, monkeypatch) -> None:
    config, before, agg = _setup(tmp_path)
    store = LocalStore(config.store.root)
    # The first try wrote state.json (the commit point) for round 1, then failed.
    committed = before.model_copy(update={"completed_rounds": 1, "global_ref": agg.next_global})
    save_state(store, committed)

    def again(*_: object, **__: object) -> None:
        raise AssertionError("round 1 committed a second time")

    monkeypatch.setattr(commit_task, "commit_round", again)
    assert commit_task.commit.fn(config, before, 0, [], [], agg) == committed
    assert load_state(store, "f") == committed


def test_a_first_try_or_another_output_commits(tmp_path: Path, monkeypatch) -> None:
    config, before, agg = _setup(tmp_path)
    calls: list[int] = []
    monkeypatch.setattr(commit_task, "commit_round", lambda *a, **k: calls.append(a[3]) or before)
    commit_task.commit.fn(config, before, 0, [], [], agg)  # nothing stored yet
    # state.json holds round 1 with another next global: not this try's round, committed as asked
    other = before.model_copy(
        update={"completed_rounds": 1, "global_ref": ObjectRef(key="gx", sha256="2" * 64)}
    )
    save_state(LocalStore(config.store.root), other)
    commit_task.commit.fn(config, before, 0, [], [], agg)
    assert calls == [0, 0]
