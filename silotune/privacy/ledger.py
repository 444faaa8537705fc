"""A silo's privacy books: every release it ever made, append-only, in its private folder.

Opacus does the math (:class:`~silotune.privacy.accountant.PrivacyLedger`); this module
keeps the books. One :class:`LedgerEntry` per (kind, federation, round) records what
the silo released in that round: the noise multiplier, sample rate and steps it
actually used, and the inputs that fixed the release (the global adapter's sha256,
the config fingerprint, the data's sha256). The rules:

- **Append-only.** An entry is never deleted or rewritten. Recording the same
  (kind, federation, round) again is a no-op when the entry is identical (a retried
  round releases the very same update: its noise is keyed by the same inputs, see
  :mod:`silotune.privacy.noise`) and a :class:`LedgerConflict` otherwise: a round
  cannot be "rewound" to release a second, different update under the same number.
- **ε from what was recorded.** ε composes the σ, q and steps of the recorded
  entries, never values recomputed from today's config (a config whose ``rounds``
  changed on resume recalibrates σ for the rounds to come, not for the past).
- **Two budgets.** Per federation, and per dataset over the silo's lifetime:
  entries of every federation that spent the same ``data_sha256`` compose, so
  scheduled retraining (a new federation id each run) cannot reset ε.
- **Legacy books count.** Ledgers written before this module
  (``ledger/<fid>.json``, one document per federation) are read as ``sample_dp``
  entries with empty inputs and an unknown dataset; an unknown dataset is
  composed into *every* dataset's lifetime ε (the safe side).

Files (``root`` is the silo's private folder)::

    root/ledger/entries/<kind>/<federation_id>/<round:05d>.json   one entry, mode 0600
    root/ledger/<federation_id>.json                              legacy ledger (read only)

An entry file is ``{"version": 1, "entry": {...LedgerEntry...}}``. It is written to
a temporary file (0600), fsynced, then hard-linked to its final name, which fails
if the name exists: two writers of the same round cannot both win, and a crash
leaves at most a dot-prefixed temporary file, which readers ignore. The
directory is fsynced after the link.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from silotune.errors import SilotuneError
from silotune.privacy.accountant import ACCOUNTANTS, PrivacyLedger

ENTRY_VERSION = 1
KINDS = ("sample_dp", "client_dp")
INPUT_KEYS = ("global_sha256", "config_fingerprint", "data_sha256")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

Kind = Literal["sample_dp", "client_dp"]


class LedgerError(SilotuneError):
    """A ledger file cannot be read, or belongs to another silo or round."""


class LedgerConflict(LedgerError):
    """A round already recorded in the ledger is being recorded again with different inputs."""


class PrivacyBudgetExhausted(SilotuneError):
    """The silo's next contribution would take its ε past a budget (per federation or lifetime)."""


class LedgerEntry(BaseModel):
    """One release of a silo: what it spent in one round of one federation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind = Field(description="sample_dp: DP-SGD steps; client_dp: one noised update per round.")
    federation_id: str
    round: int = Field(ge=0, description="0-based round index.")
    silo: str
    noise_multiplier: float = Field(description="σ (sample_dp) or z (client_dp) actually used.")
    sample_rate: float = Field(description="q: Poisson sample rate (sample_dp) or client sampling rate.")
    steps: int = Field(ge=0, description="DP-SGD steps (sample_dp) or 1 (client_dp).")
    accountant: str = Field(default="rdp", description="An accountant of silotune.privacy.ACCOUNTANTS.")
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="What fixed the release: global_sha256, config_fingerprint, data_sha256. Empty: legacy.",
    )
    data_sha256: str | None = Field(
        default=None, description="The dataset this entry spends (lifetime budget); None: unknown (legacy)."
    )

    @field_validator("federation_id", "silo")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v) or v in (".", ".."):
            raise ValueError(f"{v!r} is not a valid name (letters, digits, '_', '.', '-'; ≤ 128 chars)")
        return v

    @model_validator(mode="after")
    def _check(self) -> LedgerEntry:
        problems = []
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            problems.append(f"noise_multiplier={self.noise_multiplier!r} must be a finite number > 0")
        if not (math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1):
            problems.append(f"sample_rate={self.sample_rate!r} must be in (0, 1]")
        if self.accountant not in ACCOUNTANTS:
            known = ", ".join(ACCOUNTANTS.names())
            problems.append(f"accountant={self.accountant!r}: unknown; known: {known}")
        in_data = self.inputs.get("data_sha256")
        if in_data is not None and in_data != self.data_sha256:
            problems.append(f"inputs.data_sha256={in_data!r} != data_sha256={self.data_sha256!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def slot(self) -> tuple[str, str, int]:
        """(kind, federation_id, round): at most one entry per slot."""
        return (self.kind, self.federation_id, self.round)


def _differences(old: LedgerEntry, new: LedgerEntry) -> list[str]:
    """What differs between two entries of the same slot, inputs first, one phrase each."""
    out = []
    for key in sorted(set(old.inputs) | set(new.inputs), key=lambda k: (k not in INPUT_KEYS, k)):
        a, b = old.inputs.get(key), new.inputs.get(key)
        if a != b:
            out.append(f"{key} differs (recorded {a or '(none)'}, now {b or '(none)'})")
    fields = ["data_sha256", "noise_multiplier", "sample_rate", "steps", "accountant", "silo"]
    if "data_sha256" in old.inputs or "data_sha256" in new.inputs:
        fields.remove("data_sha256")  # already named among the inputs
    for name in fields:
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            out.append(f"{name} differs (recorded {a!r}, now {b!r})")
    return out


def _why(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdirs(path: Path) -> None:
    """Create ``path`` and missing parents with mode 0700, fsyncing each new directory's parent."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


