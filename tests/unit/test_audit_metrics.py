"""ROC AUC and TPR at low FPR against hand-worked examples and a brute-force reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silotune.audit.metrics import roc_auc, roc_curve, tpr_at_fpr


def brute_auc(m: list[float], n: list[float]) -> float:
    return sum((a > b) + 0.5 * (a == b) for a in m for b in n) / (len(m) * len(n))


@pytest.mark.parametrize(
    ("members", "nonmembers", "auc"),
    [
        ([0.9, 0.8], [0.1, 0.2], 1.0),
        ([0.1, 0.2], [0.9, 0.8], 0.0),
        ([0.5, 0.5], [0.5, 0.5], 0.5),
        ([0.9, 0.4], [0.5, 0.1], 0.75),  # pairs: 0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1
        ([3.0, 1.0, 2.0], [2.0], 0.5),  # one win, one tie, one loss: (1 + 0.5) / 3
    ],
)
def test_auc_hand_worked(members, nonmembers, auc) -> None:
    assert roc_auc(members, nonmembers) == pytest.approx(auc)


@settings(max_examples=60, deadline=None)
@given(
    m=st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=15),
    n=st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=15),
)
def test_auc_matches_brute_force_with_ties(m, n) -> None:
    assert roc_auc(m, n) == pytest.approx(brute_auc(m, n))


def test_tpr_at_fpr_hand_worked() -> None:
    members = [10.0, 9.0, 3.0, 2.0]
    nonmembers = [8.0, 5.0] + [float(x) for x in range(-98, 0)]  # 100 non-members, two score high
    # FPR <= 1%: one false positive allowed, so the threshold is in (5, 8]: members 10, 9 caught.
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.5
    # FPR 0: the threshold must exceed 8: still 10 and 9.
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.5
    # FPR <= 2%: the threshold may drop to 2 (false positives 8 and 5): every member.
    assert tpr_at_fpr(members, nonmembers, 0.02) == 1.0
    assert tpr_at_fpr(members, nonmembers, 1.0) == 1.0
    assert tpr_at_fpr([1.0], [2.0], 0.01) == 0.0


def test_roc_curve_runs_from_origin_to_one() -> None:
    f, t = roc_curve([0.9, 0.4], [0.5, 0.1])
    assert (f[0], t[0]) == (0.0, 0.0) and (f[-1], t[-1]) == (1.0, 1.0)
    assert f == sorted(f) and t == sorted(t)


@pytest.mark.parametrize(("m", "n"), [([], [1.0]), ([1.0], []), ([float("nan")], [1.0])])
def test_bad_inputs_raise(m, n) -> None:
    with pytest.raises(ValueError):
        roc_auc(m, n)
