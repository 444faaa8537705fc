"""The stack's S3 identities and Prefect API settings, offline.

``s3_allows`` is the pure-Python copy of SeaweedFS's grant matching; its cases below are what the real
server (``weed`` 4.48) answered, and tests/integration/test_stack_s3.py checks the copy against the
server itself. Here it proves, for a 3-silo stack, that no silo can write under another silo's prefixes
or read anyone's updates or result records.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from ops import credentials, state, supervise
from ops.credentials import s3_allows
from ops.prefect_server import api_settings, prefect_api
from ops.state import DATA_BUCKET, MLFLOW_BUCKET, RESULTS_BUCKET, StackError

SILOS = ("clinic", "bank", "lab")
AREAS = ("updates", "results", "messages", "published")
FID = "fed-1"


def _slot(area: str, silo: str) -> str:
    """A key of the new layout in ``area``'s prefix of ``silo``."""
    return {
        "updates": f"updates/{silo}/{FID}/00001/update.masked",
        "results": f"results/{silo}/{FID}/00001/train.json",
        "messages": f"messages/{silo}/{FID}/00001/secagg/shares/bank",
        "published": f"published/{silo}/{FID}/final/adapter_model.safetensors",
    }[area]


FEDERATION_KEYS = (
    f"federations/{FID}/rounds/00001/global.safetensors",
    f"federations/{FID}/rounds/00001/global.json",
    f"federations/{FID}/rounds/00001/aggregate.ckks",
    f"federations/{FID}/rounds/00001/secagg/survivors.json",
    f"federations/{FID}/rounds/00001/manifest.json",
    f"federations/{FID}/state.json",
    f"federations/{FID}/final/adapter_model.safetensors",
)


def test_identities_for_three_silos_are_exact() -> None:
    d = DATA_BUCKET
    assert credentials.identities(SILOS) == {
        "admin": ["Admin", "Read", "Write", "List", "Tagging"],
        "coordinator": [
            f"Read:{d}",
            f"List:{d}",
            f"Write:{d}/federations/*",
            f"Read:{RESULTS_BUCKET}",
            f"Write:{RESULTS_BUCKET}",
        ],
        "mlflow": [f"Read:{MLFLOW_BUCKET}", f"Write:{MLFLOW_BUCKET}", f"List:{MLFLOW_BUCKET}"],
        **{
            f"silo-{s}": [
                f"Write:{d}/updates/{s}/*",
                f"Write:{d}/results/{s}/*",
                f"Write:{d}/messages/{s}/*",
                f"Write:{d}/published/{s}/*",
                f"Read:{d}/federations/*",
                f"Read:{d}/messages/*",
                f"Read:{d}/updates/*.ckks",
                f"Read:{d}/updates/*.ckks.sig",
            ]
            for s in SILOS
        },
    }


