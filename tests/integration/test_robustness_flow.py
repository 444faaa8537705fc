"""Attackers, FLTrust, the audit and the grid through the real flows, on the tiny model (1 round each)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from silotune.adapters import global_norm
from silotune.config import FederationConfig, dump_config, parse_config
from silotune.store import FederationLayout, LocalStore, get_json, get_tensors

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


def _config(tmp: Path, demo_data, fid: str, *, aggregation: dict, mallory: dict) -> FederationConfig:
    silos = [
        {"name": s, "train_path": str(demo_data[s]["train"]), "eval_path": str(demo_data[s]["eval"])}
        for s in ("clinic", "bank", "lab")
    ]
    silos.append({"name": "mallory", "train_path": str(demo_data["clinic"]["train"]), **mallory})
    return parse_config(
        {
            "federation_id": fid,
            "rounds": 1,
            "seed": 2,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
            "lora": {"r": 4},
            "train": {"local_steps": 2, "batch_size": 4, "learning_rate": 5e-2, "proximal_mu": 0.01},
            "silos": silos,
            "aggregation": {**aggregation, "min_silos": 3},
            "store": {"root": str(tmp / "store")},
            "tracking": {
                "uri": f"sqlite:///{tmp / 'mlflow.db'}",
                "artifact_root": str(tmp / "mlartifacts"),
                "experiment": "test-robust",
            },
        }
    )


def test_scaling_backdoor_attacker_under_fltrust_then_audit(tmp_path: Path, demo_data) -> None:
    from mlflow.tracking import MlflowClient

    from cli import app
    from flows.federated_training import federated_training

    cfg = _config(
        tmp_path,
        demo_data,
        "fed-attacked",
        aggregation={"name": "fltrust", "root_data_path": str(demo_data["lab"]["train"])},
        mallory={
            "attack": {"name": "scale", "options": {"factor": 5.0}},
            "poison": {"backdoor_trigger": "cf-zebra", "backdoor_target": "EVIL", "backdoor_fraction": 0.5},
        },
    )
    out = federated_training(cfg)
    store = LocalStore(cfg.store.root)
    lay = FederationLayout(cfg.federation_id)
    manifest = get_json(store, lay.manifest(0))
    assert manifest["included"] == ["clinic", "bank", "lab", "mallory"]
    # The silo reports its honest update's norm; what it uploaded is the attack (5 × that update).
    uploaded = get_tensors(store, lay.update(0, "mallory"))
    assert global_norm(uploaded) == pytest.approx(5 * manifest["train"]["mallory"]["update_norm"], rel=1e-5)
    # The coordinator trained its FLTrust root update on the root data set.
    assert global_norm(get_tensors(store, lay.root_update(0))) > 0
    assert math.isfinite(out["final"].loss)

    # The audit on the finished federation, from the CLI, logs to the federation's MLflow run.
    cfg_path = tmp_path / "federation.yaml"
    dump_config(cfg, cfg_path)
    res = CliRunner().invoke(
        app, ["audit", str(cfg_path), "--max-examples", "12", "--out", str(tmp_path / "a")]
    )
    assert res.exit_code == 0, res.output
    assert "reference" in res.output and "backdoor of silo mallory" in res.output
    run = MlflowClient(cfg.tracking.uri).get_run(out["tracking_run_id"])
    for key in (
        "audit.mia.loss.auc",
        "audit.mia.reference.tpr_at_1pct_fpr",
        "audit.backdoor.mallory.attack_success_rate",
    ):
        assert key in run.data.metrics, key
    arts = {a.path for a in MlflowClient(cfg.tracking.uri).list_artifacts(run.info.run_id, "audit")}
    assert {"audit/audit.json", "audit/audit_roc.png", "audit/audit.md"} <= arts
    assert (tmp_path / "a" / "audit_roc.png").read_bytes()[:4] == b"\x89PNG"


def test_nan_attacker_is_excluded_and_the_round_goes_on(tmp_path: Path, demo_data) -> None:
    from flows.federated_training import federated_training

    cfg = _config(
        tmp_path, demo_data, "fed-nan", aggregation={"name": "median"}, mallory={"attack": {"name": "nan"}}
    )
    out = federated_training(cfg)
    h = out["history"][0]
    assert h.included == ["clinic", "bank", "lab"]
    assert "non-finite" in h.excluded["mallory"]


def test_fltrust_without_root_data_is_refused(tmp_path: Path, demo_data) -> None:
    from silotune.errors import ConfigError

    with pytest.raises(ConfigError, match="root_data_path"):
        _config(tmp_path, demo_data, "fed-x", aggregation={"name": "fltrust"}, mallory={})


def test_robustness_grid_writes_table_plot_and_artifacts_and_reuses_identical_work(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from flows.robustness import robustness_grid

    res = robustness_grid(
        str(tmp_path),
        model="tiny-llama",
        attacks=["none", "scale"],
        rules=["median"],
        rounds=1,
        local_steps=1,
    )
    assert len(res["rows"]) == 2 and all(r["mallory_included_rounds"] == 1 for r in res["rows"])
    # The second cell reuses the 4 silos' round-1 training (the attack applies after it) and the 3
    # initial evaluations; its aggregate differs (mallory scaled x10), so the round-1 evaluations run.
    assert res["memo"] == {"hits": 7, "misses": 13, "entries": 13}
    clean, scaled = res["rows"]
    assert clean["union_loss"] != scaled["union_loss"]
    for key in ("csv", "markdown", "png", "json"):
        assert Path(res["paths"][key]).is_file()
    assert "| scale | " in Path(res["paths"]["markdown"]).read_text()
    client = MlflowClient(f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    arts = {a.path for a in client.list_artifacts(res["mlflow_run_id"], "robustness")}
    assert "robustness/grid.png" in arts and "robustness/grid.csv" in arts
    assert [r["attack"] for r in yaml.safe_load(Path(res["paths"]["json"]).read_text())] == ["none", "scale"]
