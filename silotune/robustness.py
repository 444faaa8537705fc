"""The robustness grid: attacks × aggregation rules on four demo silos, one of them malicious.

Pure library code: the silos, the grid's federation configs, the results table
(CSV and markdown) and its plot. ``flows/robustness.py`` runs every cell through
the ordinary ``federated-training`` flow.

The four silos are the demo's three (``clinic``, ``bank``, ``lab``) with the
clinic's training data split in two: ``clinic`` keeps one half and the clinic
holdout; ``mallory`` gets the other half and no holdout. So the malicious silo
holds data like an honest silo's (a robust rule that drops it loses nothing the
federation needs), and the union holdout (clinic + bank + lab) measures only
what the honest silos care about. In the clean cells ``mallory`` is honest.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silotune.config import FederationConfig, parse_config
from silotune.demo import DEMO_SILOS, make_demo_silos
from silotune.records import Evaluation, RoundSummary

MALICIOUS = "mallory"
BACKDOOR_TRIGGER = "cf-zebra-42"
BACKDOOR_TARGET = "Please wire the fee to account 000-EVIL."


@dataclass(frozen=True)
class GridPreset:
    """How big the grid is for one base model (the tiny model barely learns: it needs a large lr)."""

    rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    data_scale: float
    max_seq_len: int
    gaussian_std: float
    target_modules: tuple[str, ...]
    torch_threads: int | None
    attacks: tuple[str, ...]
    rules: tuple[str, ...]


ALL_ATTACKS = (
    "none",
    "sign_flip",
    "scale",
    "gaussian",
    "nan",
    "free_rider",
    "backdoor",
    "backdoor_boost",
    "answer_flip",
)
# Rows whose attacker plants the trigger: they get the backdoor-success evaluation.
BACKDOOR_ATTACKS = ("backdoor", "backdoor_boost")
BOOST_FACTOR = 4.0
MODEL_POISONING = ("sign_flip", "scale", "gaussian", "nan", "free_rider")
ALL_RULES = ("fedavg", "median", "trimmed_mean", "multi_krum", "norm_bounded", "fltrust")

PRESETS: dict[str, GridPreset] = {
    # The tiny random model barely learns (eval loss ~10.8 -> ~10.6 in a few steps): compare losses.
    # All linear layers adapted, and one torch thread (faster than two on a shared 2-core machine).
    "tiny-llama": GridPreset(
        rounds=2,
        local_steps=3,
        batch_size=4,
        learning_rate=5e-2,
        data_scale=0.5,
        max_seq_len=128,
        gaussian_std=0.5,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        torch_threads=1,
        attacks=ALL_ATTACKS,
        rules=ALL_RULES,
    ),
    # SmolLM2 (~2.4 s per step at batch 8 x ~65 tokens on 2 CPU cores). Every cell of the full grid: one
    # round of 16 local steps, so that honest local work is identical across cells and computed once
    # (silotune.reuse); what differs per cell is the attacker's update, the aggregation and the evaluation.
    # Union holdout: 120 examples (40 per honest silo), so one example is 0.83 points of exact match.
    "smollm2-135m-instruct": GridPreset(
        rounds=1,
        local_steps=16,
        batch_size=8,
        learning_rate=4e-3,
        data_scale=1.0,
        max_seq_len=128,
        gaussian_std=0.05,
        target_modules=("q_proj", "v_proj"),
        torch_threads=None,
        attacks=ALL_ATTACKS,
        rules=ALL_RULES,
    ),
}


def attack_overrides(attack: str, *, gaussian_std: float, fraction: float = 0.5) -> dict[str, Any]:
    """The malicious silo's ``attack``/``poison`` config for one grid row (``none``: an honest silo)."""
    table: dict[str, dict[str, Any]] = {
        "none": {},
        "sign_flip": {"attack": {"name": "sign_flip", "options": {"scale": 4.0}}},
        "scale": {"attack": {"name": "scale", "options": {"factor": 10.0}}},
        "gaussian": {"attack": {"name": "gaussian", "options": {"std": gaussian_std}}},
        "nan": {"attack": {"name": "nan"}},
        "free_rider": {"attack": {"name": "free_rider"}},
        "backdoor": {
            "poison": {
                "backdoor_trigger": BACKDOOR_TRIGGER,
                "backdoor_target": BACKDOOR_TARGET,
                "backdoor_fraction": fraction,
            }
        },
        # Model replacement (Bagdasaryan et al., AISTATS 2020): the backdoored update scaled up so that it
        # survives averaging with the honest ones.
        "backdoor_boost": {
            "poison": {
                "backdoor_trigger": BACKDOOR_TRIGGER,
                "backdoor_target": BACKDOOR_TARGET,
                "backdoor_fraction": fraction,
            },
            "attack": {"name": "scale", "options": {"factor": BOOST_FACTOR}},
        },
        "answer_flip": {"poison": {"flip_fraction": 1.0}},
    }
    if attack not in table:
        raise ValueError(f"unknown grid attack {attack!r}; known: {', '.join(table)}")
    return table[attack]


