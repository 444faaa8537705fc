"""Auditing a finished federation: membership inference and backdoor success beside clean utility."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import Any

from silotune.adapters import AdapterModel
from silotune.audit.backdoor import BackdoorResult, backdoor_success
from silotune.audit.metrics import roc_curve
from silotune.audit.mia import MIAResult, membership_inference
from silotune.config import FederationConfig
from silotune.data import encode_dataset, read_records
from silotune.errors import ConfigError
from silotune.federation.commit import load_state
from silotune.store import ObjectStore, get_tensors


@dataclass(frozen=True)
class AuditReport:
    federation_id: str
    rounds: int
    mia: dict[str, MIAResult]
    backdoor: dict[str, BackdoorResult] = field(default_factory=dict)
    clean: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat ``audit.*`` metrics, as logged to MLflow."""
        out: dict[str, float] = {}
        for name, r in self.mia.items():
            out.update({f"audit.mia.{name}.{k}": v for k, v in r.metrics().items()})
        for silo, b in self.backdoor.items():
            out.update({f"audit.backdoor.{silo}.{k}": v for k, v in b.metrics().items()})
        out.update({f"audit.clean.{k}": float(v) for k, v in self.clean.items()})
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "federation_id": self.federation_id,
            "rounds": self.rounds,
            "mia": {
                n: {**r.metrics(), "num_members": r.num_members, "num_nonmembers": r.num_nonmembers}
                for n, r in self.mia.items()
            },
            "backdoor": {s: b.metrics() for s, b in self.backdoor.items()},
            "clean": self.clean,
        }


def _sample(items: list[Any], k: int | None, seed: int) -> list[Any]:
    if k is None or len(items) <= k:
        return items
    return random.Random(seed).sample(items, k)


def audit_federation(
    config: FederationConfig,
    store: ObjectStore,
    adapter: AdapterModel,
    *,
    max_examples: int | None = 200,
    batch_size: int = 16,
    seed: int = 0,
) -> AuditReport:
    """Audit the last committed global adapter of ``config``'s federation.

    Members: every silo's training records (as stored, before any simulated
    poisoning); non-members: every silo's holdout. Each side is subsampled to
    ``max_examples`` with ``seed``. Backdoor success is measured for every silo
    configured with a backdoor, on the holdouts of all silos.
    """
    state = load_state(store, config.federation_id)
    if state is None or state.completed_rounds == 0:
        raise ConfigError(
            f"federation {config.federation_id!r} has no committed round in {store.describe()}: "
            "nothing to audit"
        )
    final = get_tensors(store, state.global_ref.key, expected_sha256=state.global_ref.sha256)
    tok, msl = adapter.tokenizer, config.model.max_seq_len
    member_chats = [c for s in config.silos for c in read_records(s.train_path)]
    holdout_chats = [c for s in config.silos if s.eval_path for c in read_records(s.eval_path)]
    if not holdout_chats:
        raise ConfigError("no silo has an eval_path: a membership audit needs held-out non-members")
    members = encode_dataset(_sample(member_chats, max_examples, seed), tok, msl)
    nonmembers = encode_dataset(_sample(holdout_chats, max_examples, seed + 1), tok, msl)
    mia = membership_inference(adapter, final, members, nonmembers, batch_size=batch_size)
    backdoor: dict[str, BackdoorResult] = {}
    for s in config.silos:
        p = s.poison
        if p is not None and p.backdoor_trigger is not None and p.backdoor_target is not None:
            backdoor[s.name] = backdoor_success(
                adapter,
                final,
                _sample(holdout_chats, max_examples, seed + 2),
                trigger=p.backdoor_trigger,
                target=p.backdoor_target,
                max_seq_len=msl,
                batch_size=batch_size,
            )
    clean = state.history[-1].global_eval if state.history else None
    return AuditReport(
        federation_id=config.federation_id,
        rounds=state.completed_rounds,
        mia=mia,
        backdoor=backdoor,
        clean={"exact_match": clean.exact_match, "loss": clean.loss} if clean else {},
    )


def plot_audit(report: AuditReport, title: str | None = None) -> bytes:
    """ROC curves of the membership-inference attacks (log-log, as in Carlini et al.) as PNG bytes."""
    import matplotlib  # ~0.4 s to import: only the tasks and commands that plot pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), so no display backend is needed

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, log in zip(axes, (False, True), strict=True):
        for name, r in report.mia.items():
            fpr, tpr = roc_curve(r.member_scores, r.nonmember_scores)
            ax.plot(fpr, tpr, label=f"{name} (AUC {r.auc:.3f}, TPR@1%FPR {r.tpr_at_1pct_fpr:.3f})")
        lo = 1e-3 if log else 0.0
        ax.plot([lo, 1], [lo, 1], color="grey", linestyle="--", linewidth=0.8, label="chance")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or f"membership inference: {report.federation_id} after {report.rounds} round(s)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def audit_markdown(report: AuditReport) -> str:
    lines = [
        f"# Audit of `{report.federation_id}` (after {report.rounds} round(s))",
        "",
        "| membership attack | ROC AUC | TPR @ 1% FPR | members | non-members |",
        "|---|---|---|---|---|",
    ]
    for n, r in report.mia.items():
        lines.append(
            f"| {n} | {r.auc:.3f} | {r.tpr_at_1pct_fpr:.3f} | {r.num_members} | {r.num_nonmembers} |"
        )
    if report.backdoor:
        lines += [
            "",
            "| backdoor of silo | attack success | false trigger | prompts |",
            "|---|---|---|---|",
        ]
        for s, b in report.backdoor.items():
            lines.append(
                f"| {s} | {b.attack_success_rate:.3f} | {b.false_trigger_rate:.3f} | {b.num_prompts} |"
            )
    if report.clean:
        lines += ["", "Clean holdout utility: " + ", ".join(f"{k} {v:.4f}" for k, v in report.clean.items())]
    lines += [
        "",
        "AUC 0.5 is chance. A LoRA adapter is not a privacy guarantee: only DP-SGD bounds what an "
        "adapter can reveal about a training example.",
    ]
    return "\n".join(lines)
