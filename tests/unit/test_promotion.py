"""The promotion gate: a new version is the champion only if it beats the current one by the margin."""

from __future__ import annotations

import pytest

from silotune.config import PromotionSpec, parse_config
from silotune.errors import ConfigError
from silotune.promotion import CHALLENGER, CHAMPION, decide, holdout_tags
from silotune.records import HoldoutMetrics


def _tags(loss: float, em: float = 0.5, examples: int = 40) -> dict[str, str]:
    return holdout_tags(HoldoutMetrics(num_examples=examples, loss=loss, exact_match=em), ["a", "b"])


def test_gate_by_metric_direction_and_margin() -> None:
    spec = PromotionSpec(metric="loss", margin=0.05)
    assert decide(spec, _tags(1.0), None).alias == CHAMPION
    win = decide(spec, _tags(0.90), _tags(1.0), champion_version="3")
    assert win.alias == CHAMPION and "0.9 < 1 - margin 0.05 of champion v3: promoted" in win.reason
    assert decide(spec, _tags(0.96), _tags(1.0)).alias == CHALLENGER  # better, but within the margin
    lose = decide(spec, _tags(1.2), _tags(1.0), champion_version="3")
    assert lose.alias == CHALLENGER and "not promoted" in lose.reason
    em = PromotionSpec(metric="exact_match", direction="maximize")
    assert decide(em, _tags(9.0, em=0.7), _tags(1.0, em=0.6)).alias == CHAMPION
    assert decide(em, _tags(0.1, em=0.5), _tags(1.0, em=0.6)).alias == CHALLENGER


def test_gate_refuses_what_it_cannot_compare() -> None:
    spec = PromotionSpec()
    other = decide(spec, _tags(0.5, examples=41), _tags(1.0))
    assert other.alias == CHALLENGER and "another holdout" in other.reason
    assert "no holdout 'loss'" in decide(spec, {}, _tags(1.0)).reason
    assert "no recorded holdout" in decide(spec, _tags(0.5), {"silotune.rounds": "2"}).reason
    assert decide(spec, _tags(float("nan")), _tags(1.0)).alias == CHALLENGER


def test_promotion_config_names_the_field() -> None:
    base = {"federation_id": "f", "silos": [{"name": "a", "train_path": "a.jsonl"}]}
    with pytest.raises(ConfigError, match=r"tracking\.promotion\.metric"):
        parse_config({**base, "tracking": {"promotion": {"metric": "accuracy"}}})
    with pytest.raises(ConfigError, match=r"tracking\.promotion\.margin"):
        parse_config({**base, "tracking": {"promotion": {"margin": -1}}})