class SiloLedger:
    """The privacy books of one silo, kept in ``root/ledger/`` (``root``: its private folder).

    Example::

        books = SiloLedger(vault.root, "clinic")
        entry = LedgerEntry(kind="sample_dp", federation_id=fid, round=r, silo="clinic",
                            noise_multiplier=σ, sample_rate=q, steps=k, accountant="rdp",
                            inputs={"global_sha256": g, "config_fingerprint": f, "data_sha256": d},
                            data_sha256=d)
        books.check_budget(entry, delta=1e-5, max_federation_epsilon=8, max_lifetime_epsilon=16)
        ...  # train and noise with keys bound to entry.inputs, then, before the update leaves:
        books.record(entry)
    """

    def __init__(self, root: Path | str, silo: str) -> None:
        if not isinstance(silo, str) or not _NAME.match(silo):
            raise ValueError(f"silo must be a valid name, got {silo!r}")
        self.root = Path(root)
        self.silo = silo

    def __repr__(self) -> str:
        return f"SiloLedger(root={str(self.root)!r}, silo={self.silo!r})"

    @property
    def folder(self) -> Path:
        return self.root / "ledger"

    def entry_path(self, kind: str, federation_id: str, round_: int) -> Path:
        return self.folder / "entries" / kind / federation_id / f"{round_:05d}.json"

    # -- reading -----------------------------------------------------------------------------

    def _read_entry(self, path: Path) -> LedgerEntry:
        try:
            doc = json.loads(path.read_bytes())
            if not isinstance(doc, dict) or doc.get("version") != ENTRY_VERSION:
                raise ValueError(f"not a version-{ENTRY_VERSION} ledger entry")
            entry = LedgerEntry.model_validate(doc.get("entry"))
        except (OSError, ValueError, ValidationError) as exc:
            raise LedgerError(
                f"silo {self.silo!r}: privacy ledger entry {path} is unreadable ({_why(exc)})"
            ) from None
        if entry.silo != self.silo or path != self.entry_path(*entry.slot):
            raise LedgerError(
                f"silo {self.silo!r}: {path} holds silo {entry.silo!r}'s entry for "
                f"{entry.kind} {entry.federation_id!r} round {entry.round}, which belongs elsewhere"
            )
        return entry

    def _read_legacy(self, path: Path) -> list[LedgerEntry]:
        fid = path.stem
        try:
            doc = json.loads(path.read_bytes())
            if not isinstance(doc, dict) or not isinstance(doc.get("rounds"), dict):
                raise ValueError("no 'rounds' mapping")
            if doc.get("federation_id") != fid or doc.get("silo") != self.silo:
                raise LedgerError(
                    f"silo {self.silo!r}: legacy ledger {path} is silo {doc.get('silo')!r}'s ledger of "
                    f"federation {doc.get('federation_id')!r}"
                )
            accountant = doc.get("accountant", "rdp")
            return [
                LedgerEntry(
                    kind="sample_dp",
                    federation_id=fid,
                    round=int(key),
                    silo=self.silo,
                    noise_multiplier=r["sigma"],
                    sample_rate=r["q"],
                    steps=r["steps"],
                    accountant=accountant,
                )
                for key, r in doc["rounds"].items()
            ]
        except LedgerError:
            raise
        except (OSError, ValueError, TypeError, KeyError, ValidationError) as exc:
            raise LedgerError(
                f"silo {self.silo!r}: legacy privacy ledger {path} is unreadable ({_why(exc)})"
            ) from None

    def _legacy_files(self) -> Iterator[Path]:
        if self.folder.is_dir():
            yield from sorted(p for p in self.folder.glob("*.json") if not p.name.startswith("."))

    def _entry_files(self) -> Iterator[Path]:
        base = self.folder / "entries"
        if base.is_dir():
            yield from sorted(p for p in base.glob("*/*/*.json") if not p.name.startswith("."))

    def entries(self) -> list[LedgerEntry]:
        """Every entry, legacy ones included, sorted by (kind, federation, round).

        A slot held both by a legacy ledger and by an entry file (a federation resumed
        across the upgrade) is a :class:`LedgerConflict` only if they differ in σ, q or
        steps; the entry file's inputs win otherwise.
        """
        found: dict[tuple[str, str, int], LedgerEntry] = {}
        for path in self._legacy_files():
            for e in self._read_legacy(path):
                found[e.slot] = e
        for path in self._entry_files():
            e = self._read_entry(path)
            old = found.get(e.slot)
            if old is not None and _numbers(old) != _numbers(e):
                raise LedgerConflict(_conflict_message(old, e, "legacy ledger and entry file disagree: "))
            found[e.slot] = e
        return [found[k] for k in sorted(found)]

    def get(self, kind: str, federation_id: str, round_: int) -> LedgerEntry | None:
        """The entry of a slot, or None."""
        path = self.entry_path(kind, federation_id, round_)
        if path.is_file():
            return self._read_entry(path)
        if kind == "sample_dp":
            legacy = self.folder / f"{federation_id}.json"
            if legacy.is_file():
                for e in self._read_legacy(legacy):
                    if e.round == round_:
                        return e
        return None

    # -- writing -----------------------------------------------------------------------------

    def _check_same(self, old: LedgerEntry, entry: LedgerEntry) -> bool:
        """True when ``entry`` is a retry of ``old``; :class:`LedgerConflict` when it differs."""
        if old == entry:
            return True
        raise LedgerConflict(_conflict_message(old, entry))

    def record(self, entry: LedgerEntry) -> bool:
        """Append ``entry``; returns False when the identical entry was already recorded (a retry).

        Raises :class:`LedgerConflict` when the slot holds a different entry: nothing
        is ever replaced. Durable: the entry is on disk when this returns.
        """
        self._check_silo(entry)
        old = self.get(*entry.slot)
        if old is not None:
            self._check_same(old, entry)
            return False
        path = self.entry_path(*entry.slot)
        _mkdirs(path.parent)
        data = json.dumps(
            {"version": ENTRY_VERSION, "entry": entry.model_dump(mode="json")}, indent=1, sort_keys=True
        ).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if the slot was taken meanwhile: never overwrites
            except FileExistsError:
                self._check_same(self._read_entry(path), entry)
                return False
            _fsync_dir(path.parent)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return True

    def _check_silo(self, entry: LedgerEntry) -> None:
        if entry.silo != self.silo:
            raise LedgerError(f"silo {self.silo!r}: refusing to record silo {entry.silo!r}'s entry")

    # -- ε and budgets -------------------------------------------------------------------------

    def _planned(self, extra: LedgerEntry | None) -> list[LedgerEntry]:
        """The recorded entries plus ``extra`` unless it is recorded already (a retry)."""
        entries = self.entries()
        if extra is not None:
            self._check_silo(extra)
            recorded = next((e for e in entries if e.slot == extra.slot), None)
            if recorded is None:
                entries.append(extra)
            else:
                self._check_same(recorded, extra)
        return entries

    def epsilon(
        self,
        *,
        kind: str,
        delta: float,
        federation_id: str | None = None,
        data_sha256: str | None = None,
        extra: LedgerEntry | None = None,
    ) -> float:
        """ε composed over the recorded entries of ``kind`` that match, plus ``extra`` if not yet recorded.

        ``federation_id``: only that federation's entries (its budget). ``data_sha256``:
        only entries that spent that dataset, or an unknown one (its lifetime budget).
        Neither: every entry of ``kind``. ``extra`` is a planned entry; when the ledger
        already holds it identically (a retry) it is not counted twice, and when its
        slot holds a different entry this raises :class:`LedgerConflict`.

        Entries are composed with :class:`~silotune.privacy.accountant.PrivacyLedger`
        under their own accountant; when the matching entries name different
        accountants, ε is the largest of their compositions.
        """
        _check_kind(kind)
        chosen = _matching(self._planned(extra), kind, federation_id, data_sha256)
        return compose(chosen, delta=delta, silo=self.silo)

    def check_budget(
        self,
        entry: LedgerEntry,
        *,
        delta: float,
        max_federation_epsilon: float | None = None,
        max_lifetime_epsilon: float | None = None,
    ) -> dict[str, float]:
        """Raise :class:`PrivacyBudgetExhausted` if recording ``entry`` would pass a budget.

        The federation budget composes ``entry``'s kind over its federation; the
        lifetime budget over every federation that spent its dataset (``entry.data_sha256``;
        an entry of unknown data is checked against every entry of its kind). A retry of
        an identical recorded entry never counts twice; a conflicting one raises
        :class:`LedgerConflict` before any budget is looked at. Returns the ε each
        checked budget would reach (``federation_epsilon``, ``lifetime_epsilon``).
        """
        recorded = self.entries()
        planned = self._planned(entry)  # LedgerConflict first
        out: dict[str, float] = {}
        budgets = (
            ("federation", max_federation_epsilon, entry.federation_id, None),
            ("lifetime", max_lifetime_epsilon, None, entry.data_sha256),
        )
        for name, limit, fid, data in budgets:
            if limit is None:
                continue
            if (
                isinstance(limit, bool)
                or not isinstance(limit, int | float)
                or not (math.isfinite(limit) and limit > 0)
            ):
                raise ValueError(f"max_{name}_epsilon must be a finite number > 0, got {limit!r}")
            after = compose(_matching(planned, entry.kind, fid, data), delta=delta, silo=self.silo)
            out[f"{name}_epsilon"] = after
            if after > limit:
                before = compose(_matching(recorded, entry.kind, fid, data), delta=delta, silo=self.silo)
                where = (
                    f"federation {entry.federation_id!r}"
                    if name == "federation"
                    else f"dataset {entry.data_sha256 or '(unknown)'} across all federations"
                )
                raise PrivacyBudgetExhausted(
                    f"silo {self.silo!r}: {name} privacy budget ({entry.kind}, {where}) spent: "
                    f"ε={before:.3f} so far; round {entry.round + 1} of federation {entry.federation_id!r} "
                    f"would take it to ε={after:.3f} > max_{name}_epsilon={limit} (δ={delta}); "
                    "the silo stops contributing"
                )
        return out


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _matching(
    entries: Iterable[LedgerEntry], kind: str, federation_id: str | None, data_sha256: str | None
) -> list[LedgerEntry]:
    out = []
    for e in entries:
        if e.kind != kind:
            continue
        if federation_id is not None and e.federation_id != federation_id:
            continue
        # An entry of unknown data (legacy) may have spent any dataset: it counts for all.
        if data_sha256 is not None and e.data_sha256 not in (data_sha256, None):
            continue
        out.append(e)
    return out


