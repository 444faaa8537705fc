"""The silo's own policy: checks, refusals, acceptance of one signed config, the policy file, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from silotune.config import ModelSpec, StoreSpec, dump_config, parse_config
from silotune.crypto.signing import SiloKeyPair
from silotune.errors import ConfigError
from silotune.policy import (
    MUTABLE_FIELDS,
    DPPolicy,
    PolicyError,
    PolicyRefusal,
    SiloPolicy,
    StoreKeysPolicy,
    Violation,
    accept_config,
    acceptance_fingerprint,
    acceptance_path,
    accepted_fingerprint,
    check_config,
    dump_policy,
    enforce,
    load_policy,
    local_policy,
    model_weights_sha256,
    policy_yaml,
    store_location,
    write_local_policies,
)

SHA = "ab" * 32
# Pinned silo keys (any valid Ed25519 public keys): under secagg/ckks a policy that requires signing
# needs every silo's key pinned in the accepted config.
KEY_A, KEY_B = (SiloKeyPair.generate().public_key.public_bytes_raw().hex() for _ in range(2))


def _config(tmp: Path, **over):
    cfg = {
        "federation_id": "fed-1",
        "silos": [
            {"name": "a", "train_path": "coord/a.jsonl", "private_dir": "coord/priv-a", "public_key": KEY_A},
            {"name": "b", "train_path": "coord/b.jsonl", "public_key": KEY_B},
        ],
        "security": {"protection": "secagg", "signing": True},
        "privacy": {"sample_dp": {"target_epsilon": 4.0, "delta": 1e-5}},
        "aggregation": {"min_silos": 2},
        "store": {"kind": "local", "root": str(tmp / "store")},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return parse_config(cfg)


def _policy(tmp: Path, **over) -> SiloPolicy:
    fields = {
        "silo": "a",
        "private_dir": str(tmp / "priv"),
        "train_path": str(tmp / "mine" / "train.jsonl"),
        "eval_path": str(tmp / "mine" / "eval.jsonl"),
        "federations": ["fed-*"],
        "methods": ["lora"],
        "stores": [f"file://{tmp / 'store'}"],
        "dp": DPPolicy(max_epsilon=8.0, max_delta=1e-4, min_noise_multiplier=0.5),
        "base_model_sha256": SHA,
    }
    fields.update(over)
    return SiloPolicy(**fields)


def _sha(_model: ModelSpec) -> str:
    return SHA


def _with_key(policy: SiloPolicy) -> SiloPolicy:
    SiloKeyPair.generate().save(Path(policy.private_dir) / "signing.pem")
    return policy


def _fields(violations: list[Violation]) -> set[str]:
    return {v.field for v in violations}


# -- check_config ---------------------------------------------------------------------------------


def test_a_config_within_the_policy_is_allowed(tmp_path: Path) -> None:
    assert check_config(_policy(tmp_path), _config(tmp_path), model_sha256=_sha) == []


def test_every_violation_is_reported_at_once(tmp_path: Path) -> None:
    weak = _config(
        tmp_path,
        federation_id="other",
        method={"name": "qlora"},
        silos=[
            {"name": "a", "train_path": "x", "method": {"name": "lora"}, "attack": {"name": "sign_flip"}},
            {"name": "b", "train_path": "y"},
        ],
        security={"protection": "none", "signing": False},
        privacy={"sample_dp": None, "client_dp": {"clip_norm": 1.0, "noise_multiplier": 0.5, "delta": 0.01}},
        aggregation={"min_silos": 2, "options": {"weighted": False}},
        store={
            "kind": "s3",
            "endpoint_url": "http://evil:9000",
            "bucket": "loot",
            "access_key_env": "DB_PASSWORD",
        },
    )
    policy = _policy(
        tmp_path,
        methods=["ia3"],
        dp=DPPolicy(max_epsilon=8.0, require_client_dp=True, max_client_epsilon=2.0),
    )
    violations = check_config(policy, weak, model_sha256=lambda m: "cd" * 32)
    by_field = {v.field: v for v in violations}
    assert set(by_field) == {
        "federation_id",
        "silos.0.attack",
        "security.protection",
        "security.signing",
        "method.name",
        "silos.0.method.name",
        "privacy.sample_dp",
        "privacy.client_dp.target_epsilon",
        "store",
        "store.access_key_env",
        "model.name_or_path",
    }, violations
    assert by_field["security.protection"].rule == "protection: [secagg, ckks]"
    assert by_field["federation_id"].rule == "federations: [fed-*]"
    assert by_field["security.signing"].rule == "require_signing: true"
    assert by_field["privacy.sample_dp"].rule == "dp.require_sample_dp: true"
    assert by_field["store"].message == "s3://evil:9000/loot is not an allowed store"
    assert by_field["store.access_key_env"].rule == "store_keys.access_key_env: AWS_ACCESS_KEY_ID"
    assert "cdcd" in by_field["model.name_or_path"].message


def test_dp_floors(tmp_path: Path) -> None:
    policy = _policy(
        tmp_path,
        dp=DPPolicy(
            max_epsilon=8.0,
            max_lifetime_epsilon=10.0,
            min_noise_multiplier=0.8,
            max_delta=1e-5,
            require_client_dp=True,
            max_client_epsilon=3.0,
        ),
    )
    over_budget = _config(
        tmp_path,
        privacy={
            "sample_dp": {"target_epsilon": 12.0, "delta": 1e-3},
            "client_dp": {"clip_norm": 1.0, "target_epsilon": 5.0, "delta": 0.01},
        },
    )
    got = {(v.field, v.rule) for v in check_config(policy, over_budget, model_sha256=_sha)}
    assert got == {
        ("privacy.sample_dp.target_epsilon", "dp.max_epsilon: 8.0"),
        ("privacy.sample_dp.target_epsilon", "dp.max_lifetime_epsilon: 10.0"),
        ("privacy.sample_dp.delta", "dp.max_delta: 1e-05"),
        ("privacy.client_dp.target_epsilon", "dp.max_client_epsilon: 3.0"),
    }
    fixed_noise = _config(
        tmp_path,
        privacy={
            "sample_dp": {"noise_multiplier": 0.5, "delta": 1e-5},
            "client_dp": {"clip_norm": 1.0, "noise_multiplier": 2.0, "delta": 0.01},
        },
    )
    got = {(v.field, v.rule) for v in check_config(policy, fixed_noise, model_sha256=_sha)}
    assert got == {
        ("privacy.sample_dp.target_epsilon", "dp.max_epsilon: 8.0"),  # a fixed σ states no budget
        ("privacy.sample_dp.noise_multiplier", "dp.min_noise_multiplier: 0.8"),
        ("privacy.client_dp.target_epsilon", "dp.max_client_epsilon: 3.0"),
    }
    no_client = _config(tmp_path)
    assert _fields(check_config(policy, no_client, model_sha256=_sha)) == {"privacy.client_dp"}


def test_a_config_without_this_silo_is_refused(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        silos=[
            {"name": "b", "train_path": "y", "public_key": KEY_A},
            {"name": "c", "train_path": "z", "public_key": KEY_B},
        ],
    )
    (v,) = check_config(_policy(tmp_path), cfg, model_sha256=_sha)
    assert (v.field, v.rule) == ("silos", "silo: a") and "silos: b, c" in v.message


def test_attack_simulation_only_when_the_policy_allows_it(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        silos=[
            {"name": "a", "train_path": "x", "poison": {"flip_fraction": 0.5}, "public_key": KEY_A},
            {"name": "b", "train_path": "y", "public_key": KEY_B},
        ],
    )
    assert _fields(check_config(_policy(tmp_path), cfg, model_sha256=_sha)) == {"silos.0.poison"}
    allowing = _policy(tmp_path, allow_attack_simulation=True)
    assert check_config(allowing, cfg, model_sha256=_sha) == []


def test_client_dp_needs_two_silos_per_sum(tmp_path: Path) -> None:
    # The federation config itself refuses it now, before any policy is asked.
    with pytest.raises(ConfigError, match=r"min_silos: 1 with client DP on"):
        _config(
            tmp_path,
            security={"protection": "none"},
            privacy={"client_dp": {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 0.01}},
            aggregation={"min_silos": 1, "options": {"weighted": False}},
        )


@pytest.mark.parametrize(
    ("entry", "store", "allowed"),
    [
        (
            "s3://127.0.0.1:8333/silotune",
            {"endpoint_url": "http://127.0.0.1:8333", "bucket": "silotune"},
            True,
        ),
        ("s3://127.0.0.1:8333/silotune", {"endpoint_url": "http://127.0.0.1:8333", "bucket": "x"}, False),
        (
            "s3://127.0.0.1:8333/silotune",
            {"endpoint_url": "http://127.0.0.1:8334", "bucket": "silotune"},
            False,
        ),
        (
            "s3://127.0.0.1:8333/silotune",
            {"endpoint_url": "http://127.0.0.1:8333", "bucket": "silotune", "prefix": "team-a"},
            True,
        ),
        (
            "s3://127.0.0.1:8333/silotune/team-a",
            {"endpoint_url": "http://127.0.0.1:8333", "bucket": "silotune", "prefix": "team-b"},
            False,
        ),
        ("s3://S3.Example.org/b", {"endpoint_url": "https://s3.example.org", "bucket": "b"}, True),
        (
            "s3://s3.example.org/b",
            {"endpoint_url": "http://s3.example.org", "bucket": "b"},
            False,
        ),  # http: port 80
        ("s3://s3.example.org:80/b", {"endpoint_url": "http://s3.example.org", "bucket": "b"}, True),
        ("s3://aws/b", {"bucket": "b"}, True),
        ("s3://aws/b", {"endpoint_url": "https://evil.example", "bucket": "b"}, False),
    ],
)
def test_store_entries(tmp_path: Path, entry: str, store: dict, allowed: bool) -> None:
    policy = _policy(tmp_path, stores=[entry])
    cfg = _config(tmp_path, store={"kind": "s3", "root": ".silotune/store", **store})
    assert (check_config(policy, cfg, model_sha256=_sha) == []) is allowed


def test_local_store_at_or_under_the_allowed_root(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    assert (
        check_config(
            policy, _config(tmp_path, store={"root": str(tmp_path / "store" / "sub")}), model_sha256=_sha
        )
        == []
    )
    (v,) = check_config(
        policy, _config(tmp_path, store={"root": str(tmp_path / "elsewhere")}), model_sha256=_sha
    )
    assert v.field == "store.root"
    (tmp_path / "link").symlink_to(tmp_path / "store", target_is_directory=True)
    (tmp_path / "store").mkdir()
    assert (
        check_config(policy, _config(tmp_path, store={"root": str(tmp_path / "link")}), model_sha256=_sha)
        == []
    )


def test_store_keys_and_profile(tmp_path: Path) -> None:
    policy = _policy(
        tmp_path,
        stores=["s3://127.0.0.1:8333/silotune"],
        store_keys=StoreKeysPolicy(access_key_env="CLINIC_KEY", secret_key_env="CLINIC_SECRET"),
    )
    s3 = {"kind": "s3", "endpoint_url": "http://127.0.0.1:8333", "bucket": "silotune"}
    ok = _config(tmp_path, store={**s3, "access_key_env": "CLINIC_KEY", "secret_key_env": "CLINIC_SECRET"})
    assert check_config(policy, ok, model_sha256=_sha) == []
    swapped = _config(
        tmp_path,
        store={**s3, "access_key_env": "CLINIC_SECRET", "secret_key_env": "CLINIC_KEY", "profile": "x"},
    )
    assert _fields(check_config(policy, swapped, model_sha256=_sha)) == {
        "store.access_key_env",
        "store.secret_key_env",
        "store.profile",
    }
    assert store_location(StoreSpec(**s3)).text == "s3://127.0.0.1:8333/silotune"


def test_model_sha256_of_weight_files(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights-1")
    spec = ModelSpec(name_or_path=str(folder))
    assert model_weights_sha256(spec) == hashlib.sha256(b"weights-1").hexdigest()  # = `sha256sum`
    (folder / "model.safetensors").write_bytes(b"weights-22")  # size and mtime change: no stale cache
    assert model_weights_sha256(spec) == hashlib.sha256(b"weights-22").hexdigest()
    (folder / "model-2.safetensors").write_bytes(b"more")
    listing = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n"
        for name, data in (("model-2.safetensors", b"more"), ("model.safetensors", b"weights-22"))
    )
    assert model_weights_sha256(spec) == hashlib.sha256(listing.encode()).hexdigest()
    cfg = _config(tmp_path, model={"name_or_path": str(folder)})
    pinned = _policy(tmp_path, base_model_sha256=hashlib.sha256(listing.encode()).hexdigest())
    assert check_config(pinned, cfg) == []
    (v,) = check_config(pinned, _config(tmp_path, model={"name_or_path": str(tmp_path / "nowhere")}))
    assert v.field == "model.name_or_path" and "cannot hash" in v.message


# -- enforce and acceptance ---------------------------------------------------------------------


def test_accept_then_enforce_swaps_in_the_silos_own_paths(tmp_path: Path) -> None:
    policy = _with_key(_policy(tmp_path))
    cfg = _config(tmp_path)
    path = accept_config(policy, cfg, model_sha256=_sha)
    assert path == tmp_path / "priv" / "accepted" / "fed-1.json"
    doc = json.loads(path.read_text())
    assert set(doc) == {"silo", "federation_id", "fingerprint", "signature", "accepted_at"}
    assert doc["fingerprint"] == acceptance_fingerprint(cfg) == accepted_fingerprint(policy, "fed-1")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    out = enforce(policy, cfg, model_sha256=_sha)
    a, b = out.silo("a"), out.silo("b")
    assert (a.private_dir, a.train_path, a.eval_path) == (
        policy.private_dir,
        policy.train_path,
        policy.eval_path,
    )
    assert b == cfg.silo("b")
    assert acceptance_fingerprint(out) == acceptance_fingerprint(cfg)  # the silo's paths are not in it
    assert accepted_fingerprint(policy, "fed-never") is None


def test_fields_outside_the_fingerprint_may_change_but_are_still_checked(tmp_path: Path) -> None:
    policy = _with_key(_policy(tmp_path))
    accept_config(policy, _config(tmp_path), model_sha256=_sha)
    resumed = _config(
        tmp_path,
        rounds=7,
        tags={"run": "2"},
        tracking={"kind": "none"},
        silos=[
            {"name": "a", "train_path": "/elsewhere/a.jsonl", "private_dir": "/elsewhere/priv", "public_key": KEY_A},
            {"name": "b", "train_path": "/elsewhere/b.jsonl", "work_pool": "pool-b", "public_key": KEY_B},
        ],
    )
    enforce(policy, resumed, model_sha256=_sha)
    assert "rounds" in MUTABLE_FIELDS and "store" in MUTABLE_FIELDS
    moved_store = _config(tmp_path, store={"root": str(tmp_path / "attacker")})
    with pytest.raises(PolicyRefusal) as err:
        enforce(policy, moved_store, model_sha256=_sha)
    assert _fields(err.value.violations) == {"store.root"}


def test_a_changed_fingerprint_is_refused(tmp_path: Path) -> None:
    policy = _with_key(_policy(tmp_path))
    cfg = _config(tmp_path)
    accept_config(policy, cfg, model_sha256=_sha)
    changed = _config(tmp_path, train={"learning_rate": 0.5})
    with pytest.raises(PolicyRefusal) as err:
        enforce(policy, changed, model_sha256=_sha)
    (v,) = err.value.violations
    assert v.field == "fingerprint" and v.rule == "require_accepted_config: true"
    assert v.message == (
        f"config fingerprint {acceptance_fingerprint(changed)} differs from the one this silo accepted "
        f"({acceptance_fingerprint(cfg)})"
    )
    with pytest.raises(PolicyError, match="--replace"):
        accept_config(policy, changed, model_sha256=_sha)
    accept_config(policy, changed, replace=True, model_sha256=_sha)
    enforce(policy, changed, model_sha256=_sha)


def test_a_federation_not_accepted_is_refused(tmp_path: Path) -> None:
    policy = _with_key(_policy(tmp_path))
    with pytest.raises(PolicyRefusal, match="has not accepted federation fed-1"):
        enforce(policy, _config(tmp_path), model_sha256=_sha)
    relaxed = policy.model_copy(update={"require_accepted_config": False})
    enforce(relaxed, _config(tmp_path), model_sha256=_sha)


@pytest.mark.parametrize("tamper", ["fingerprint", "foreign-key", "garbage", "other-federation"])
def test_a_tampered_acceptance_is_refused(tmp_path: Path, tamper: str) -> None:
    policy = _with_key(_policy(tmp_path))
    cfg = _config(tmp_path)
    path = accept_config(policy, cfg, model_sha256=_sha)
    doc = json.loads(path.read_text())
    if tamper == "fingerprint":
        doc["fingerprint"] = acceptance_fingerprint(_config(tmp_path, seed=9))
        cfg = _config(tmp_path, seed=9)  # the config the forger wants run
    elif tamper == "foreign-key":
        from silotune.policy import acceptance_message

        other = SiloKeyPair.generate().private_key
        doc["signature"] = other.sign(acceptance_message("a", "fed-1", doc["fingerprint"])).hex()
    elif tamper == "other-federation":
        doc["federation_id"] = "fed-2"
    path.write_text(json.dumps(doc) if tamper != "garbage" else "{not json")
    with pytest.raises(PolicyRefusal) as err:
        enforce(policy, cfg, model_sha256=_sha)
    (v,) = err.value.violations
    assert v.field == "fingerprint" and str(path) in v.message


def test_refusal_is_logged_and_nothing_else_is_written(tmp_path: Path) -> None:
    policy = _policy(tmp_path)  # no private folder yet
    weak = _config(tmp_path, security={"protection": "none", "signing": False})
    with pytest.raises(PolicyRefusal) as err:
        enforce(policy, weak, model_sha256=_sha)
    lines = str(err.value).splitlines()
    assert lines[0] == "silo a refuses federation fed-1:"
    assert len(lines) == 1 + len(err.value.violations)
    assert any("security.protection" in line and "protection: [secagg, ckks]" in line for line in lines)
    priv = Path(policy.private_dir)
    assert sorted(p.relative_to(priv).as_posix() for p in priv.rglob("*")) == ["refusals.log"]
    assert oct((priv / "refusals.log").stat().st_mode & 0o777) == "0o600"
    (entry,) = [json.loads(line) for line in (priv / "refusals.log").read_text().splitlines()]
    assert entry["federation_id"] == "fed-1" and entry["silo"] == "a"
    assert entry["fingerprint"] == acceptance_fingerprint(weak)
    assert {v["field"] for v in entry["violations"]} == {
        "security.protection",
        "security.signing",
        "federation_id",  # not accepted either
    }
    assert entry["time"].endswith("+00:00")
    with pytest.raises(PolicyRefusal):
        enforce(policy, weak, model_sha256=_sha)
    assert len((priv / "refusals.log").read_text().splitlines()) == 2
    assert not list(Path(tmp_path / "store").glob("*"))  # nothing reached the store


def test_accept_refuses_a_config_outside_the_policy(tmp_path: Path) -> None:
    policy = _with_key(_policy(tmp_path))
    with pytest.raises(PolicyRefusal) as err:
        accept_config(policy, _config(tmp_path, security={"protection": "none"}), model_sha256=_sha)
    assert _fields(err.value.violations) == {"security.protection"}
    assert not acceptance_path(policy, "fed-1").exists()


def test_accept_needs_a_key_or_creates_one(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    with pytest.raises(ConfigError, match="no signing key"):
        accept_config(policy, _config(tmp_path), model_sha256=_sha)
    accept_config(policy, _config(tmp_path), create_key=True, model_sha256=_sha)
    assert (Path(policy.private_dir) / "signing.pub.pem").is_file()
    enforce(policy, _config(tmp_path), model_sha256=_sha)


# -- the policy file ------------------------------------------------------------------------------


def test_round_trip_with_comments_and_relative_paths(tmp_path: Path) -> None:
    policy = _policy(tmp_path, private_dir="priv", train_path="data/train.jsonl", eval_path=None)
    path = dump_policy(policy, tmp_path / "pol" / "a.yaml")
    text = path.read_text()
    assert "# Federation ids this silo joins" in text and "  # Largest δ" in text
    loaded = load_policy(path)
    assert loaded.private_dir == str(tmp_path / "pol" / "priv")
    assert loaded.train_path == str(tmp_path / "pol" / "data" / "train.jsonl")
    assert loaded.model_copy(update={"private_dir": "priv", "train_path": "data/train.jsonl"}) == policy


def test_load_errors_are_one_line_per_field_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "silo": "Clinic",
                "private_dir": "priv",
                "federations": [],
                "protection": ["none", "rot13"],
                "methods": ["lorax"],
                "stores": ["http://x/b", "s3://h/b"],
                "base_model_sha256": "abc",
                "dp": {"require_sample_dp": False, "max_delta": 1e-3, "max_epsilon": -1},
                "bogus": 1,
            }
        )
    )
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    lines = str(err.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    fields = [line.removeprefix(f"{path}: ").split(":")[0] for line in lines]
    assert set(fields) == {
        "silo",
        "train_path",
        "federations",
        "protection.1",
        "methods",
        "stores",
        "base_model_sha256",
        "dp.max_epsilon",
        "bogus",
    }, lines
    assert len(fields) == len(set(fields))


def test_dp_cross_field_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    base = yaml.safe_load(Path("examples/silo-policy.yaml").read_text())
    base["dp"] = {"require_sample_dp": False, "max_delta": 1e-3, "max_client_epsilon": 1.0}
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    lines = str(err.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["dp.max_delta", "dp.max_client_epsilon"], lines
    base["dp"] = {"max_epsilon": 8.0, "max_lifetime_epsilon": 4.0}
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(PolicyError, match=r"dp.max_lifetime_epsilon: 4.0 is below dp.max_epsilon 8.0"):
        load_policy(path)


def test_bad_files_and_coordinator_key(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("silo: [a\n")
    with pytest.raises(PolicyError, match=r"broken\.yaml: not valid YAML"):
        load_policy(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(PolicyError, match="mapping at the top level"):
        load_policy(tmp_path / "list.yaml")
    base = yaml.safe_load(Path("examples/silo-policy.yaml").read_text())
    base["coordinator_key"] = "keys/coordinator.pub.pem"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(PolicyError, match=r"p.yaml: coordinator_key: .*cannot read"):
        load_policy(tmp_path / "p.yaml")
    key = SiloKeyPair.generate()
    key.save(tmp_path / "keys" / "coordinator.pem", tmp_path / "keys" / "coordinator.pub.pem")
    assert load_policy(tmp_path / "p.yaml").coordinator_public_key() is not None
    base["coordinator_key"] = "keys/coordinator.pem"  # a private key is refused
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(PolicyError, match="holds a private key"):
        load_policy(tmp_path / "p.yaml")


def test_the_example_policy_loads() -> None:
    policy = load_policy("examples/silo-policy.yaml")
    assert policy.silo == "clinic" and policy.protection == ["secagg", "ckks"]
    assert policy.train_path == str(Path("examples/data/clinic/train.jsonl").resolve())
    assert policy.private_dir == str(Path(".silotune/silos/clinic").resolve())
    assert policy_yaml(policy).count("\n# ") >= 10


# -- one-machine setups ---------------------------------------------------------------------------


def test_local_policies(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    strict = local_policy(cfg, "a")
    assert strict.protection == ["secagg"] and strict.dp.max_epsilon == 4.0 and strict.require_accepted_config
    assert check_config(strict, cfg) == []
    weaker = _config(
        tmp_path, security={"protection": "ckks"}, privacy={"sample_dp": {"target_epsilon": 9.0}}
    )
    assert _fields(check_config(strict, weaker)) == {
        "security.protection",
        "privacy.sample_dp.target_epsilon",
    }
    permissive = local_policy(cfg, "a", permissive=True)
    assert check_config(permissive, weaker) == [] and not permissive.require_accepted_config
    assert _fields(check_config(permissive, _config(tmp_path, federation_id="fed-2"))) == {"federation_id"}

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        paths = write_local_policies(cfg, tmp_path / "policies")
    finally:
        os.chdir(cwd)
    assert set(paths) == {"a", "b"}
    for silo, path in paths.items():
        policy = load_policy(path)
        assert Path(policy.private_dir).is_absolute()
        assert enforce(policy, cfg).silo(silo).private_dir == policy.private_dir  # accepted already


def test_register_silo_policy(tmp_path: Path) -> None:
    from tasks.runtime import SILO_POLICIES, register_silo_policy

    policy = _policy(tmp_path, silo="zz-test")
    register_silo_policy(policy)
    try:
        assert SILO_POLICIES["zz-test"] is policy
    finally:
        SILO_POLICIES.pop("zz-test")


def test_policy_named_by_the_environment_is_enforced(tmp_path: Path, monkeypatch) -> None:
    """A run in a process a stock `prefect worker start` started: the policy comes from $SILOTUNE_SILO_POLICY."""
    from tasks.runtime import POLICY_ENV, SILO_POLICIES, admit, lifetime_epsilon

    path = tmp_path / "a.yaml"
    dump_policy(_policy(tmp_path, dp=DPPolicy(max_lifetime_epsilon=20.0)), path)
    monkeypatch.delitem(SILO_POLICIES, "a", raising=False)
    monkeypatch.setenv(POLICY_ENV, str(path))
    try:
        with pytest.raises(PolicyRefusal, match="silo a refuses federation fed-1"):
            admit(_config(tmp_path, security={"signing": False}), "a")  # what the policy requires is missing
        assert SILO_POLICIES["a"].silo == "a" and lifetime_epsilon("a") == 20.0
        # the file serves silo a alone: a run for another silo fails instead of running without a policy
        with pytest.raises(PolicyError, match="is the policy of silo 'a': this process does not serve 'b'"):
            admit(_config(tmp_path), "b")
    finally:
        SILO_POLICIES.pop("a", None)
    monkeypatch.delenv(POLICY_ENV)
    assert admit(_config(tmp_path), "b")[0].silo("b").train_path == "coord/b.jsonl"  # no policy: embedded


# -- the CLI --------------------------------------------------------------------------------------


@pytest.fixture()
def cli_files(tmp_path: Path) -> tuple[Path, Path]:
    policy = dump_policy(_policy(tmp_path, base_model_sha256=None), tmp_path / "a.yaml")
    config = tmp_path / "fed.yaml"
    dump_config(_config(tmp_path), config)
    return policy, config


def test_cli_policy_check_exit_codes(tmp_path: Path, cli_files: tuple[Path, Path]) -> None:
    from cli import app

    policy, config = cli_files
    runner = CliRunner()
    res = runner.invoke(app, ["silo", "policy", "check", str(policy), str(config)])
    assert res.exit_code == 0, res.output
    assert "allowed" in res.output and "not accepted yet" in res.output
    weak = tmp_path / "weak.yaml"
    dump_config(_config(tmp_path, security={"protection": "none", "signing": False}), weak)
    res = runner.invoke(app, ["silo", "policy", "check", str(policy), str(weak)], terminal_width=200)
    assert res.exit_code == 1, res.output
    assert "security.protection" in res.output and "protection: [secagg, ckks]" in res.output
    assert "security.signing" in res.output and "require_signing: true" in res.output
    res = runner.invoke(app, ["silo", "policy", "check", str(tmp_path / "nope.yaml"), str(config)])
    assert res.exit_code == 2 and "not found" in res.output


def test_cli_accept_show_init_and_join(tmp_path: Path, cli_files: tuple[Path, Path]) -> None:
    from cli import app

    policy, config = cli_files
    runner = CliRunner()
    res = runner.invoke(app, ["silo", "accept", str(config), "--policy", str(policy)])
    assert res.exit_code == 2 and "--create-key" in res.output, res.output
    res = runner.invoke(app, ["silo", "accept", str(config), "--policy", str(policy), "--create-key"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "priv" / "accepted" / "fed-1.json").is_file()
    res = runner.invoke(app, ["silo", "policy", "check", str(policy), str(config)])
    assert res.exit_code == 0 and "accepted (fingerprint" in res.output, res.output
    changed = tmp_path / "changed.yaml"
    dump_config(_config(tmp_path, seed=3), changed)
    res = runner.invoke(app, ["silo", "policy", "check", str(policy), str(changed)], terminal_width=200)
    assert res.exit_code == 1 and "differs from the one this silo accepted" in res.output, res.output

    res = runner.invoke(app, ["silo", "policy", "show", str(policy)], terminal_width=200)
    assert res.exit_code == 0 and "secagg, ckks" in res.output and "not pinned" in res.output, res.output

    out = tmp_path / "init" / "b.yaml"
    res = runner.invoke(
        app,
        ["silo", "policy", "init", "b", "--out", str(out), "--from-config", str(config), "--no-pin-model"],
    )
    assert res.exit_code == 0, res.output
    made = load_policy(out)
    assert made.silo == "b" and made.federations == ["fed-1"] and made.dp.require_sample_dp
    assert made.stores == [f"file://{tmp_path / 'store'}"]
    assert "# Federation ids this silo joins" in out.read_text()
    res = runner.invoke(app, ["silo", "policy", "init", "b", "--out", str(out)])
    assert res.exit_code == 2 and "exists" in res.output
    res = runner.invoke(app, ["silo", "policy", "init", "c", "--out", str(tmp_path / "c.yaml")])
    assert res.exit_code == 2 and "--federation" in res.output

    res = runner.invoke(app, ["silo", "join", "a"])
    assert res.exit_code == 2 and "--policy" in res.output and "silo policy init" in res.output
    res = runner.invoke(app, ["silo", "join", "b", "--policy", str(policy)])
    assert res.exit_code == 2 and "policy of silo 'a', not 'b'" in res.output
    res = runner.invoke(app, ["silo", "join", "a", "--policy", str(policy)])
    assert res.exit_code == 2 and "train_path: file not found" in res.output


def test_scheduled_retraining_runs_under_the_base_acceptance_with_the_same_config(tmp_path: Path) -> None:
    policy = _with_key(_policy(tmp_path))
    accept_config(policy, _config(tmp_path), model_sha256=_sha)
    retrain = {"federation_id": "fed-1-20261202-0800", "tags": {"silotune.retraining_of": "fed-1"}}
    enforce(policy, _config(tmp_path, **retrain), model_sha256=_sha)  # same config, new id: allowed
    seconds = {**retrain, "federation_id": "fed-1-20261202-080012"}  # the stamp with seconds
    enforce(policy, _config(tmp_path, **seconds), model_sha256=_sha)
    with pytest.raises(PolicyRefusal, match="differs from the one this silo accepted"):
        enforce(policy, _config(tmp_path, **retrain, train={"learning_rate": 0.5}), model_sha256=_sha)
    # the tag names an accepted federation, but the id is not a retraining run of it
    forged = {"federation_id": "fed-9-20261202-0800", "tags": {"silotune.retraining_of": "fed-1"}}
    with pytest.raises(PolicyRefusal, match="has not accepted federation fed-9-20261202-0800"):
        enforce(policy, _config(tmp_path, **forged), model_sha256=_sha)


def test_policy_names_the_silos_device_outside_the_fingerprint(tmp_path: Path) -> None:
    policy = _with_key(_policy(tmp_path, device="cpu"))
    cfg = _config(tmp_path, train={"device": "cuda"})
    accept_config(policy, cfg, model_sha256=_sha)
    out = enforce(policy, cfg, model_sha256=_sha)
    assert out.silo("a").device == "cpu" and out.silo("b").device is None  # the silo's hardware, its call
    assert acceptance_fingerprint(out) == acceptance_fingerprint(cfg)  # placement is not agreed on
    with pytest.raises(ValidationError, match="device"):
        _policy(tmp_path, device="gpu")
