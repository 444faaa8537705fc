"""The privacy–utility grid's cells and targets (no training)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from silotune.config import parse_config
from silotune.privacy_utility import Recipe, RecipeKnobs, Row, Scores, cell_configs, targets


def _base(tmp_path: Path, **train):
    return parse_config(
        {
            "federation_id": "f",
            "rounds": 2,
            "train": {"local_steps": 6, "batch_size": 8, "learning_rate": 2e-3, **train},
            "silos": [{"name": s, "train_path": str(tmp_path / f"{s}.jsonl")} for s in ("a", "b", "c")],
            "aggregation": {"min_silos": 2},
        }
    )


RECIPE = Recipe(
    sample_clip=0.5,
    client_clip=0.2,
    dp_batch_size=32,
    dp_local_steps=3,
    dp_learning_rate=4e-3,
    sample_delta=1e-4,
    client_delta=0.01,
    validation_examples=32,
    grad_norm_median=0.5,
    grad_norm_p90=0.9,
)


def test_the_full_grid_has_every_cell_with_its_privacy_and_method(tmp_path: Path) -> None:
    cells = cell_configs(_base(tmp_path), RECIPE, grid_id="g")
    assert len(cells) == 2 * (1 + 4 + 4)
    assert len({c.config.federation_id for c in cells}) == len(cells)
    for c in cells:
        cfg = c.config
        assert cfg.ffa_lora == (c.method == "ffa_lora")
        assert cfg.rounds == 2 and cfg.seed == 0
        if c.privacy == "sample_dp":
            dp = cfg.privacy.sample_dp
            assert dp.target_epsilon == c.epsilon and dp.max_grad_norm == 0.5 and dp.delta == 1e-4
            assert (cfg.train.batch_size, cfg.train.local_steps, cfg.train.learning_rate) == (32, 3, 4e-3)
            assert cfg.privacy.client_dp is None
        elif c.privacy == "client_dp":
            cd = cfg.privacy.client_dp
            assert cd.target_epsilon == c.epsilon and cd.clip_norm == 0.2
            assert cfg.train.batch_size == 8 and cfg.aggregation.options["weighted"] is False
        else:
            assert cfg.privacy.sample_dp is None and cfg.privacy.client_dp is None
    assert sorted({c.epsilon for c in cells if c.epsilon}) == [1.0, 2.0, 4.0, 8.0]


def test_dp_sgd_cells_drop_the_speed_levers_the_others_keep_them(tmp_path: Path) -> None:
    """A non-private recipe with the response-only logits lever (the demo's): DP-SGD cannot use it (Opacus
    needs the model's own forward), so its cells run without it; the config refuses the mix up front."""
    import pytest

    from silotune.errors import ConfigError

    cells = cell_configs(_base(tmp_path, response_logits_only=True), RECIPE, grid_id="g", epsilons=[8.0])
    for c in cells:
        assert c.config.train.response_logits_only == (c.privacy != "sample_dp"), c.name
        assert not c.config.train.packing
    raw = _base(tmp_path, response_logits_only=True).model_dump(mode="json")
    raw["privacy"]["sample_dp"] = {"target_epsilon": 8.0, "max_grad_norm": 1.0}
    with pytest.raises(ConfigError, match=r"train.packing/train.response_logits_only do not apply with privacy"):
        parse_config(raw)


def _row(name: str, privacy: str, method: str, eps: float | None, em: float, rouge: float, auc: float) -> Row:
    s = Scores(1.0, em, em, rouge, 50.0, auc, 0.01, auc, 0.01, 120, 100)
    return Row(name=name, privacy=privacy, method=method, target_epsilon=eps, scores=s)


def test_targets_measure_the_share_of_the_gain_kept_and_the_ratio_to_centralized() -> None:
    rows = [
        _row("base model", "base", "-", None, 0.2, 0.4, 0.5),
        _row("none-lora", "none", "lora", None, 0.8, 0.9, 0.6),
        _row("sample-dp-eps8-lora", "sample_dp", "lora", 8.0, 0.76, 0.9, 0.52),
        _row("centralized", "centralized", "lora", None, 0.82, 0.9, 0.6),
        _row("local-only a", "local-only", "lora", None, 0.5, 0.6, 0.6),
    ]
    got = {t["target"]: t for t in targets(rows)}
    fed = got["federated (lora) ≥ 95% of centralized (lora), union exact_match"]
    assert math.isclose(fed["value"], 0.8 / 0.82) and fed["reached"]
    kept = got["DP-SGD ε=8 (lora) keeps ≥ 90% of the non-private gain, exact_match"]
    assert math.isclose(kept["value"], 0.56 / 0.6) and kept["reached"]
    assert got["DP-SGD ε=8 (lora): MIA AUC ≤ 0.55 (reference attack)"]["reached"]
    assert got["federated (lora) above every local-only model (union exact match)"]["reached"]


def test_each_method_is_compared_with_its_own_centralized_run() -> None:
    """FFA-LoRA federated against FFA-LoRA centralized, not against plain LoRA's (which learns more)."""
    rows = [
        _row("base model", "base", "-", None, 0.0, 0.1, 0.5),
        _row("none-ffa-lora", "none", "ffa_lora", None, 0.3, 0.4, 0.6),
        _row("centralized", "centralized", "lora", None, 0.6, 0.7, 0.6),
        _row("centralized ffa_lora", "centralized", "ffa_lora", None, 0.4, 0.5, 0.6),
    ]
    got = {t["target"]: t for t in targets(rows)}
    assert math.isclose(got["federated (ffa_lora) ≥ 95% of centralized (ffa_lora), union exact_match"]["value"], 0.75)
    # A report with only the plain-LoRA centralized row (written before there was one per method)
    old = {t["target"]: t for t in targets(rows[:3])}
    assert math.isclose(old["federated (ffa_lora) ≥ 95% of centralized (lora), union exact_match"]["value"], 0.5)


def test_recipe_knobs_refuse_values_that_name_no_schedule() -> None:
    assert RecipeKnobs().dp_lr_multiplier == 20.0
    for bad, field in (
        ({"dp_lr_multiplier": 0.0}, "dp_lr_multiplier=0.0"),
        ({"dp_step_fraction": float("nan")}, "dp_step_fraction=nan"),
        ({"dp_batch_multiplier": 0}, "dp_batch_multiplier=0"),
        ({"validation_examples": 0}, "validation_examples=0"),
    ):
        with pytest.raises(ValueError, match=field):
            RecipeKnobs(**bad)


def test_the_kept_share_carries_its_standard_error_and_the_table_prints_it() -> None:
    from dataclasses import replace

    from silotune.evaluation import binary_standard_error
    from silotune.privacy_utility import to_markdown

    def with_se(row: Row) -> Row:
        s = row.scores
        se = binary_standard_error(s.exact_match, s.num_holdout)
        return replace(row, scores=replace(s, exact_match_se=se, rouge_l_se=0.02))

    rows = [
        with_se(_row("base model", "base", "-", None, 0.0, 0.1, 0.5)),
        with_se(_row("none-lora", "none", "lora", None, 0.2, 0.3, 0.6)),
        with_se(_row("sample-dp-eps8-lora", "sample_dp", "lora", 8.0, 0.15, 0.25, 0.52)),
    ]
    kept = {t["target"]: t for t in targets(rows)}[
        "DP-SGD ε=8 (lora) keeps ≥ 90% of the non-private gain, exact_match"
    ]
    # 120 holdout records: EM 0.15 has s.e. sqrt(.15 * .85 / 119) = 0.0327, EM 0.2 has 0.0367, EM 0 has 0
    want = math.sqrt(0.15 * 0.85 / 119 + (0.75**2) * 0.2 * 0.8 / 119) / 0.2
    assert math.isclose(kept["value"], 0.75) and math.isclose(kept["se"], want)
    assert 0.2 < kept["se"] < 0.22  # a 120-record holdout cannot tell 75% from 90% kept
    md = to_markdown(rows, title="t", recipe=None)
    assert "| 0.150 ± 0.033 |" in md and f"0.750 ± {want:.3f}" in md
    # A report without standard errors (written before them) still renders, with no ±
    old = to_markdown([_row("base model", "base", "-", None, 0.0, 0.1, 0.5)], title="t", recipe=None)
    assert "| 0.000 | 0.000 | 0.100 |" in old


def test_round_costs_mark_withheld_training_seconds_as_unknown_not_zero() -> None:
    """Under DP a silo's release policy keeps its training metrics in: the report must not show 0 s."""
    from silotune.privacy_utility import round_costs
    from silotune.records import RoundSummary

    def summary(train: dict) -> RoundSummary:
        return RoundSummary.model_validate(
            {
                "round": 1,
                "included": ["a", "b"],
                "excluded": {},
                "train": train,
                "delta_norm": 1.0,
                "protection": "none",
                "privacy": {"a": {"dp.epsilon": 2.0}, "b": {"dp.epsilon": 3.0}},
                "bytes": {s: {"up": 10, "down": 20} for s in ("a", "b")},
            }
        )

    shared = round_costs([summary({"a": {"seconds": 4.0}, "b": {"seconds": 6.0}})])
    withheld = round_costs([summary({"a": {}, "b": {}})])
    assert shared["train_seconds"] == [10.0] and shared["epsilon"] == [3.0]
    assert math.isnan(withheld["train_seconds"][0]) and withheld["bytes_up"] == [20.0]


def test_the_written_json_re_renders_the_same_table(tmp_path: Path) -> None:
    """The JSON keeps exact scores, so a table re-rendered from it (after an upgrade) matches the first."""
    from dataclasses import replace

    from silotune.privacy_utility import rows_from_json, to_markdown, write_results

    rows = [
        _row("base model", "base", "-", None, 0.0, 0.1, 0.5),
        replace(
            _row("none-lora", "none", "lora", None, 0.2, 0.30250001, 0.6),
            per_round={"epsilon": [math.nan], "bytes_up": [1.0], "bytes_down": [2.0], "train_seconds": [3.0]},
        ),
    ]
    rows[1] = replace(rows[1], scores=replace(rows[1].scores, loss=0.80254, rouge_l_se=0.0325), seconds=75.46)
    paths = write_results(rows, tmp_path, title="t", recipe=RECIPE)
    again, recipe, notes, title = rows_from_json(paths["json"])
    assert to_markdown(again, title=title, recipe=recipe, notes=notes) == paths["markdown"].read_text()
    assert "| 0.803 |" in paths["markdown"].read_text() and "| 3 / 75 |" in paths["markdown"].read_text()


def test_the_written_json_is_strict_and_what_is_not_there_reads_back_as_nan(tmp_path: Path) -> None:
    """ε of a round without DP and seconds the silos withheld are null in the JSON (a strict parser reads
    it), and NaN again when the report is re-rendered from it."""
    import json
    from dataclasses import replace

    from silotune.privacy_utility import dp_cost_line, rows_from_json, write_results

    nan_round = {"epsilon": [math.nan], "bytes_up": [1.0], "bytes_down": [2.0], "train_seconds": [math.nan]}
    rows = [
        _row("base model", "base", "-", None, 0.0, 0.1, 0.5),
        replace(_row("none-lora", "none", "lora", None, 0.2, 0.3, 0.6), per_round=nan_round),
        replace(_row("dp8-lora", "sample_dp", "lora", 8.0, 0.15, 0.25, 0.52), seconds=math.nan),
    ]
    paths = write_results(rows, tmp_path / "privacy-utility", title="t", recipe=RECIPE)
    text = paths["json"].read_text()

    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    data = json.loads(text, parse_constant=refuse)  # NaN, Infinity, -Infinity would call refuse
    assert data["rows"][1]["per_round"]["epsilon"] == [None] and data["rows"][2]["seconds"] is None
    again, *_ = rows_from_json(paths["json"])
    assert math.isnan(again[1].per_round["epsilon"][0]) and math.isnan(again[1].per_round["train_seconds"][0])
    assert math.isnan(again[2].seconds) and again[1].per_round["bytes_up"] == [1.0]
    assert "DP-SGD at ε=8" in dp_cost_line("m", tmp_path)