def _numbers(e: LedgerEntry) -> tuple[float, float, int]:
    return (e.noise_multiplier, e.sample_rate, e.steps)


def _conflict_message(old: LedgerEntry, new: LedgerEntry, prefix: str = "") -> str:
    diffs = _differences(old, new) or ["entries differ"]
    return (
        f"silo {new.silo!r}: {prefix}{new.kind} round {new.round} of federation {new.federation_id!r} "
        f"is already in the privacy ledger with other inputs: {'; '.join(diffs)}; a recorded round is "
        "never replaced (it was released already)"
    )


def compose(entries: Iterable[LedgerEntry], *, delta: float, silo: str = "(silo)") -> float:
    """ε of a set of entries, composed with :class:`PrivacyLedger` (largest over their accountants)."""
    chosen = sorted(entries, key=lambda e: (e.federation_id, e.round))
    if not chosen:
        PrivacyLedger(silo=silo, federation_id="(all)").epsilon(delta)  # validates delta
        return 0.0
    best = 0.0
    for accountant in sorted({e.accountant for e in chosen}):
        ledger = PrivacyLedger(silo=silo, federation_id="(all)", accountant=accountant)
        for e in chosen:
            ledger.record(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
        best = max(best, ledger.epsilon(delta))
    return best


def entry_json(entry: LedgerEntry) -> dict[str, Any]:
    """The on-disk document of an entry (for tools and tests)."""
    return {"version": ENTRY_VERSION, "entry": entry.model_dump(mode="json")}
