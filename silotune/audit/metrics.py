"""ROC AUC and TPR at a fixed FPR for membership-inference scores (higher score = "member").

Small and dependency-free on purpose: these numbers are what an audit reports,
so they are computed by code short enough to check by hand (see the tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check(members: Sequence[float], nonmembers: Sequence[float]) -> None:
    if not members or not nonmembers:
        raise ValueError(
            f"need at least one member and one non-member score, got {len(members)} and {len(nonmembers)}"
        )
    if not all(math.isfinite(s) for s in [*members, *nonmembers]):
        raise ValueError("scores must be finite")


def roc_auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(member score > non-member score) + ½·P(equal): the area under the ROC curve.

    The Mann-Whitney form, by sorting (O(n log n)); ties count one half. 0.5 is
    chance, 1.0 a perfect attack.
    """
    _check(members, nonmembers)
    tagged = sorted([(s, 1) for s in members] + [(s, 0) for s in nonmembers])
    # Rank sum of the members, with tied scores sharing their average rank.
    rank_sum = 0.0
    i = 0
    while i < len(tagged):
        j = i
        while j < len(tagged) and tagged[j][0] == tagged[i][0]:
            j += 1
        avg_rank = (i + 1 + j) / 2  # ranks i+1 .. j
        rank_sum += avg_rank * sum(t for _, t in tagged[i:j])
        i = j
    m, n = len(members), len(nonmembers)
    return (rank_sum - m * (m + 1) / 2) / (m * n)


def roc_curve(members: Sequence[float], nonmembers: Sequence[float]) -> tuple[list[float], list[float]]:
    """``(fpr, tpr)`` of the rule "member if score >= t" for every distinct threshold t.

    Starts at (0, 0) and ends at (1, 1).
    """
    _check(members, nonmembers)
    fpr, tpr = [0.0], [0.0]
    for t in sorted(set(members) | set(nonmembers), reverse=True):
        fpr.append(sum(s >= t for s in nonmembers) / len(nonmembers))
        tpr.append(sum(s >= t for s in members) / len(members))
    return fpr, tpr


def tpr_at_fpr(members: Sequence[float], nonmembers: Sequence[float], fpr: float = 0.01) -> float:
    """The highest TPR of any threshold whose FPR is at most ``fpr`` (Carlini et al., S&P 2022).

    With fewer than ``1 / fpr`` non-members the only admissible thresholds are
    those with no false positive at all, so the number is pessimistic for small audits.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr!r}")
    f, t = roc_curve(members, nonmembers)
    return max(tp for fp, tp in zip(f, t, strict=True) if fp <= fpr)
