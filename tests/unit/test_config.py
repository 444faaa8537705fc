from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from silotune.config import FederationConfig, check_local_paths, dump_config, load_config, parse_config
from silotune.errors import ConfigError


def _base(**over):
    cfg = {
        "federation_id": "fed-1",
        "silos": [{"name": "a", "train_path": "a.jsonl"}, {"name": "b", "train_path": "b.jsonl"}],
    }
    cfg.update(over)
    return cfg


def test_defaults_and_round_trip(tmp_path: Path) -> None:
    silos = [{"name": "a", "train_path": str(tmp_path / "a.jsonl")}]
    cfg = parse_config(_base(rounds=4, silos=silos))
    assert cfg.aggregation.name == "fedavg" and cfg.lora.r == 8
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.model_dump() == cfg.model_dump()


@pytest.mark.parametrize(
    ("override", "field", "needle"),
    [
        ({"rounds": 0}, "rounds", "greater than or equal to 1"),
        ({"federation_id": "Bad Id!"}, "federation_id", "not a valid id"),
        ({"train": {"learning_rate": -1}}, "train.learning_rate", "greater than 0"),
        ({"lora": {"r": 0}}, "lora.r", "greater than or equal to 1"),
        ({"aggregation": {"name": "mean-ish"}}, "aggregation.name", "known: "),
        ({"aggregation": {"min_silos": 3}}, "aggregation.min_silos", "exceeds the 2 configured"),
        ({"silos": []}, "silos", "at least 1"),
        ({"bogus": 1}, "bogus", "Extra inputs are not permitted"),
        (
            {"silos": [{"name": "a", "train_path": "x"}, {"name": "a", "train_path": "y"}]},
            "silos",
            "duplicate",
        ),
        ({"silos": [{"name": "UPPER", "train_path": "x"}]}, "silos.0.name", "not a valid silo id"),
    ],
)
def test_invalid_configs_name_the_field(override, field, needle) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_base(**override))
    msg = str(err.value)
    assert field in msg and needle in msg, msg


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_base(rounds=0, train={"batch_size": 0}))
    assert "rounds" in str(err.value) and "train.batch_size" in str(err.value)


def test_yaml_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_base()))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.silos[0].train_path == str(tmp_path / "a.jsonl")
    with pytest.raises(ConfigError, match=r"silos.1.train_path: file not found"):
        check_local_paths(cfg)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_fingerprint_ignores_rounds_but_not_training() -> None:
    a = parse_config(_base(rounds=2))
    assert a.fingerprint() == parse_config(_base(rounds=9, tags={"x": "y"})).fingerprint()
    assert a.fingerprint() != parse_config(_base(train={"local_steps": 3})).fingerprint()


def test_flow_parameter_schema_renders() -> None:
    # The Prefect UI renders its form from this JSON schema.
    schema = FederationConfig.model_json_schema()
    assert "silos" in schema["properties"] and "federation_id" in schema["required"]


# --- robustness: FedProx, FLTrust root data, options checked up front ---------------------------


def test_proximal_mu_defaults_off_and_rejects_negative() -> None:
    assert parse_config(_base()).train.proximal_mu == 0.0
    assert parse_config(_base(train={"proximal_mu": 0.01})).train.proximal_mu == 0.01
    with pytest.raises(ConfigError, match=r"train\.proximal_mu"):
        parse_config(_base(train={"proximal_mu": -1}))


@pytest.mark.parametrize(
    ("aggregation", "needle"),
    [
        (
            {"name": "fltrust"},
            "aggregation.root_data_path: aggregator 'fltrust' needs the coordinator's root",
        ),
        ({"name": "median", "root_data_path": "r.jsonl"}, r"only a root-data aggregator \(fltrust\) uses it"),
        ({"name": "krum", "options": {"num_byzantine": -1}}, "num_byzantine must be an integer >= 0"),
        ({"name": "trimmed_mean", "options": {"trim": 0.1}}, "aggregator 'trimmed_mean'.*trim"),
    ],
)
def test_aggregation_problems_are_found_before_training(aggregation: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config(_base(aggregation=aggregation))


def test_root_data_path_resolves_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(_base(aggregation={"name": "fltrust", "root_data_path": "root.jsonl"}))
    )
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.aggregation.root_data_path == str(tmp_path / "root.jsonl")
    with pytest.raises(ConfigError, match=r"aggregation\.root_data_path: file not found"):
        check_local_paths(cfg)


def test_fedprox_is_refused_with_dp_sgd() -> None:
    with pytest.raises(ConfigError, match=r"train\.proximal_mu: FedProx's proximal term .* silently dropped"):
        parse_config(_base(train={"proximal_mu": 0.1}, privacy={"sample_dp": {"noise_multiplier": 1.0}}))


@pytest.mark.parametrize("protection", ["ckks", "secagg"])
@pytest.mark.parametrize("name", ["median", "trimmed_mean", "norm_bounded"])
def test_robust_rules_are_refused_with_protection_giving_the_rule_s_reason(
    protection: str, name: str
) -> None:
    from silotune.aggregation import AGGREGATORS

    with pytest.raises(ConfigError) as info:
        parse_config(_base(aggregation={"name": name}, security={"protection": protection}))
    msg = str(info.value)
    assert f"aggregator {name!r} needs every silo's update in plaintext" in msg
    assert AGGREGATORS.get(name).plaintext_reason in msg and protection in msg


def test_one_pass_reports_field_and_config_wide_problems_together() -> None:
    # An unknown aggregator beside a bad field; a config-wide problem (the quorum) beside both.
    bad = _base(
        train={"learning_rate": -1},
        aggregation={"name": "mean", "server_optimizer": "adamw", "min_silos": 3},
    )
    with pytest.raises(ConfigError) as err:
        parse_config(bad)
    msg = str(err.value)
    assert "train.learning_rate" in msg
    assert "aggregation.name: unknown aggregator 'mean'; known: " in msg and "fedavg" in msg
    assert "aggregation.server_optimizer: unknown server optimizer 'adamw'" in msg
    assert "aggregation.min_silos: quorum 3 exceeds the 2 configured" in msg
    assert "Traceback" not in msg