# (grants, action, key, allowed): what SeaweedFS 4.48 answered for PUT (Write) and GET (Read) on bucket b.
OBSERVED = [
    # '*' matches any run of characters, '/' included; the '/' after the prefix is literal.
    (["Write:b/updates/clinic/*"], "Write", "updates/clinic/x", True),
    (["Write:b/updates/clinic/*"], "Write", "updates/clinic/f/00001/update.bin", True),
    (["Write:b/updates/clinic/*"], "Write", "updates/clinic/", True),
    (["Write:b/updates/clinic/*"], "Write", "updates/clinic", False),
    (["Write:b/updates/clinic/*"], "Write", "updates/clinicX/x", False),
    (["Write:b/updates/clinic/*"], "Write", "updates/bank/x", False),
    (["Write:b/updates/clinic/*"], "Read", "updates/clinic/x", False),
    (["Write:b/a*c"], "Write", "ac", True),
    (["Write:b/a*c"], "Write", "abc", True),
    (["Write:b/a*c"], "Write", "a/b/c", True),
    (["Write:b/a*c"], "Write", "a/b/cd", False),
    (["Write:b/updates/clinic*"], "Write", "updates/clinicX/x", True),
    (["Write:b/updates/clinic*"], "Write", "updates/clinic", True),
    # '?' is exactly one character, '/' included.
    (["Write:b/q/?"], "Write", "q/x", True),
    (["Write:b/q/?"], "Write", "q/xy", False),
    (["Write:b/q/?"], "Write", "q/", False),
    (["Write:b/q?x"], "Write", "q/x", True),
    (["Write:b/q?x"], "Write", "qax", True),
    # Without a wildcard only 'Action:bucket' counts (the whole bucket): no exact keys, no prefix form.
    (["Write:b/exact/key.bin"], "Write", "exact/key.bin", False),
    (["Write:b/pre/fix/"], "Write", "pre/fix/a", False),
    (["Write:b/pre/fix/"], "Write", "pre/fix/", False),
    (["Write:b/updates"], "Write", "updates", False),
    (["Write:b/updates"], "Write", "updates/x", False),
    (["Write:b"], "Write", "any/key/at/all", True),
    (["Write:b"], "Read", "any/key/at/all", False),
    (["Write:b"], "Write", "", True),
    # Keys are normalized before matching: a leading or doubled '/' does not escape a prefix.
    (["Write:b/updates/clinic/*"], "Write", "//updates/clinic/dbl.bin", True),
    (["Write:b/updates/clinic/*"], "Write", "updates/clinic//x2.bin", True),
    (["Write:b/updates/clinic/*"], "Write", "updates//bank/x", False),
    # Bucket-level requests (no key) never match a prefix grant: no presigned POST, no bucket settings.
    (["Write:b/updates/clinic/*"], "Write", "", False),
    # Bare and admin grants.
    (["Read"], "Read", "x", True),
    (["Admin"], "Write", "x", True),
    (["Admin:b"], "Write", "x", True),
    (["Admin:b/updates/*"], "Write", "updates/x", True),
]


@pytest.mark.parametrize(("grants", "action", "key", "allowed"), OBSERVED)
def test_matcher_reproduces_observed_seaweedfs_semantics(grants, action, key, allowed) -> None:
    assert s3_allows(grants, action, "b", key) is allowed


def test_matcher_other_bucket_and_brackets() -> None:
    assert not s3_allows(["Write:b/*"], "Write", "c", "x")
    assert not s3_allows(["Write:b"], "Write", "bb", "x")
    assert not s3_allows(["Write:b/*"], "Write", "", "x")
    # '[' is literal for SeaweedFS (only '*' and '?' are special).
    assert s3_allows(["Write:b/[ab]/*"], "Write", "b", "[ab]/x")
    assert not s3_allows(["Write:b/[ab]/*"], "Write", "b", "a/x")


def _can(ident: str, action: str, key: str, bucket: str = DATA_BUCKET, silos=SILOS) -> bool:
    return s3_allows(credentials.identities(silos)[ident], action, bucket, key)


@pytest.mark.parametrize("silo", SILOS)
def test_silo_writes_only_its_own_prefixes(silo: str) -> None:
    ident = f"silo-{silo}"
    for area in AREAS:
        assert _can(ident, "Write", _slot(area, silo)), (area, silo)
        for other in SILOS:
            if other != silo:
                assert not _can(ident, "Write", _slot(area, other)), (ident, area, other)
                # no way around the prefix: other spellings of another silo's slot
                for key in (
                    f"{area}/{other}/x",
                    f"{area}/{other}",
                    f"/{area}/{other}/x",
                    f"{area}//{other}/x",
                    f"{area}/{silo}{other}/x",
                    f"{area}/{other}{silo}/x",
                ):
                    assert not _can(ident, "Write", key), (ident, key)
    for key in (*FEDERATION_KEYS, "x", "", "updates/x", f"final/{silo}", f"{FID}/final/x"):
        assert not _can(ident, "Write", key), (ident, key)