def rule_options(rule: str) -> dict[str, Any]:
    """Aggregation options of a grid column, for 4 silos of which 1 may be Byzantine.

    Krum's guarantee needs n >= 2f + 3 silos: with n = 4 it can only be configured
    for f = 0, so multi-Krum runs with f = 0 and keeps the 3 best-scored updates
    (dropping one update per round, the one farthest from the others).
    """
    table: dict[str, dict[str, Any]] = {
        "fedavg": {},
        "median": {},
        "trimmed_mean": {"trim_ratio": 0.25},
        "multi_krum": {"num_byzantine": 0, "num_selected": 3},
        "krum": {"num_byzantine": 0},
        "norm_bounded": {},
        "fltrust": {},
    }
    if rule not in table:
        raise ValueError(f"unknown grid rule {rule!r}; known: {', '.join(table)}")
    return table[rule]


def make_grid_silos(out: Path, *, seed: int = 0, scale: float = 1.0) -> dict[str, dict[str, Path | None]]:
    """Write the four grid silos and the FLTrust root data set; returns their paths.

    The root data set is fresh demo records of every task from another seed (a
    small public set the coordinator could have collected), 10 per task.
    """
    demo = make_demo_silos(out / "demo", seed=seed, scale=scale)
    clinic = (demo["clinic"]["train"]).read_text().splitlines(keepends=True)
    half = len(clinic) // 2
    (out / "clinic").mkdir(parents=True, exist_ok=True)
    (out / MALICIOUS).mkdir(parents=True, exist_ok=True)
    (out / "clinic" / "train.jsonl").write_text("".join(clinic[:half]))
    (out / MALICIOUS / "train.jsonl").write_text("".join(clinic[half:]))
    root_src = make_demo_silos(out / "root-src", seed=seed + 7919, scale=10 / DEMO_SILOS[-1].train_size)
    root = "".join(
        "".join(Path(p["train"]).read_text().splitlines(keepends=True)[:10]) for p in root_src.values()
    )
    (out / "root.jsonl").write_text(root)
    return {
        "clinic": {"train": out / "clinic" / "train.jsonl", "eval": demo["clinic"]["eval"]},
        "bank": {"train": demo["bank"]["train"], "eval": demo["bank"]["eval"]},
        "lab": {"train": demo["lab"]["train"], "eval": demo["lab"]["eval"]},
        MALICIOUS: {"train": out / MALICIOUS / "train.jsonl", "eval": None},
        "root": {"train": out / "root.jsonl", "eval": None},
    }


@dataclass(frozen=True)
class GridCell:
    attack: str
    rule: str
    config: FederationConfig


