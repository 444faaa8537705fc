"""What a round cost: seconds split into training, evaluation and orchestration; the cost plot."""

from __future__ import annotations

import pytest

from silotune.records import Evaluation, FederationState, ObjectRef, RoundSummary, SiloBytes
from silotune.report import plot_costs, round_seconds


def _round(r: int, committed_at: float, eval_seconds: dict[str, float]) -> RoundSummary:
    return RoundSummary(
        round=r,
        included=["a", "b"],
        excluded={},
        train={"a": {"seconds": 3.0}, "b": {"seconds": 5.0}},
        delta_norm=1.0,
        protection="none",
        privacy={"a": {"dp.epsilon": 0.5 * r}, "b": {"dp.epsilon": 0.6 * r}},
        bytes={"a": SiloBytes(up=1000, down=2000), "b": SiloBytes(up=1000, down=2000)},
        committed_at=committed_at,
        eval_seconds=eval_seconds,
    )


def test_round_seconds_split_the_wall_time_between_commits() -> None:
    state = FederationState(
        federation_id="f",
        fingerprint="x",
        global_ref=ObjectRef(key="k", sha256="0" * 64),
        started_at=100.0,
        initial_eval=Evaluation(eval_seconds={"a": 1.0, "b": 1.0}),
        history=[_round(1, 120.0, {"a": 2.0, "b": 2.0}), _round(2, 135.0, {})],
        completed_rounds=2,
    )
    secs = round_seconds(state)
    # Round 1's wave: the initial global's evaluation (2 s), training (8 s), the rest orchestration.
    assert secs[0] == {"round": 1.0, "training": 8.0, "evaluation": 2.0, "orchestration": pytest.approx(10.0)}
    # Round 2's wave evaluated round 1's output (4 s).
    assert secs[1] == {"round": 2.0, "training": 8.0, "evaluation": 4.0, "orchestration": pytest.approx(3.0)}
    png = plot_costs(state, title="f")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # Stored state without the new timing fields still round-trips (older files have none).
    assert (
        "committed_at"
        not in RoundSummary.model_validate(
            {**_round(1, 1.0, {}).model_dump(), "committed_at": None}
        ).model_dump()
    )
