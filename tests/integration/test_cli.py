"""The command line: config errors before training, demo data, run + summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app

pytestmark = [pytest.mark.integration]
runner = CliRunner()


def test_invalid_config_fails_before_training_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"federation_id": "x", "rounds": -1, "silos": [{"name": "a", "train_path": "missing.jsonl"}]}
        )
    )
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 2
    assert "rounds" in res.output and "greater than or equal to 1" in res.output
    cfg.write_text(
        yaml.safe_dump({"federation_id": "x", "silos": [{"name": "a", "train_path": "missing.jsonl"}]})
    )
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 2 and "silos.0.train_path: file not found" in res.output


def test_missing_model_folder_fails_in_one_line_before_prefect_starts(
    tmp_path: Path, demo_data, monkeypatch
) -> None:
    cfg = tmp_path / "c.yaml"
    silo = {"name": "a", "train_path": str(demo_data["lab"]["train"])}
    model = {"name_or_path": str(tmp_path / "no-such-model")}
    cfg.write_text(yaml.safe_dump({"federation_id": "x", "model": model, "silos": [silo]}))
    # Importing the flow module (Prefect, then its server on the first flow call) would fail the command.
    monkeypatch.setitem(sys.modules, "flows.federated_training", None)
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "model.name_or_path" in res.output and "no-such-model" in res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)


def test_make_demo_data_and_aggregators(tmp_path: Path) -> None:
    res = runner.invoke(app, ["make-demo-data", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d" / "union_eval.jsonl").is_file()
    res = runner.invoke(app, ["aggregators"])
    assert "fedavg" in res.output


def test_run_then_summary(tmp_path: Path, demo_data) -> None:
    """The installed ``silotune`` command in its own process (its own ephemeral Prefect API)."""
    cfg = {
        "federation_id": "cli-fed",
        "rounds": 1,
        "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
        "lora": {"r": 4},
        "train": {"local_steps": 1, "batch_size": 2},
        "silos": [
            {
                "name": "lab",
                "train_path": str(demo_data["lab"]["train"]),
                "eval_path": str(demo_data["lab"]["eval"]),
            }
        ],
        "store": {"root": str(tmp_path / "store")},
        "tracking": {"kind": "none"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "run", str(tmp_path / "c.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final adapter" in proc.stdout
    assert "0 (initial)" in proc.stdout  # the base model's row before round 1
    res = runner.invoke(app, ["summary", "cli-fed", "--store", str(tmp_path / "store")])
    assert res.exit_code == 0 and "1 round(s) completed" in res.output
    res = runner.invoke(app, ["summary", "nope", "--store", str(tmp_path / "store")])
    assert res.exit_code == 2 and "no federation 'nope'" in res.output