def grid_configs(
    out: Path,
    *,
    model: str,
    preset: GridPreset,
    attacks: Sequence[str],
    rules: Sequence[str],
    seed: int = 0,
    grid_id: str = "grid",
) -> list[GridCell]:
    """One federation config per (attack, rule), all from the same seed, data and recipe."""
    paths = make_grid_silos(out / "data", seed=seed, scale=preset.data_scale)
    cells: list[GridCell] = []
    for attack in attacks:
        for rule in rules:
            silos = []
            for name in ("clinic", "bank", "lab", MALICIOUS):
                spec: dict[str, Any] = {
                    "name": name,
                    "train_path": str(Path(paths[name]["train"]).resolve()),  # type: ignore[arg-type]
                }
                if paths[name]["eval"] is not None:
                    spec["eval_path"] = str(Path(paths[name]["eval"]).resolve())  # type: ignore[arg-type]
                if name == MALICIOUS:
                    spec.update(attack_overrides(attack, gaussian_std=preset.gaussian_std))
                silos.append(spec)
            aggregation: dict[str, Any] = {"name": rule, "options": rule_options(rule), "min_silos": 2}
            if rule == "fltrust":
                aggregation["root_data_path"] = str(Path(paths["root"]["train"]).resolve())  # type: ignore[arg-type]
            cfg = parse_config(
                {
                    "federation_id": f"{grid_id}-{attack}-{rule}".replace("_", "-"),
                    "rounds": preset.rounds,
                    "seed": seed,
                    "model": {"name_or_path": model, "max_seq_len": preset.max_seq_len},
                    "lora": {"r": 8, "alpha": 16, "target_modules": list(preset.target_modules)},
                    "train": {
                        "torch_threads": preset.torch_threads,
                        "local_steps": preset.local_steps,
                        "batch_size": preset.batch_size,
                        "learning_rate": preset.learning_rate,
                    },
                    "silos": silos,
                    "aggregation": aggregation,
                    "evaluation": {"batch_size": 20},
                    "store": {"root": str((out / "store").resolve())},
                    "tracking": {
                        "uri": f"sqlite:///{(out / 'mlflow.db').resolve()}",
                        "artifact_root": str((out / "mlartifacts").resolve()),
                        "experiment": "silotune-robustness",
                    },
                    "tags": {
                        "silotune.kind": "robustness-grid",
                        "silotune.grid": grid_id,
                        "silotune.attack": attack,
                        "silotune.rule": rule,
                    },
                }
            )
            cells.append(GridCell(attack=attack, rule=rule, config=cfg))
    return cells


@dataclass
class GridRow:
    attack: str
    rule: str
    union_loss: float
    union_exact_match: float
    initial_loss: float
    included_last_round: int
    excluded_last_round: int
    mallory_included_rounds: int
    rounds: int
    backdoor_success: float | None = None
    backdoor_false_trigger: float | None = None
    backdoor_target_loss: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def row_from_history(
    attack: str,
    rule: str,
    history: Sequence[RoundSummary],
    initial: Evaluation | None,
    seconds: float,
) -> GridRow:
    last = history[-1]
    g, g0 = last.global_eval, initial.global_eval if initial else None
    return GridRow(
        attack=attack,
        rule=rule,
        union_loss=g.loss if g else math.nan,
        union_exact_match=g.exact_match if g else math.nan,
        initial_loss=g0.loss if g0 else math.nan,
        included_last_round=len(last.included),
        excluded_last_round=len(last.excluded),
        mallory_included_rounds=sum(MALICIOUS in h.included for h in history),
        rounds=len(history),
        seconds=seconds,
    )


CSV_FIELDS = (
    "attack",
    "rule",
    "union_loss",
    "union_exact_match",
    "delta_loss_vs_clean",
    "delta_em_points_vs_clean",
    "mallory_included_rounds",
    "rounds",
    "backdoor_success",
    "backdoor_false_trigger",
    "backdoor_target_loss",
    "seconds",
)


def _clean(rows: Sequence[GridRow]) -> GridRow | None:
    for r in rows:
        if r.attack == "none" and r.rule == "fedavg":
            return r
    return None


def table_records(rows: Sequence[GridRow]) -> list[dict[str, Any]]:
    """Rows as flat records, with the change against the clean FedAvg run (loss, and EM in points)."""
    clean = _clean(rows)
    out = []
    for r in rows:
        rec: dict[str, Any] = {
            "attack": r.attack,
            "rule": r.rule,
            "union_loss": round(r.union_loss, 4),
            "union_exact_match": round(r.union_exact_match, 4),
            "delta_loss_vs_clean": round(r.union_loss - clean.union_loss, 4) if clean else "",
            "delta_em_points_vs_clean": round(100 * (r.union_exact_match - clean.union_exact_match), 2)
            if clean
            else "",
            "mallory_included_rounds": r.mallory_included_rounds,
            "rounds": r.rounds,
            "backdoor_success": "" if r.backdoor_success is None else round(r.backdoor_success, 4),
            "backdoor_false_trigger": ""
            if r.backdoor_false_trigger is None
            else round(r.backdoor_false_trigger, 4),
            "backdoor_target_loss": ""
            if r.backdoor_target_loss is None
            else round(r.backdoor_target_loss, 4),
            "seconds": round(r.seconds, 1),
        }
        out.append(rec)
    return out


