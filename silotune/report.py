"""Plots of a federation's history (PNG bytes, for MLflow and Prefect artifacts)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any


def plot_history(
    history: Sequence[Mapping[str, Any]], initial: Mapping[str, Any] | None = None, title: str = "federation"
) -> bytes:
    """Per-silo holdout loss and exact match by round (round 0 = the initial global adapter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    silos = sorted({s for h in history for s in h.get("eval", {})} | set((initial or {}).get("eval", {})))
    for metric, ax in zip(("loss", "exact_match"), axes, strict=True):
        for silo in [*silos, "global"]:
            xs, ys = [], []
            if initial:
                src = (
                    initial.get("global_eval", {})
                    if silo == "global"
                    else initial.get("eval", {}).get(silo, {})
                )
                if metric in src:
                    xs.append(0)
                    ys.append(src[metric])
            for h in history:
                src = h.get("global_eval", {}) if silo == "global" else h.get("eval", {}).get(silo, {})
                if metric in src:
                    xs.append(h["round"])
                    ys.append(src[metric])
            if xs:
                ax.plot(
                    xs,
                    ys,
                    marker="o",
                    label=silo,
                    linewidth=2.5 if silo == "global" else 1.2,
                    color="black" if silo == "global" else None,
                )
        ax.set_xlabel("round")
        ax.set_ylabel("holdout " + metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
