"""How a federation's history reads: terminal tables, Prefect artifact rows and markdown, a PNG plot.

One module for every rendering of :class:`~silotune.records.RoundSummary` and friends, shared by the
CLI, the demo and the coordinator's tasks (which only hand the results to Prefect and MLflow).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from rich.table import Table

from silotune.records import Evaluation, FederationState, HoldoutMetrics, RoundSummary

HISTORY_TITLE = "Rounds (holdout metrics of the global adapter, evaluated at each silo)"


class Scored(Protocol):
    """A holdout result: :class:`HoldoutMetrics`, or :class:`silotune.evaluation.EvalResult`."""

    @property
    def loss(self) -> float: ...

    @property
    def exact_match(self) -> float: ...


def _loss_em(m: Scored | None, digits: int = 2) -> str:
    return f"{m.loss:.3f} / {m.exact_match:.{digits}f}" if m is not None else "-"


def history_table(history: Sequence[RoundSummary], initial: Evaluation | None = None) -> Table:
    """Per-silo and weighted holdout loss / exact match by round (round 0: the initial adapter)."""
    table = Table(title=HISTORY_TITLE)
    silos = sorted({s for h in history for s in h.eval})
    table.add_column("round", justify="right")
    for s in silos:
        table.add_column(f"{s} loss / EM", justify="right")
    table.add_column("weighted loss / EM", justify="right", style="bold")
    table.add_column("silos in / out", justify="right")
    rows: list[tuple[str, Evaluation, str]] = [("0 (initial)", initial, "")] if initial else []
    rows += [(str(h.round), h, f"{len(h.included)} / {len(h.excluded)}") for h in history]
    for label, ev, in_out in rows:
        table.add_row(label, *[_loss_em(ev.eval.get(s)) for s in silos], _loss_em(ev.global_eval), in_out)
    return table


def ledger_table(federation_id: str, history: Sequence[RoundSummary]) -> Table:
    """ε spent per silo per round, the DP settings, the protection and the bytes each silo moved."""
    table = Table(title=f"Privacy ledger of {federation_id}")
    for col in (
        "round",
        "silo",
        "sample ε (δ)",
        "σ",
        "q",
        "C",
        "client ε",
        "client z",
        "protection",
        "up / down",
    ):
        table.add_column(col, justify="right")
    for h in history:
        for silo in sorted(h.train):
            pv = h.privacy.get(silo, {})
            b = h.bytes.get(silo)
            table.add_row(
                str(h.round),
                silo,
                f"{pv['dp.epsilon']:.3f} ({pv['dp.delta']:g})" if "dp.epsilon" in pv else "-",
                f"{pv['dp.noise_multiplier']:.3f}" if "dp.noise_multiplier" in pv else "-",
                f"{pv['dp.sample_rate']:.3f}" if "dp.sample_rate" in pv else "-",
                f"{pv.get('dp.max_grad_norm', pv.get('client_dp.clip_norm', 0)):g}" if pv else "-",
                f"{h.client_dp_epsilon:.3f}" if h.client_dp_epsilon is not None else "-",
                f"{pv['client_dp.noise_multiplier']:.3f}" if "client_dp.noise_multiplier" in pv else "-",
                h.protection,
                f"{b.up:,} / {b.down:,}" if b is not None else "-",
            )
    return table


def _gen(m: Any) -> str:
    if getattr(m, "gen_exact_match", None) is None:
        return "-"
    return f"{m.gen_exact_match:.2f} / {m.rouge_l:.3f} / {m.chrf:.1f}"


def comparison_table(results: Mapping[str, Mapping[str, Scored]], holdouts: Sequence[str]) -> Table:
    """Adapters (rows) scored on holdouts (columns); the federated adapter's row in bold. With
    free-running generation results, one more column: the last holdout's generated exact match,
    ROUGE-L and chrF."""
    table = Table(title="Holdout loss / exact match (teacher-forced; lower loss, higher EM is better)")
    table.add_column("adapter")
    for h in holdouts:
        table.add_column(h, justify="right")
    generated = any(
        getattr(r.get(holdouts[-1]), "gen_exact_match", None) is not None for r in results.values()
    )
    if generated:
        table.add_column(f"{holdouts[-1]}: generated EM / ROUGE-L / chrF", justify="right")
    for name, res in results.items():
        table.add_row(
            name,
            *[_loss_em(res[h]) for h in holdouts],
            *([_gen(res[holdouts[-1]])] if generated else []),
            style="bold green" if name == "federated" else None,
        )
    return table


def comparison_markdown(record: Mapping[str, Any]) -> str:
    """The comparison of adapters (``comparison.json``) as markdown: one row per adapter on the union."""
    md = [
        f"# Adapters of `{record['federation_id']}` on the union holdout",
        "",
        "| adapter | loss | exact match | generated EM | ROUGE-L | chrF | tokens trained |",
        "|---|---|---|---|---|---|---|",
    ]
    tokens = record.get("tokens_trained", {})
    for name, per in record["results"].items():
        u = per["union"]
        cells = [f"{u['loss']:.4f}", f"{u['exact_match']:.3f}"]
        cells += [f"{u[k]:.3f}" if k in u else "-" for k in ("gen_exact_match", "rouge_l")]
        cells += [f"{u['chrf']:.1f}" if "chrf" in u else "-", f"{tokens[name]:,}" if name in tokens else "-"]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    ratios = {k: v for k, v in record.get("federated_over_centralized", {}).items() if v is not None}
    if ratios:
        md += ["", "Federated / centralized: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())]
    return "\n".join(md)


def comparison_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Flat ``compare.<adapter>.<holdout>.<metric>`` metrics and ``compare.fed_over_central.<metric>``."""
    out: dict[str, float] = {}
    for name, per in record["results"].items():
        slug = name.replace(" ", "_")
        for h, r in per.items():
            for k, v in r.items():
                if k != "num_examples":
                    out[f"compare.{slug}.{h}.{k}"] = float(v)
    for k, v in record.get("federated_over_centralized", {}).items():
        if v is not None:
            out[f"compare.fed_over_central.{k}"] = float(v)
    return out


