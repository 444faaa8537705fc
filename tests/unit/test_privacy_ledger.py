"""The silo's append-only privacy ledger: rewinds, retries, lifetime budgets, legacy books, damage."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from silotune.errors import SilotuneError
from silotune.keys import SiloVault
from silotune.privacy import ledger as ledger_mod
from silotune.privacy.accountant import PrivacyLedger
from silotune.privacy.ledger import (
    LedgerConflict,
    LedgerEntry,
    LedgerError,
    PrivacyBudgetExhausted,
    SiloLedger,
)

DELTA = 1e-5
DATA = "d" * 64


def _entry(round_: int, *, fid: str = "fed-a", kind: str = "sample_dp", glob: str | None = None, **over):
    data = over.pop("data_sha256", DATA)
    inputs = {
        "global_sha256": glob or f"{round_:064x}",
        "config_fingerprint": "c" * 16,
        **({"data_sha256": data} if data is not None else {}),
    }
    args = {
        "kind": kind,
        "federation_id": fid,
        "round": round_,
        "silo": "clinic",
        "noise_multiplier": 1.0,
        "sample_rate": 0.05 if kind == "sample_dp" else 1.0,
        "steps": 20 if kind == "sample_dp" else 1,
        "accountant": "rdp",
        "inputs": inputs,
        "data_sha256": data,
    }
    args.update(over)
    return LedgerEntry(**args)


def _reference(entries, accountant: str = "rdp") -> float:
    ref = PrivacyLedger(silo="clinic", federation_id="x", accountant=accountant)
    for e in entries:
        ref.record(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
    return ref.epsilon(DELTA)


@pytest.fixture
def books(tmp_path: Path) -> SiloLedger:
    return SiloLedger(tmp_path / "private", "clinic")


def _files(books: SiloLedger) -> dict[str, bytes]:
    return {
        str(p.relative_to(books.root)): p.read_bytes() for p in sorted(books.folder.rglob("*")) if p.is_file()
    }


# -- append-only ------------------------------------------------------------------------------------


def test_a_rewound_round_is_refused_and_later_rounds_stay(books: SiloLedger) -> None:
    recorded = [_entry(r) for r in range(3)]
    for e in recorded:
        assert books.record(e) is True
    before = _files(books)
    eps = books.epsilon(kind="sample_dp", delta=DELTA, federation_id="fed-a")
    rewound = _entry(0, glob="9" * 64)  # the coordinator asks for round 0 again with a new global
    with pytest.raises(LedgerConflict) as info:
        books.record(rewound)
    msg = str(info.value)
    assert "round 0" in msg and "'fed-a'" in msg and "global_sha256 differs" in msg
    assert "config_fingerprint" not in msg and "\n" not in msg
    # the budget check refuses it too, before any training
    with pytest.raises(LedgerConflict, match="global_sha256 differs"):
        books.check_budget(rewound, delta=DELTA, max_federation_epsilon=1e9)
    with pytest.raises(LedgerConflict):
        books.epsilon(kind="sample_dp", delta=DELTA, extra=rewound)
    assert books.entries() == recorded
    assert _files(books) == before
    assert books.epsilon(kind="sample_dp", delta=DELTA, federation_id="fed-a") == eps


def test_other_differences_are_named(books: SiloLedger) -> None:
    books.record(_entry(0))
    with pytest.raises(LedgerConflict, match=r"config_fingerprint differs"):
        books.record(
            _entry(
                0, inputs={"global_sha256": f"{0:064x}", "config_fingerprint": "x" * 16, "data_sha256": DATA}
            )
        )
    with pytest.raises(LedgerConflict, match=r"noise_multiplier differs \(recorded 1.0, now 2.0\)"):
        books.record(_entry(0, noise_multiplier=2.0))
    with pytest.raises(LedgerConflict, match=r"data_sha256 differs"):
        books.record(_entry(0, data_sha256="e" * 64))
    # another kind or federation is another slot
    assert books.record(_entry(0, kind="client_dp")) and books.record(_entry(0, fid="fed-b"))


def test_an_identical_retry_is_a_no_op(books: SiloLedger) -> None:
    for r in range(2):
        books.record(_entry(r))
    before = _files(books)
    eps = books.epsilon(kind="sample_dp", delta=DELTA)
    assert books.record(_entry(1)) is False
    assert _files(books) == before and len(books.entries()) == 2
    # a retry never counts twice, in ε or in the budget
    assert books.epsilon(kind="sample_dp", delta=DELTA, extra=_entry(1)) == eps
    assert books.check_budget(_entry(1), delta=DELTA, max_federation_epsilon=eps)["federation_epsilon"] == eps
    with pytest.raises(PrivacyBudgetExhausted):
        books.check_budget(_entry(2), delta=DELTA, max_federation_epsilon=eps)


def test_a_lost_race_for_a_slot_is_a_retry_or_a_conflict(books: SiloLedger, monkeypatch) -> None:
    books.record(_entry(0))
    monkeypatch.setattr(SiloLedger, "get", lambda self, *slot: None)  # both writers saw an empty slot
    assert books.record(_entry(0)) is False
    with pytest.raises(LedgerConflict):
        books.record(_entry(0, glob="9" * 64))
    assert not [p for p in books.folder.rglob("*") if p.name.startswith(".")]


# -- ε and budgets ------------------------------------------------------------------------------------


def test_epsilon_comes_from_the_recorded_sigmas(books: SiloLedger) -> None:
    # two rounds at σ1; then `rounds` changes on resume and z is recalibrated: round 3 at σ2
    entries = [
        _entry(0, noise_multiplier=1.1),
        _entry(1, noise_multiplier=1.1),
        _entry(2, noise_multiplier=0.8),
    ]
    for e in entries:
        books.record(e)
    got = books.epsilon(kind="sample_dp", delta=DELTA, federation_id="fed-a")
    assert got == _reference(entries)
    assert got != _reference([_entry(r, noise_multiplier=0.8) for r in range(3)])
    planned = _entry(3, noise_multiplier=0.8)
    assert books.epsilon(kind="sample_dp", delta=DELTA, extra=planned) == _reference([*entries, planned])
    assert books.epsilon(kind="client_dp", delta=DELTA) == 0.0


def test_lifetime_epsilon_composes_across_federations_on_the_same_data(books: SiloLedger) -> None:
    # scheduled retraining: a new federation id each run, same dataset
    run1 = [_entry(r, fid="retrain-2024-01") for r in range(3)]
    run2 = [_entry(r, fid="retrain-2024-02") for r in range(2)]
    other = [_entry(r, fid="other-data", data_sha256="e" * 64) for r in range(4)]
    for e in [*run1, *run2, *other]:
        books.record(e)
    lifetime = books.epsilon(kind="sample_dp", delta=DELTA, data_sha256=DATA)
    assert lifetime == pytest.approx(_reference([*run1, *run2]), rel=1e-12)
    assert books.epsilon(kind="sample_dp", delta=DELTA, federation_id="retrain-2024-02") == _reference(run2)
    assert books.epsilon(kind="sample_dp", delta=DELTA) == pytest.approx(_reference([*run1, *run2, *other]))

    nxt = _entry(2, fid="retrain-2024-02")
    federation = _reference([*run2, nxt])
    after = _reference([*run1, *run2, nxt])
    assert federation < lifetime < after
    # the federation budget alone would let round 3 through; the dataset's lifetime budget stops it
    out = books.check_budget(nxt, delta=DELTA, max_federation_epsilon=federation + 0.01)
    assert out == {"federation_epsilon": pytest.approx(federation)}
    with pytest.raises(PrivacyBudgetExhausted) as info:
        books.check_budget(
            nxt, delta=DELTA, max_federation_epsilon=federation + 0.01, max_lifetime_epsilon=lifetime
        )
    msg = str(info.value)
    assert "lifetime privacy budget" in msg and DATA in msg and "retrain-2024-02" in msg
    assert f"ε={lifetime:.3f} so far" in msg and f"ε={after:.3f}" in msg and "stops contributing" in msg
    # the same budget is fine for another dataset's federation
    books.check_budget(
        _entry(4, fid="other-data", data_sha256="e" * 64), delta=DELTA, max_lifetime_epsilon=lifetime
    )


def test_federation_budget_stops_and_names_the_numbers(books: SiloLedger) -> None:
    books.record(_entry(0))
    one = books.epsilon(kind="sample_dp", delta=DELTA, federation_id="fed-a")
    with pytest.raises(
        PrivacyBudgetExhausted, match=r"federation privacy budget \(sample_dp, federation 'fed-a'\)"
    ):
        books.check_budget(_entry(1), delta=DELTA, max_federation_epsilon=one * 1.01)
    with pytest.raises(ValueError, match="max_federation_epsilon"):
        books.check_budget(_entry(1), delta=DELTA, max_federation_epsilon=float("inf"))


def test_client_dp_has_its_own_books_and_budget_stop(books: SiloLedger) -> None:
    for r in range(3):
        books.record(_entry(r, steps=20))  # DP-SGD spends do not count for client-level ε
    z = 2.0
    spent = []
    limit = _reference([_entry(r, kind="client_dp", noise_multiplier=z) for r in range(4)]) + 1e-9
    r = 0
    while True:
        e = _entry(r, kind="client_dp", noise_multiplier=z)
        try:
            books.check_budget(e, delta=DELTA, max_federation_epsilon=limit)
        except PrivacyBudgetExhausted as exc:
            assert "client_dp" in str(exc) and "round 5" in str(exc)
            break
        books.record(e)
        spent.append(e)
        r += 1
    assert len(spent) == 4
    assert books.epsilon(kind="client_dp", delta=DELTA, federation_id="fed-a") == _reference(spent) <= limit


def test_mixed_accountants_take_the_larger_epsilon(books: SiloLedger) -> None:
    a = _entry(0, fid="fed-rdp", accountant="rdp")
    b = _entry(0, fid="fed-prv", accountant="prv")
    books.record(a)
    books.record(b)
    got = books.epsilon(kind="sample_dp", delta=DELTA, data_sha256=DATA)
    assert got == max(_reference([a, b], "rdp"), _reference([a, b], "prv"))


# -- legacy books --------------------------------------------------------------------------------------


def _legacy(books: SiloLedger, fid: str, rounds: dict) -> None:
    SiloVault("clinic", books.root).write_ledger(
        fid, {"federation_id": fid, "silo": "clinic", "accountant": "rdp", "rounds": rounds}
    )


def test_legacy_ledgers_keep_their_spent_epsilon(books: SiloLedger) -> None:
    _legacy(
        books,
        "old-fed",
        {"0": {"sigma": 0.9, "q": 0.1, "steps": 30}, "1": {"sigma": 0.9, "q": 0.1, "steps": 30}},
    )
    old = books.entries()
    assert [(e.kind, e.federation_id, e.round, e.inputs, e.data_sha256) for e in old] == [
        ("sample_dp", "old-fed", 0, {}, None),
        ("sample_dp", "old-fed", 1, {}, None),
    ]
    assert books.epsilon(kind="sample_dp", delta=DELTA, federation_id="old-fed") == _reference(old)
    # unknown data counts against every dataset's lifetime (the safe side)
    books.record(_entry(0, fid="new-fed"))
    assert books.epsilon(kind="sample_dp", delta=DELTA, data_sha256=DATA) == pytest.approx(
        _reference([_entry(0, fid="new-fed"), *old])
    )
    # a legacy round cannot be replaced; the federation goes on with new rounds
    with pytest.raises(LedgerConflict, match="global_sha256 differs"):
        books.record(_entry(1, fid="old-fed"))
    assert books.record(_entry(2, fid="old-fed", noise_multiplier=0.9, sample_rate=0.1, steps=30))
    assert books.get("sample_dp", "old-fed", 1) == old[1]
    # a legacy ledger of another silo is refused by name
    SiloVault("lab", books.root).write_ledger(
        "lab-fed", {"federation_id": "lab-fed", "silo": "lab", "rounds": {}}
    )
    with pytest.raises(LedgerError, match=r"lab-fed\.json is silo 'lab'"):
        books.entries()


# -- files ---------------------------------------------------------------------------------------------


def test_files_are_private_and_readable_json(books: SiloLedger) -> None:
    books.record(_entry(7))
    path = books.entry_path("sample_dp", "fed-a", 7)
    assert path == books.root / "ledger" / "entries" / "sample_dp" / "fed-a" / "00007.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["entry"]["inputs"]["global_sha256"] == f"{7:064x}"
    assert LedgerEntry.model_validate(doc["entry"]) == _entry(7)


def test_writes_are_fsynced(books: SiloLedger, monkeypatch) -> None:
    calls = []
    real = os.fsync
    monkeypatch.setattr(ledger_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    books.record(_entry(0))
    assert len(calls) >= 2  # the entry, then its directory


def test_a_crash_mid_write_leaves_a_readable_ledger(books: SiloLedger, monkeypatch) -> None:
    books.record(_entry(0))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ledger_mod.os, "link", crash)
    with pytest.raises(KeyboardInterrupt):
        books.record(_entry(1))
    monkeypatch.undo()
    # a killed process may leave its temporary file behind: readers ignore it
    (books.entry_path("sample_dp", "fed-a", 1).parent / ".00001.json.abc.tmp").write_text('{"versi')
    assert books.entries() == [_entry(0)]
    assert books.record(_entry(1))


def test_a_corrupted_entry_is_a_clear_error_naming_the_file(books: SiloLedger) -> None:
    books.record(_entry(0))
    path = books.entry_path("sample_dp", "fed-a", 0)
    path.write_text(path.read_text()[:40])
    with pytest.raises(LedgerError, match=rf"privacy ledger entry {path} is unreadable") as info:
        books.epsilon(kind="sample_dp", delta=DELTA)
    assert isinstance(info.value, SilotuneError)
    with pytest.raises(LedgerError, match=str(path)):
        books.record(_entry(0))
    path.write_text(json.dumps({"version": 1, "entry": {**_entry(0).model_dump(), "steps": -1}}))
    with pytest.raises(LedgerError, match=r"steps: Input should be greater than or equal to 0"):
        books.entries()
    # an entry moved to another slot, or another silo's entry, is refused
    other = _entry(5).model_dump()
    path.write_text(json.dumps({"version": 1, "entry": other}))
    with pytest.raises(LedgerError, match="belongs elsewhere"):
        books.entries()
    legacy = books.folder / "broken.json"
    path.unlink()
    legacy.write_text("{not json")
    with pytest.raises(LedgerError, match=rf"legacy privacy ledger {legacy} is unreadable"):
        books.entries()


def test_entries_validate_names_and_numbers() -> None:
    with pytest.raises(ValidationError, match="not a valid name"):
        _entry(0, fid="../escape")
    with pytest.raises(ValidationError, match="noise_multiplier"):
        _entry(0, noise_multiplier=0.0)
    with pytest.raises(ValidationError, match="accountant='gauss'"):
        _entry(0, accountant="gauss")
    with pytest.raises(ValidationError, match=r"inputs.data_sha256='d+' != data_sha256='e+'"):
        LedgerEntry(**{**_entry(0).model_dump(), "data_sha256": "e" * 64})
    with pytest.raises(ValidationError, match="kind"):
        _entry(0, kind="local_dp")


def test_a_silo_records_only_its_own_entries(books: SiloLedger) -> None:
    with pytest.raises(LedgerError, match="refusing to record silo 'lab'"):
        books.record(_entry(0, silo="lab"))
