"""The typed round history: state files written before it load and save unchanged, and render the same."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from silotune.errors import StoreError
from silotune.federation.commit import load_state, save_state
from silotune.records import FederationState, HoldoutMetrics, ObjectRef, RoundSummary, SiloBytes
from silotune.report import history_table, ledger_table, round_table
from silotune.store import FederationLayout, LocalStore, put_json
from silotune.tracking import initial_metrics, round_metrics

FIXTURES = Path(__file__).parents[1] / "fixtures" / "legacy_state"
CASES = ("dp", "plain")


def _raw(case: str, name: str = "state.json") -> Any:
    return json.loads((FIXTURES / case / name).read_text())


def _stored(tmp_path: Path, raw: dict[str, Any]) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    put_json(store, FederationLayout(raw["federation_id"]).state(), raw)
    return store


@pytest.mark.parametrize("case", CASES)
def test_a_state_file_from_before_loads_typed_and_saves_byte_for_byte(case: str, tmp_path: Path) -> None:
    raw = _raw(case)
    store = _stored(tmp_path, raw)
    state = load_state(store, raw["federation_id"])
    assert state is not None and all(isinstance(h, RoundSummary) for h in state.history)
    key = FederationLayout(raw["federation_id"]).state()
    store.put(key, b"")
    save_state(store, state)
    assert store.get(key) == (FIXTURES / case / "state.json").read_bytes()


def test_the_fields_of_a_legacy_history() -> None:
    dp = FederationState.model_validate(_raw("dp"))
    h = dp.history[0]
    assert h.round == 1 and h.included == ["clinic", "lab", "bank"] and h.evaluated
    assert h.excluded["dud"].startswith("train: DataError:") and "bad_train.jsonl:2" in h.excluded["dud"]
    assert "bad_eval.jsonl:1: invalid JSON" in h.eval_failures["bank"]
    assert h.bytes["clinic"] == SiloBytes(up=3648, down=8216)
    assert h.client_dp_noise_multiplier == 0.3
    eps = [r.client_dp_epsilon for r in dp.history]
    assert eps[0] is not None and eps[1] is not None and 0 < eps[0] < eps[1]  # ε composes over rounds
    assert h.privacy["lab"]["dp.sample_rate"] == 0.4 and h.protection == "none"
    assert h.global_eval is not None and h.global_eval.num_examples == 12
    assert h.eval["lab"] == HoldoutMetrics(num_examples=4, loss=10.721920013427734, exact_match=0.0)
    assert dp.initial_eval is not None and set(dp.initial_eval.eval_failures) == {"bank"}
    assert dp.pending_evaluation is None

    plain = FederationState.model_validate(_raw("plain"))
    first, last = plain.history
    assert first.client_dp_epsilon is None and first.client_dp_noise_multiplier is None
    assert isinstance(first.train["clinic"]["num_examples"], int)  # ints stay ints
    assert first.train["clinic"]["update_norm"] == pytest.approx(2.446610721670079)
    assert first.eval_failures == {} and first.delta_norm == pytest.approx(1.7352556404494273)
    assert not last.evaluated and last.eval == {} and last.global_eval is None
    assert plain.pending_evaluation == 1


def test_history_entries_written_before_evaluation_was_pipelined_count_as_evaluated() -> None:
    raw = _raw("plain")
    del raw["history"][1]["evaluated"]
    state = FederationState.model_validate(raw)
    assert state.history[1].evaluated and state.pending_evaluation is None


@pytest.mark.parametrize("case", CASES)
def test_manifests_and_evaluation_files_are_what_the_model_produces(case: str) -> None:
    state = FederationState.model_validate(_raw(case))
    for r, h in enumerate(state.history):
        manifest = _raw(case, f"manifest-{r}.json")
        fields = h.manifest_fields()
        assert {k: manifest[k] for k in fields} == fields
        assert set(manifest) - set(fields) == {"federation_id", "fingerprint", "objects", "silotune_version"}
    assert state.initial_eval is not None
    evaluated = [(-1, state.initial_eval), *[(r, h) for r, h in enumerate(state.history) if h.evaluated]]
    for r, evaluation in evaluated:
        stored = _raw(case, "evaluation-initial.json" if r < 0 else f"evaluation-{r}.json")
        produced = evaluation.evaluation_file(
            federation_id=state.federation_id, round_=r, global_ref=ObjectRef(**stored["global"])
        )
        assert {**produced, "silotune_version": stored["silotune_version"]} == stored


def test_unknown_or_missing_fields_are_refused_naming_each(tmp_path: Path) -> None:
    raw = _raw("plain")
    raw["history"][0]["surprise"] = 1
    raw["history"][1]["eval"] = {"lab": {"loss": 1.0, "exact_match": 0.0}}
    raw["shiny_new"] = True
    store = _stored(tmp_path, raw)
    with pytest.raises(StoreError) as err:
        load_state(store, raw["federation_id"])
    msg = str(err.value)
    assert "state.json" in msg and "is not a state file" in msg
    for field in ("history.0.surprise", "history.1.eval.lab.num_examples", "shiny_new"):
        assert field in msg, msg


def test_holdout_metrics_mirror_the_evaluation_result() -> None:
    from silotune.evaluation import EvalResult

    assert list(HoldoutMetrics.model_fields) == [f.name for f in dataclasses.fields(EvalResult)]
    pref = EvalResult(num_examples=3, loss=1.5, exact_match=0.0, dpo_loss=0.6, pref_accuracy=1.0)
    assert HoldoutMetrics.model_validate(pref.as_dict()).as_dict() == pref.as_dict()


def _text(renderable: Any) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def test_history_and_ledger_tables_read_the_fields() -> None:
    dp = FederationState.model_validate(_raw("dp"))
    text = _text(history_table(dp.history, dp.initial_eval))
    assert "0 (initial)" in text and "10.846 / 0.00" in text  # clinic, initial global
    assert "10.788 / 0.00" in text and "3 / 1" in text  # weighted, round 2; 3 silos in, 1 out
    ledger = _text(ledger_table("legacy-fed", dp.history))
    assert "14.211" in ledger and "23.689" in ledger  # client ε after rounds 1 and 2
    assert "3,648 / 8,216" in ledger and "3.285 (0.001)" in ledger


def test_round_table_rows() -> None:
    dp = FederationState.model_validate(_raw("dp"))
    rows = round_table(dp.history[0])
    assert [r["silo"] for r in rows] == ["bank", "clinic", "dud", "lab", "GLOBAL (weighted)"]
    status = {r["silo"]: r["status"] for r in rows}
    assert status["clinic"] == "included" and status["dud"].startswith("excluded: train: DataError")
    assert status["bank"].startswith("included; evaluation failed: DataError")
    assert rows[-1]["update_norm"] == round(dp.history[0].delta_norm or 0, 4) and rows[-1]["examples"] == 12
    plain = FederationState.model_validate(_raw("plain"))
    clinic = round_table(plain.history[0])[0]
    assert (
        clinic["examples"] == 16
        and clinic["train_loss_first"] == 10.8123
        and clinic["holdout_loss"] == 10.675
    )
    pending = round_table(plain.history[1])
    assert pending[-1]["holdout_loss"] == "" and pending[0]["holdout_loss"] == ""


def test_mlflow_metric_names_and_values() -> None:
    plain = FederationState.model_validate(_raw("plain"))
    h = plain.history[0]
    metrics = round_metrics(h)
    per_silo = [
        "bytes_down", "bytes_up", "eval.exact_match", "eval.loss", "eval.num_examples", "train.final_loss",
        "train.first_loss", "train.mean_loss", "train.num_examples", "train.seconds", "train.steps",
        "train.tokens", "train.tokens_per_second", "train.update_bytes", "train.update_norm",
    ]  # fmt: skip
    assert sorted(metrics) == sorted(
        ["global.exact_match", "global.loss", "global.num_examples", "round.delta_norm"]
        + ["round.excluded_silos", "round.included_silos"]
        + [f"silo.{s}.{m}" for s in ("clinic", "lab") for m in per_silo]
    )
    assert metrics["silo.lab.train.steps"] == 2.0 and metrics["round.excluded_silos"] == 1.0
    dp = FederationState.model_validate(_raw("dp"))
    m = round_metrics(dp.history[1])
    assert m["client_dp.epsilon"] == dp.history[1].client_dp_epsilon and m["silo.bank.dp.epsilon"] > 0
    assert "silo.bank.eval.loss" not in m  # bank's evaluation failed
    assert initial_metrics(dp.initial_eval) == {
        "global.exact_match": 0.0,
        "global.loss": 10.7919069925944,
        "global.num_examples": 12.0,
        **{
            f"silo.{s}.eval.{k}": float(v)
            for s, e in _raw("dp")["initial_eval"]["eval"].items()
            for k, v in e.items()
        },
    }
    assert initial_metrics(None) == {}