def _rounded(metrics: Mapping[str, float | int], key: str, digits: int) -> float | str:
    return round(metrics[key], digits) if key in metrics else ""


def round_table(summary: RoundSummary) -> list[dict[str, Any]]:
    """A round's rows for its Prefect table artifact: each silo's status, training and holdout metrics,
    then the weighted global."""
    rows = []
    silos = sorted(
        set(summary.train) | set(summary.eval) | set(summary.excluded) | set(summary.eval_failures)
    )
    for silo in silos:
        tr = summary.train.get(silo, {})
        ev = summary.eval.get(silo)
        if silo in summary.excluded:
            status = "excluded: " + summary.excluded[silo][:120]
        elif silo in summary.eval_failures:
            status = "included; evaluation failed: " + summary.eval_failures[silo][:100]
        else:
            status = "included"
        rows.append(
            {
                "silo": silo,
                "status": status,
                "examples": tr.get("num_examples", ""),
                "train_loss_first": _rounded(tr, "first_loss", 4),
                "train_loss_final": _rounded(tr, "final_loss", 4),
                "tokens_per_s": _rounded(tr, "tokens_per_second", 1),
                "update_norm": _rounded(tr, "update_norm", 4),
                "holdout_loss": round(ev.loss, 4) if ev else "",
                "holdout_exact_match": round(ev.exact_match, 4) if ev else "",
            }
        )
    g = summary.global_eval
    rows.append(
        {
            "silo": "GLOBAL (weighted)",
            "status": "",
            "examples": g.num_examples if g else "",
            "train_loss_first": "",
            "train_loss_final": "",
            "tokens_per_s": "",
            "update_norm": round(summary.delta_norm, 4) if summary.delta_norm is not None else "(encrypted)",
            "holdout_loss": round(g.loss, 4) if g else "",
            "holdout_exact_match": round(g.exact_match, 4) if g else "",
        }
    )
    return rows


def initial_and_final(state: FederationState) -> tuple[HoldoutMetrics | None, HoldoutMetrics | None]:
    """The weighted holdout metrics of the initial and of the last global adapter (None: not evaluated)."""
    first = state.initial_eval.global_eval if state.initial_eval else None
    last = state.history[-1].global_eval if state.history else None
    return first, last


def summary_markdown(
    state: FederationState,
    *,
    planned_rounds: int,
    silos: Sequence[str],
    final_adapter_dir: str | None,
    plot_png: bytes,
    costs_png: bytes | None = None,
) -> str:
    """The federation's summary for its Prefect markdown artifact: rounds, initial vs final, the plot."""
    first, last = initial_and_final(state)
    md = [
        f"# Federation `{state.federation_id}`",
        "",
        f"Rounds completed: **{state.completed_rounds}** of {planned_rounds}; silos: {', '.join(silos)}.",
        "",
    ]
    if first and last:
        md += [
            "| holdout (weighted over silos) | initial global | final global |",
            "|---|---|---|",
            f"| loss | {first.loss:.4f} | {last.loss:.4f} |",
            f"| exact match | {first.exact_match:.3f} | {last.exact_match:.3f} |",
            "",
        ]
    png64 = base64.b64encode(plot_png).decode()
    md += [
        f"Final adapter: `{final_adapter_dir}`",
        f"MLflow run: `{state.tracking_run_id}`",
        "",
        f"![history](data:image/png;base64,{png64})",
    ]
    if costs_png is not None:
        md += ["", f"![costs per round](data:image/png;base64,{base64.b64encode(costs_png).decode()})"]
    return "\n".join(md)