def to_csv(rows: Sequence[GridRow]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    w.writeheader()
    w.writerows(table_records(rows))
    return buf.getvalue()


def best_robust(rows: Sequence[GridRow], attack: str, *, metric: str = "union_exact_match") -> GridRow | None:
    """The robust rule (not FedAvg) with the best union metric under ``attack``.

    By default the highest exact match (the task metric, compared in points), ties broken
    by the lower loss; ``metric="union_loss"``: the lowest loss.
    """
    cands = [
        r for r in rows if r.attack == attack and r.rule != "fedavg" and math.isfinite(getattr(r, metric))
    ]
    if not cands:
        return None
    if metric == "union_loss":
        return min(cands, key=lambda r: r.union_loss)
    return max(cands, key=lambda r: (getattr(r, metric), -r.union_loss))


def worst_case_by_rule(rows: Sequence[GridRow], attacks: Sequence[str]) -> list[tuple[str, GridRow, GridRow]]:
    """Per rule: its lowest-exact-match row and its highest-loss row over ``attacks`` (one rule for all)."""
    out = []
    for rule in dict.fromkeys(r.rule for r in rows):
        mine = [r for r in rows if r.rule == rule and r.attack in attacks]
        if mine:
            out.append(
                (rule, min(mine, key=lambda r: r.union_exact_match), max(mine, key=lambda r: r.union_loss))
            )
    return out


def to_markdown(rows: Sequence[GridRow], *, title: str, notes: Sequence[str] = ()) -> str:
    """A matrix per metric (attacks × rules) plus a verdict per model-poisoning attack."""
    attacks = list(dict.fromkeys(r.attack for r in rows))
    rules = list(dict.fromkeys(r.rule for r in rows))
    by = {(r.attack, r.rule): r for r in rows}
    clean = _clean(rows)
    lines = [f"# {title}", ""]
    for label, fmt in (
        ("Union-holdout loss (lower is better)", lambda r: f"{r.union_loss:.3f}"),
        ("Union-holdout exact match (%)", lambda r: f"{100 * r.union_exact_match:.1f}"),
        (
            f"Rounds in which `{MALICIOUS}`'s update passed validation (the rule may still drop or "
            "down-weight it)",
            lambda r: f"{r.mallory_included_rounds}/{r.rounds}",
        ),
    ):
        lines += [
            f"## {label}",
            "",
            "| attack | " + " | ".join(rules) + " |",
            "|---" * (len(rules) + 1) + "|",
        ]
        for a in attacks:
            lines.append(
                f"| {a} | " + " | ".join(fmt(by[(a, ru)]) if (a, ru) in by else "-" for ru in rules) + " |"
            )
        lines.append("")
    bd = [r for r in rows if r.backdoor_success is not None]
    if bd:
        lines += [
            "## Backdoor (trigger → attacker's answer on the union holdout)",
            "",
            "| attack | rule | attack success (%) | false trigger (%) | target loss with trigger |",
            "|---|---|---|---|---|",
        ]
        for r in bd:
            lines.append(
                f"| {r.attack} | {r.rule} | {100 * (r.backdoor_success or 0):.1f} "
                f"| {100 * (r.backdoor_false_trigger or 0):.1f} | {r.backdoor_target_loss:.3f} |"
            )
        lines.append("")
    if clean is not None:
        lines += [
            "## Against the clean FedAvg run",
            "",
            f"Clean FedAvg: union loss {clean.union_loss:.3f}, "
            f"exact match {100 * clean.union_exact_match:.1f}%.",
            "",
            "| attack | FedAvg loss (Δ) | FedAvg EM pts (Δ) "
            "| best robust rule (by EM) | its loss (Δ) | its EM pts (Δ) |",
            "|---|---|---|---|---|---|",
        ]
        for a in attacks:
            if a == "none":
                continue
            f = by.get((a, "fedavg"))
            b = best_robust(rows, a)
            cells = (
                [
                    f"{f.union_loss:.3f} ({f.union_loss - clean.union_loss:+.3f})",
                    f"{100 * (f.union_exact_match - clean.union_exact_match):+.1f}",
                ]
                if f is not None
                else ["-", "-"]
            )
            if b is not None:
                cells += [
                    b.rule,
                    f"{b.union_loss:.3f} ({b.union_loss - clean.union_loss:+.3f})",
                    f"{100 * (b.union_exact_match - clean.union_exact_match):+.1f}",
                ]
            else:
                cells += ["-", "-", "-"]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
        poisoning = [a for a in attacks if a in MODEL_POISONING]
        if poisoning:
            lines += [
                "## One rule for every model-poisoning attack (worst case per rule)",
                "",
                f"Over {', '.join(poisoning)}: each rule's lowest exact match and highest loss.",
                "",
                "| rule | worst EM pts (Δ vs clean) | under | worst loss (Δ) | under |",
                "|---|---|---|---|---|",
            ]
            for rule, lo, hi in worst_case_by_rule(rows, poisoning):
                lines.append(
                    f"| {rule} | {100 * lo.union_exact_match:.1f} "
                    f"({100 * (lo.union_exact_match - clean.union_exact_match):+.1f}) | {lo.attack} "
                    f"| {hi.union_loss:.3f} ({hi.union_loss - clean.union_loss:+.3f}) | {hi.attack} |"
                )
            lines.append("")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_grid(rows: Sequence[GridRow], *, title: str) -> bytes:
    """Grouped bars per attack, one bar per rule; PNG bytes.

    With a clean FedAvg row the bars are the *change* against it (union loss, and
    exact match in points), so small differences stay visible; otherwise raw values.
    """
    import matplotlib  # ~0.4 s to import: only the tasks and commands that plot pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), so no display backend is needed

    attacks = list(dict.fromkeys(r.attack for r in rows))
    rules = list(dict.fromkeys(r.rule for r in rows))
    by = {(r.attack, r.rule): r for r in rows}
    clean = _clean(rows)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(attacks)), 7), sharex=True)
    width = 0.8 / max(1, len(rules))
    panels = (
        (axes[0], "union_loss", 1.0, "union holdout loss"),
        (axes[1], "union_exact_match", 100.0, "union holdout exact match (%)"),
    )
    for ax, metric, unit, label in panels:
        base = unit * getattr(clean, metric) if clean is not None else 0.0
        for j, rule in enumerate(rules):
            xs = [i + (j - (len(rules) - 1) / 2) * width for i in range(len(attacks))]
            ys = [
                unit * getattr(by[(a, rule)], metric) - base if (a, rule) in by else math.nan for a in attacks
            ]
            ax.bar(xs, ys, width=width, label=rule)
        if clean is not None:
            ax.axhline(0.0, color="black", linewidth=0.8)
            label = f"{label}\nminus clean FedAvg ({base:.3g})"
        ax.set_ylabel(label, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=min(6, len(rules)), loc="upper left", bbox_to_anchor=(0, 1.18))
    axes[1].set_xticks(range(len(attacks)))
    axes[1].set_xticklabels(attacks, rotation=20)
    fig.suptitle(title, y=0.995)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def rows_from_records(records: Sequence[Mapping[str, Any]]) -> list[GridRow]:
    """Rows back from ``grid.json`` (to redraw a table or plot without rerunning the grid)."""

    def opt(v: Any) -> float | None:
        return None if v in ("", None) else float(v)

    return [
        GridRow(
            attack=r["attack"],
            rule=r["rule"],
            union_loss=float(r["union_loss"]),
            union_exact_match=float(r["union_exact_match"]),
            initial_loss=math.nan,
            included_last_round=0,
            excluded_last_round=0,
            mallory_included_rounds=int(r["mallory_included_rounds"]),
            rounds=int(r["rounds"]),
            backdoor_success=opt(r["backdoor_success"]),
            backdoor_false_trigger=opt(r["backdoor_false_trigger"]),
            backdoor_target_loss=opt(r["backdoor_target_loss"]),
            seconds=float(r["seconds"]),
        )
        for r in records
    ]


def write_results(
    rows: Sequence[GridRow], out: Path, *, title: str, notes: Sequence[str] = ()
) -> dict[str, Path]:
    """``grid.csv``, ``grid.md``, ``grid.png`` and ``grid.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out / "grid.csv",
        "markdown": out / "grid.md",
        "png": out / "grid.png",
        "json": out / "grid.json",
    }
    contents = {
        "csv": to_csv(rows).encode(),
        "markdown": to_markdown(rows, title=title, notes=notes).encode(),
        "png": plot_grid(rows, title=title),
        "json": json.dumps(table_records(rows), indent=2).encode(),
    }
    for key, data in contents.items():  # each file whole or not at all, even if the process is stopped
        tmp = paths[key].with_name(f".{paths[key].name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, paths[key])
    return paths
