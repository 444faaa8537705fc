"""``plan``: the paper's Figure 2 on four archetype consortia (the bundled examples/plan/*.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from silotune.config import parse_config
from silotune.errors import ConfigError
from silotune.openness import Openness
from silotune.plan import load_answers, make_plan, parse_answers, to_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plan"


def _rec(plan, item: str) -> bool:
    return next(d for d in plan.defenses if d.item == item).recommended


def test_hospital_consortium_strict_privacy_24gb() -> None:
    a = load_answers(EXAMPLES / "hospital.yaml")
    p = make_plan(a)
    assert p.openness is Openness.OPEN_SOURCE and "strict privacy" in p.openness_reason
    assert p.model == "mistral-7b"  # permissive licence required: Apache-2.0, not a Llama licence
    assert {s.method for s in p.silos} == {"lora"} and all(s.rank == 16 for s in p.silos)
    assert all(s.estimate_gb is not None and s.estimate_gb <= 21.6 for s in p.silos)
    assert (
        _rec(p, "differential_privacy")
        and _rec(p, "secure_aggregation")
        and not _rec(p, "robust_aggregation")
    )
    cfg = parse_config(to_config(a, p))
    assert cfg.method.options["base_dtype"] == "bfloat16" and cfg.model.descriptor == "mistral-7b"


def test_edge_silos_8gb_get_4bit_qlora() -> None:
    a = load_answers(EXAMPLES / "edge.yaml")
    p = make_plan(a)
    assert p.model == "mistral-7b"
    for s in p.silos:
        assert (s.method, s.bits, s.gradient_checkpointing) == ("qlora", 4, True)
        assert "a more precise base does not fit" in s.reason and s.estimate_gb <= 7.2
    cfg = parse_config(to_config(a, p))
    assert cfg.method.name == "qlora" and cfg.method.options["bits"] == 4


def test_black_box_only_team() -> None:
    a = load_answers(EXAMPLES / "blackbox.yaml")
    p = make_plan(a)
    assert p.openness is Openness.BLACK_BOX and not p.feasible
    assert all(s.method == "textual prompt engineering only" for s in p.silos)
    assert not any(d.recommended for d in p.defenses)
    assert any("never leaves the silo" in w or "data to the model provider" in w for w in p.warnings)
    with pytest.raises(ConfigError, match="no federation config can implement this plan"):
        to_config(a, p)
    gray = make_plan(parse_answers({**a.model_dump(), "provider_api": "finetune"}))
    assert gray.openness is Openness.GRAY_BOX and gray.model == "hosted-finetune-api"
    # Strict privacy without local compute has no compliant answer: refused, not downgraded to an API.
    strict = make_plan(parse_answers({**a.model_dump(), "privacy": "strict"}))
    assert not strict.feasible and strict.openness is Openness.OPEN_SOURCE
    assert "no configuration satisfies" in strict.openness_reason


def test_mixed_budget_consortium_mixes_bit_widths_in_one_federation() -> None:
    a = load_answers(EXAMPLES / "mixed.yaml")
    p = make_plan(a)
    by = {s.name: s for s in p.silos}
    assert p.model == "mistral-7b"
    assert (by["lab-a100"].method, by["lab-a100"].gradient_checkpointing) == ("lora", False)
    assert (by["lab-4090"].method, by["lab-4090"].gradient_checkpointing) == ("lora", True)
    assert (by["clinic-12g"].method, by["clinic-12g"].bits) == ("qlora", 4)
    assert by["office-cpu"].device.startswith("CPU") and "slow" in by["office-cpu"].reason
    assert len({s.rank for s in p.silos}) == 1  # one adapter shape: every silo aggregates
    assert (
        _rec(p, "robust_aggregation") and not _rec(p, "secure_aggregation") and _rec(p, "dpo_reference_model")
    )
    cfg = parse_config(to_config(a, p))
    assert cfg.aggregation.name == "trimmed_mean" and cfg.objective.name == "dpo"
    assert {s.name: (s.method.name if s.method else cfg.method.name) for s in cfg.silos} == {
        "lab-a100": "lora",
        "lab-4090": "lora",
        "clinic-12g": "qlora",
        "office-cpu": "lora",
    }


def test_licence_answers_steer_the_openness_class() -> None:
    base = {"silos": [{"name": "a", "vram_gb": 24}], "model_size_b": 8, "privacy": "moderate"}
    assert make_plan(parse_answers(base)).model in ("llama-3.1-8b", "mistral-7b")
    big = make_plan(
        parse_answers({**base, "model": "llama-3.1-8b", "licence": {"monthly_active_users": 9e8}})
    )
    assert any("700 million monthly active users" in w for w in big.warnings)
    os_only = make_plan(parse_answers({**base, "licence": {"monthly_active_users": 9e8}}))
    assert os_only.openness is Openness.OPEN_SOURCE and "700M monthly-user limit" in os_only.openness_reason
    with pytest.raises(ConfigError, match="silos: List should have at least 1 item"):
        parse_answers({"silos": []})


def test_cli_plan_writes_a_valid_config(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "fed.yaml"
    res = CliRunner().invoke(
        app,
        [
            "plan",
            "--privacy",
            "strict",
            "--silo",
            "a:8",
            "--silo",
            "b:0:32",
            "--model-size",
            "0.135",
            "--write-config",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "openness class" in res.output and "Method per silo" in res.output
    cfg = parse_config(yaml.safe_load(out.read_text()))
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    res = CliRunner().invoke(app, ["plan", str(EXAMPLES / "blackbox.yaml"), "--write-config", str(out)])
    assert res.exit_code == 2 and "no federation config can implement this plan" in res.output


def test_written_config_estimates_match_the_plan() -> None:
    """The per-silo memory model of a config (silotune estimate) reproduces the plan's numbers."""
    from silotune.silo_memory import estimate_silo

    full = {
        "silos": [{"name": "gpu", "vram_gb": 80}, {"name": "cpu", "vram_gb": 0, "ram_gb": 256}],
        "prefer_full_finetuning": True,
        "model_size_b": 0.135,
    }
    for a in (load_answers(EXAMPLES / "mixed.yaml"), parse_answers(full)):
        p = make_plan(a)
        cfg = parse_config(to_config(a, p))
        for s in p.silos:
            assert estimate_silo(cfg, s.name).total / 1e9 == pytest.approx(s.estimate_gb, abs=0.01)
    # Full fine-tuning on both: bf16 on the GPU silo, fp32 on the CPU silo (each as estimated).
    assert {s.method for s in p.silos} == {"full"}
    assert cfg.method_for("gpu").options.get("base_dtype") == "bfloat16"
    assert cfg.method_for("cpu").options.get("base_dtype", "float32") == "float32"


def test_estimate_reads_a_local_model_shape(tmp_path: Path) -> None:
    from silotune.silo_memory import estimate_silo

    cfg = parse_config(
        {
            "federation_id": "e",
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 64},
            "lora": {"r": 4},
            "silos": [{"name": "a", "train_path": "a.jsonl"}],
            "tracking": {"kind": "none"},
        }
    )
    e = estimate_silo(cfg, "a")
    assert e.model == "tiny-llama" and e.trainable_params == 2 * 4 * (64 + 64 + 64 + 32)
