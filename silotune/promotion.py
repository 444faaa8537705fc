"""The promotion gate of the model registry: does a new version replace the champion?

Each registered version carries the federation's weighted holdout metrics of its final global adapter
as tags (``silotune.holdout.<metric>``), and what that holdout was (which silos, how many examples).
A new version becomes the ``champion`` only if it beats the current champion's recorded value by the
configured margin, on the same holdout; otherwise it is the ``challenger``. The decision and its
reason are written to the new version's tags either way, so the registry says why each alias is where
it is. This module decides; :class:`silotune.tracking.MlflowTracker` reads and writes the registry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from silotune.config import PromotionSpec
from silotune.records import HoldoutMetrics

CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_TAG = "silotune.holdout."
HOLDOUT_TAG = "silotune.holdout"  # what the metrics were measured on: the silos and their examples
ALIAS_TAG = "silotune.promotion"
REASON_TAG = "silotune.promotion.reason"


@dataclass(frozen=True)
class Decision:
    alias: str  # CHAMPION or CHALLENGER
    reason: str


def holdout_tags(metrics: HoldoutMetrics | None, silos: Sequence[str]) -> dict[str, str]:
    """The tags that record a version's holdout metrics and what the holdout was."""
    if metrics is None:
        return {}
    tags = {f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.as_dict().items() if k != "num_examples"}
    tags[HOLDOUT_TAG] = f"silos={','.join(sorted(silos))}; examples={metrics.num_examples}"
    return tags


def decide(
    spec: PromotionSpec,
    candidate: Mapping[str, str],
    champion: Mapping[str, str] | None,
    *,
    champion_version: str | None = None,
) -> Decision:
    """Whether the version tagged ``candidate`` becomes the champion over the one tagged ``champion``."""
    key = f"{METRIC_TAG}{spec.metric}"
    if champion is None:
        return Decision(CHAMPION, "the first version of this model: there is no champion to beat")
    who = f"champion v{champion_version}" if champion_version else "the champion"
    if key not in candidate:
        return Decision(
            CHALLENGER,
            f"this version has no holdout {spec.metric!r} (no silo evaluated it), so it cannot be shown to "
            f"beat {who}",
        )
    if key not in champion:
        return Decision(
            CHALLENGER,
            f"{who} has no recorded holdout {spec.metric!r} to compare with; set the alias by hand if this "
            "version should replace it",
        )
    if candidate.get(HOLDOUT_TAG) != champion.get(HOLDOUT_TAG):
        return Decision(
            CHALLENGER,
            f"measured on another holdout than {who} ({candidate.get(HOLDOUT_TAG)} vs "
            f"{champion.get(HOLDOUT_TAG)}): the values are not comparable",
        )
    new, old = float(candidate[key]), float(champion[key])
    if not math.isfinite(new):
        return Decision(CHALLENGER, f"holdout {spec.metric} is {new}")
    better = new < old - spec.margin if spec.direction == "minimize" else new > old + spec.margin
    sign = "-" if spec.direction == "minimize" else "+"
    need = f"{'<' if spec.direction == 'minimize' else '>'} {old:.6g} {sign} margin {spec.margin:g}"
    if better:
        return Decision(CHAMPION, f"holdout {spec.metric} {new:.6g} {need} of {who}: promoted")
    return Decision(CHALLENGER, f"holdout {spec.metric} {new:.6g} is not {need} of {who}: not promoted")