@pytest.mark.parametrize("silo", SILOS)
def test_silo_reads_federations_and_messages_only(silo: str) -> None:
    ident = f"silo-{silo}"
    for key in FEDERATION_KEYS:
        assert _can(ident, "Read", key)
    for other in SILOS:
        assert _can(ident, "Read", _slot("messages", other))
        # nobody's updates or result records, its own included; no published final either
        for area in ("updates", "results", "published"):
            assert not _can(ident, "Read", _slot(area, other)), (ident, area, other)
    for action in ("List", "Tagging", "Admin"):
        for key in ("", "federations/", "messages/", f"updates/{silo}/"):
            assert not _can(ident, action, key), (ident, action, key)
    # CKKS ciphertexts (and their signatures) only: a silo recomputes the sum it decrypts
    for other in SILOS:
        base = f"updates/{other}/{FID}/00001/update"
        assert _can(ident, "Read", base + ".ckks") and _can(ident, "Read", base + ".ckks.sig")
        for ext in (".safetensors", ".masked", ".safetensors.sig", ".ckks.json", ".ckksx"):
            assert not _can(ident, "Read", base + ext), (ident, ext)


@pytest.mark.parametrize("silo", SILOS)
def test_silo_has_no_right_on_the_results_and_mlflow_buckets(silo: str) -> None:
    for bucket in (RESULTS_BUCKET, MLFLOW_BUCKET):
        for action in ("Read", "Write", "List", "Tagging", "Admin"):
            for key in ("", "x", f"{silo}/x", "federations/x", "messages/x"):
                assert not _can(f"silo-{silo}", action, key, bucket), (silo, bucket, action, key)


def test_silo_names_that_are_prefixes_of_each_other_stay_apart() -> None:
    silos = ("lab", "lab2", "lab-x", "la")
    for s in silos:
        for other in silos:
            for area in AREAS:
                key = _slot(area, other)
                assert _can(f"silo-{s}", "Write", key, silos=silos) is (s == other), (s, key)


def test_coordinator_writes_federations_only_and_reads_everything() -> None:
    for key in FEDERATION_KEYS:
        assert _can("coordinator", "Write", key)
        assert _can("coordinator", "Read", key)
    for silo in SILOS:
        for area in AREAS:
            assert _can("coordinator", "Read", _slot(area, silo))
            # it cannot forge a silo's update, result, message or published final
            assert not _can("coordinator", "Write", _slot(area, silo)), (area, silo)
    assert _can("coordinator", "List", "") and _can("coordinator", "List", "updates/clinic/")
    assert _can("coordinator", "Write", "x", RESULTS_BUCKET) and _can(
        "coordinator", "Read", "x", RESULTS_BUCKET
    )
    assert not _can("coordinator", "Read", "x", MLFLOW_BUCKET)
    assert not _can("coordinator", "Admin", "")


def test_mlflow_identity_is_confined_to_its_bucket() -> None:
    for action in ("Read", "Write", "List"):
        assert _can("mlflow", action, "artifacts/1/x", MLFLOW_BUCKET)
        assert not _can("mlflow", action, "x", DATA_BUCKET)
        assert not _can("mlflow", action, "x", RESULTS_BUCKET)


@pytest.mark.parametrize("name", ["a*", "a?", "a/b", "Clinic", "", "-a", "a b", "x" * 64])
def test_silo_names_that_would_be_patterns_are_refused(name: str) -> None:
    with pytest.raises(StackError, match="silo name"):
        credentials.identities(["clinic", name])


def test_silo_name_rule_matches_the_config_rule() -> None:
    from silotune.config import SiloSpec

    for name in ("clinic", "a", "lab-2", "x_y", "0", "x" * 63):
        assert state.SILO_NAME.match(name)
        SiloSpec(name=name, train_path="t.jsonl")
    for name in ("a*", "A", "a/b", "x" * 64):
        assert not state.SILO_NAME.match(name)
        with pytest.raises(ValueError):
            SiloSpec(name=name, train_path="t.jsonl")