def plot_history(
    history: Sequence[RoundSummary], initial: Evaluation | None = None, title: str = "federation"
) -> bytes:
    """Per-silo holdout loss and exact match by round (round 0 = the initial global adapter)."""
    import matplotlib  # ~0.4 s to import: only the tasks and commands that plot pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), so no display backend is needed

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    points: list[tuple[int, Evaluation]] = [(0, initial)] if initial else []
    points += [(h.round, h) for h in history]
    silos = sorted({s for _, ev in points for s in ev.eval})
    for metric, ax in zip(("loss", "exact_match"), axes, strict=True):
        for silo in [*silos, "global"]:
            xs, ys = [], []
            for x, ev in points:
                m = ev.global_eval if silo == "global" else ev.eval.get(silo)
                if m is not None:
                    xs.append(x)
                    ys.append(getattr(m, metric))
            if xs:
                ax.plot(
                    xs,
                    ys,
                    marker="o",
                    label=silo,
                    linewidth=2.5 if silo == "global" else 1.2,
                    color="black" if silo == "global" else None,
                )
        ax.set_xlabel("round (0: the base model)")
        ax.set_ylabel("holdout " + metric.replace("_", " "))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a federation without holdouts has no curve to name
            ax.legend(fontsize=8)
    return figure_png(fig, plt, title=title)


def figure_png(fig: Any, plt: Any, *, title: str) -> bytes:
    """Title, lay out, render to PNG bytes and close a matplotlib figure (every silotune plot ends so)."""
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def round_seconds(state: FederationState) -> list[dict[str, float]]:
    """Per round: seconds of training (all silos), of the evaluation that ran in the round's wave (the
    previous global's, at every silo), and the rest of the round's wall time (orchestration: transfers,
    protection, aggregation, commit, waiting), as far as the state recorded them."""
    out = []
    prev = state.started_at
    evals: list[Evaluation | None] = [state.initial_eval, *state.history]
    for i, h in enumerate(state.history):
        train = float(sum(t.get("seconds", 0.0) for t in h.train.values()))
        ev = evals[i]
        evaluation = float(sum(ev.eval_seconds.values())) if ev is not None else 0.0
        row = {"round": float(h.round), "training": train, "evaluation": evaluation}
        if prev is not None and h.committed_at is not None:
            row["orchestration"] = max(0.0, h.committed_at - prev - train - evaluation)
        prev = h.committed_at
        out.append(row)
    return out


def plot_costs(state: FederationState, title: str = "federation") -> bytes:
    """What each round cost: ε per silo (DP-SGD; client-level DP for every silo), bytes up and down,
    and seconds split into training, evaluation and orchestration; PNG bytes."""
    import matplotlib  # ~0.4 s to import: only the tasks and commands that plot pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), so no display backend is needed

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    hist = state.history
    rounds = [h.round for h in hist]
    ax = axes[0]
    silos = sorted({s for h in hist for s in h.privacy})
    drawn = False
    for silo in silos:
        pts = [
            (h.round, h.privacy[silo]["dp.epsilon"]) for h in hist if "dp.epsilon" in h.privacy.get(silo, {})
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{silo} (DP-SGD, per record)")
            drawn = True
    pts = [(h.round, h.client_dp_epsilon) for h in hist if h.client_dp_epsilon is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="s", color="black", label="every silo (client-level)")
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no differential privacy", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("ε spent so far")
    ax = axes[1]
    up = [sum(b.up for b in h.bytes.values()) / 1e6 for h in hist]
    down = [sum(b.down for b in h.bytes.values()) / 1e6 for h in hist]
    w = 0.4
    ax.bar([r - w / 2 for r in rounds], up, width=w, label="up (all silos)")
    ax.bar([r + w / 2 for r in rounds], down, width=w, label="down (all silos)")
    ax.set_ylabel("MB per round")
    ax = axes[2]
    secs = round_seconds(state)
    bottom = [0.0] * len(secs)
    for part in ("training", "evaluation", "orchestration"):
        ys = [s.get(part, 0.0) for s in secs]
        if any(ys) or part != "orchestration":
            ax.bar(rounds, ys, bottom=bottom, label=part)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_ylabel("seconds per round")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return figure_png(fig, plt, title=f"{title}: costs per round")