def _stack(tmp_path: Path) -> state.Stack:
    st = state.Stack(root=tmp_path, ports={"prefect": 4321, "s3": 8333}, silos=list(SILOS))
    st.save()
    return st


def test_secrets_are_0600_and_generated_once(tmp_path: Path) -> None:
    st = _stack(tmp_path)
    credentials.write_identities(st)
    credentials.write_prefect_auth(st)
    secret = st.prefect_auth_string()
    creds = st.credentials()
    assert secret.startswith("silotune:") and len(secret) > 40
    for f in (
        st.prefect_auth_file,
        tmp_path / "s3" / "credentials.json",
        tmp_path / "s3" / "identities.json",
    ):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    os.chmod(st.prefect_auth_file, 0o644)
    credentials.write_identities(st)
    credentials.write_prefect_auth(st)
    assert st.prefect_auth_string() == secret and st.credentials() == creds
    assert stat.S_IMODE(st.prefect_auth_file.stat().st_mode) == 0o600
    ids = json.loads((tmp_path / "s3" / "identities.json").read_text())["identities"]
    assert {i["name"]: i["actions"] for i in ids} == credentials.identities(SILOS)
    assert len({i["credentials"][0]["accessKey"] for i in ids}) == len(ids)


def test_no_auth_string_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="no Prefect API auth string"):
        _stack(tmp_path).prefect_env()


def test_prefect_env_per_identity(tmp_path: Path) -> None:
    st = _stack(tmp_path)
    credentials.write_prefect_auth(st)
    secret = st.prefect_auth_string()
    coord = st.prefect_env()
    assert coord == {
        "PREFECT_API_URL": "http://127.0.0.1:4321/api",
        "PREFECT_API_AUTH_STRING": secret,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK": f"s3-bucket/{state.RESULTS_BLOCK}",
    }
    silo = st.prefect_env("silo-clinic")
    # a silo authenticates too, but keeps no result in the coordinator's result bucket, and has its own home
    assert silo == {
        "PREFECT_API_URL": "http://127.0.0.1:4321/api",
        "PREFECT_API_AUTH_STRING": secret,
        "PREFECT_HOME": str(tmp_path / "workers" / "silo-clinic" / "prefect"),
    }


def test_prefect_api_context_sets_the_auth_string(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    st = _stack(tmp_path)
    credentials.write_identities(st)
    credentials.write_prefect_auth(st)
    with prefect_api(st):
        assert PREFECT_API_URL.value() == st.prefect_api
        assert PREFECT_API_AUTH_STRING.value() == st.prefect_auth_string()
        assert os.environ["AWS_ACCESS_KEY_ID"] == st.credentials()["coordinator"]["access_key"]
    with api_settings(st):
        assert PREFECT_API_AUTH_STRING.value() == st.prefect_auth_string()


def test_spawned_processes_do_not_inherit_the_callers_identity(tmp_path: Path, monkeypatch) -> None:
    st = _stack(tmp_path)
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SESSION_TOKEN",
        "PREFECT_API_KEY",
        "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
    ):
        monkeypatch.setenv(var, "from-the-callers-shell")
    monkeypatch.setenv("SILOTUNE_PROBE", "kept")
    code = "import json, os; print('ENV=' + json.dumps(dict(os.environ)))"
    pid = supervise.spawn(st, "probe", [sys.executable, "-c", code], {"AWS_SECRET_ACCESS_KEY": "given"})
    os.waitpid(pid, 0)
    line = next(x for x in (st.logs / "probe.log").read_text().splitlines() if x.startswith("ENV="))
    env = json.loads(line.removeprefix("ENV="))
    assert env["SILOTUNE_PROBE"] == "kept" and env["AWS_SECRET_ACCESS_KEY"] == "given"
    assert not {k for k, v in env.items() if v == "from-the-callers-shell"}
