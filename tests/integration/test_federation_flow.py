"""The coordinator flow end to end on the tiny model: rounds, store layout, MLflow, resume, quorum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from silotune.config import FederationConfig, parse_config
from silotune.errors import QuorumError
from silotune.records import Evaluation, RoundSummary
from silotune.store import FederationLayout, LocalStore, get_json, get_tensors, sha256

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


def _config(
    tmp: Path,
    demo_data,
    fid: str,
    *,
    rounds: int = 2,
    silos=("clinic", "lab"),
    min_silos: int = 2,
    tracking: bool = True,
) -> FederationConfig:
    return parse_config(
        {
            "federation_id": fid,
            "rounds": rounds,
            "seed": 1,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
            "lora": {"r": 4},
            "train": {"local_steps": 2, "batch_size": 4, "learning_rate": 5e-2},
            "silos": [
                {"name": s, "train_path": str(demo_data[s]["train"]), "eval_path": str(demo_data[s]["eval"])}
                for s in silos
            ],
            "aggregation": {"min_silos": min_silos},
            "store": {"root": str(tmp / "store")},
            "tracking": {
                "kind": "mlflow" if tracking else "none",
                "uri": f"sqlite:///{tmp / 'mlflow.db'}",
                "artifact_root": str(tmp / "mlartifacts"),
                "experiment": "test",
            },
        }
    )


def _final(cfg: FederationConfig, rounds: int) -> dict[str, torch.Tensor]:
    return get_tensors(LocalStore(cfg.store.root), FederationLayout(cfg.federation_id).global_adapter(rounds))


def test_two_silos_two_rounds(tmp_path: Path, demo_data) -> None:
    from mlflow.tracking import MlflowClient
    from peft import PeftModel

    from flows.federated_training import federated_training
    from silotune.modeling import load_base_model, resolve_model_path

    cfg = _config(tmp_path, demo_data, "fed-a")
    out = federated_training(cfg)
    assert out["rounds"] == 2 and len(out["history"]) == 2

    store = LocalStore(cfg.store.root)
    lay = FederationLayout("fed-a")
    for r in range(2):
        manifest = get_json(store, lay.manifest(r))
        assert manifest["included"] == ["clinic", "lab"] and manifest["excluded"] == {}
        for ref in manifest["objects"].values():  # every object the manifest names is intact
            assert sha256(store.get(ref["key"])) == ref["sha256"]
        assert set(manifest["objects"]) == {"global_in", "global_out", "update/clinic", "update/lab"}
        assert manifest["train"]["clinic"]["steps"] == 2
    state = get_json(store, lay.state())
    assert state["completed_rounds"] == 2 and state["global_ref"]["key"] == lay.global_adapter(2)
    assert not any(k.endswith(".pkl") or k.endswith(".pt") for k in store.list())

    # MLflow: one parent run, one nested run per round, per-silo and global metrics, the adapter and a plot.
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(out["tracking_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["aggregator"] == "fedavg"
    hist = client.get_metric_history(run.info.run_id, "global.loss")
    assert [m.step for m in hist] == [0, 1, 2]
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert sorted(c.data.tags["mlflow.runName"] for c in children) == ["round-1", "round-2"]
    assert "silo.lab.train.final_loss" in children[0].data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "plots", "federation.yaml"} <= arts
    local = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp_path / "dl")))
    model = PeftModel.from_pretrained(load_base_model(resolve_model_path("tiny-llama")), local)
    ids = torch.tensor([[5, 6, 7]])
    assert model(input_ids=ids).logits.shape[-1] > 0

    # The final adapter in the store is the round-2 global.
    final = store.get("federations/fed-a/final/adapter_model.safetensors")
    assert len(final) > 0


def test_crash_then_resume_matches_uninterrupted(tmp_path: Path, demo_data, monkeypatch) -> None:
    import silotune.federation as fed
    from flows.federated_training import federated_training

    straight = _config(tmp_path / "a", demo_data, "fed-straight", rounds=3, tracking=False)
    federated_training(straight)

    crashy = _config(tmp_path / "b", demo_data, "fed-crash", rounds=3, tracking=False)
    real_aggregate = fed.aggregate_round

    def crash_in_round_2(config, store, round_, global_ref, records):
        if round_ == 1:
            raise RuntimeError("coordinator crashed")
        return real_aggregate(config, store, round_, global_ref, records)

    monkeypatch.setattr("tasks.aggregate.aggregate_round", crash_in_round_2)
    with pytest.raises(RuntimeError, match="coordinator crashed"):
        federated_training(crashy)
    state = get_json(LocalStore(crashy.store.root), FederationLayout("fed-crash").state())
    assert state["completed_rounds"] == 1
    monkeypatch.setattr("tasks.aggregate.aggregate_round", real_aggregate)

    out = federated_training(crashy)  # same federation id: resumes at round 2
    assert out["rounds"] == 3
    a, b = _final(straight, 3), _final(crashy, 3)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed federation differs from the uninterrupted one"
    # The history holds each round once: round 1 was committed before the crash and kept.
    assert [h.round for h in out["history"]] == [1, 2, 3]


def test_resume_refuses_a_changed_config(tmp_path: Path, demo_data) -> None:
    from flows.federated_training import federated_training
    from silotune.errors import ConfigError

    cfg = _config(tmp_path, demo_data, "fed-c", rounds=1, tracking=False)
    federated_training(cfg)
    changed = parse_config(
        {**cfg.model_dump(mode="json"), "train": {**cfg.train.model_dump(), "local_steps": 3}}
    )
    with pytest.raises(ConfigError, match="different configuration"):
        federated_training(changed)


def test_failed_silo_is_excluded_and_round_completes_with_quorum(tmp_path: Path, demo_data) -> None:
    from flows.federated_training import federated_training

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "response": "y"}\n{"oops"\n')
    cfg = _config(tmp_path, demo_data, "fed-q", rounds=1, silos=("clinic", "lab", "bank"), tracking=False)
    data = cfg.model_dump(mode="json")
    data["silos"][2]["train_path"] = str(bad)
    cfg = parse_config(data)
    out = federated_training(cfg)
    h = out["history"][0]
    assert h.included == ["clinic", "lab"]
    assert "bad.jsonl:2: invalid JSON" in h.excluded["bank"]

    cfg3 = parse_config({**data, "federation_id": "fed-q3", "aggregation": {"min_silos": 3}})
    with pytest.raises(QuorumError, match="quorum is 3"):
        federated_training(cfg3)


def test_tampered_update_is_excluded_not_aggregated(tmp_path: Path, demo_data) -> None:
    from silotune.federation import ObjectRef, UpdateRecord, aggregate_round, start_federation
    from tasks.runtime import adapter_for

    cfg = _config(
        tmp_path, demo_data, "fed-t", rounds=1, silos=("clinic", "lab"), min_silos=1, tracking=False
    )
    store = LocalStore(cfg.store.root)
    adapter = adapter_for(cfg)
    state = start_federation(cfg, store, adapter)
    g = get_tensors(store, state.global_ref.key)
    lay = FederationLayout("fed-t")
    from silotune.store import put_tensors

    recs = []
    for silo, scale in (("clinic", 1.0), ("lab", float("nan"))):
        d = {k: torch.full_like(v, 0.01 * scale) for k, v in g.items()}
        key = lay.update(0, silo)
        recs.append(
            UpdateRecord(
                silo=silo,
                round=0,
                update=ObjectRef(key=key, sha256=put_tensors(store, key, d)),
                num_examples=5,
                train={},
            )
        )
    agg = aggregate_round(cfg, store, 0, state.global_ref, recs)
    assert agg.included == ["clinic"] and "non-finite" in agg.excluded["lab"]
    store.put(lay.update(0, "clinic"), b"garbage")  # checksum no longer matches
    with pytest.raises(QuorumError, match="sha256 mismatch"):
        aggregate_round(cfg, store, 0, state.global_ref, recs)
    # Nothing stored was lost: the global adapter is intact.
    assert sha256(store.get(state.global_ref.key)) == state.global_ref.sha256
    json.dumps(agg.model_dump())  # records stay small and serialisable


# -- one wave of silo runs per round: evaluation rides along with the next round's training ----------

TIMING = {"seconds", "tokens_per_second"}  # wall-clock fields of a silo's training record


def _silo_runs(coordinator_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[coordinator_run_id])
            )
        )


def _comparable(history: list[RoundSummary]) -> list[dict]:
    """History without wall-clock fields and without ``delta_norm`` (a float64 reduction over threads:
    compared to 1e-12 on its own)."""
    def plain(h: RoundSummary) -> dict:
        d = h.model_dump(exclude={"delta_norm", "committed_at"})
        return {k: v for k, v in d.items() if not k.endswith("_seconds")}  # round, aggregate, eval timings

    return [
        {
            **plain(h),
            "train": {s: {k: v for k, v in t.items() if k not in TIMING} for s, t in h.train.items()},
        }
        for h in history
    ]


def _by_silo(evaluation: Evaluation) -> dict[str, dict[str, float | int]]:
    return {silo: m.as_dict() for silo, m in evaluation.eval.items()}


def test_rounds_take_one_silo_wave_each_plus_a_final_evaluation(tmp_path: Path, demo_data) -> None:
    """R rounds = R waves of silo-round runs + 1 evaluate-only wave; the evaluations recorded for each
    round are exactly what evaluating each committed global right after its aggregation gives."""
    from flows.federated_training import federated_training
    from silotune.federation import ObjectRef, evaluate_silo
    from tasks.runtime import adapter_for

    cfg = _config(tmp_path, demo_data, "fed-w", rounds=3, tracking=False)
    state = federated_training(cfg, return_state=True)
    out = state.result()
    names = sorted(fr.name for fr in _silo_runs(state.state_details.flow_run_id))
    assert names == sorted(
        [f"{s}-round-{r}" for s in ("clinic", "lab") for r in range(3)]
        + [f"{s}-evaluate-2" for s in ("clinic", "lab")]
    )  # 3 rounds: 4 waves (the old structure took 7: initial eval + 3 x (train + eval))

    store, lay = LocalStore(cfg.store.root), FederationLayout("fed-w")
    refs = [ObjectRef(**get_json(store, lay.manifest(0))["objects"]["global_in"])]
    refs += [ObjectRef(**get_json(store, lay.manifest(r))["objects"]["global_out"]) for r in range(3)]
    expected = [
        {
            s: evaluate_silo(cfg, s, r - 1, refs[r], store, adapter_for(cfg, s)).result
            for s in ("clinic", "lab")
        }
        for r in range(4)
    ]
    assert _by_silo(out["initial_eval"]) == expected[0]
    assert [_by_silo(h) for h in out["history"]] == expected[1:]
    assert all(h.evaluated and h.global_eval.num_examples > 0 for h in out["history"])
    for r in range(-1, 3):  # the write-once evaluation objects beside the manifests hold the same numbers
        assert get_json(store, lay.evaluation(r))["eval"] == expected[r + 1]
    assert "eval" not in get_json(store, lay.manifest(0))  # manifests are written before evaluation


def test_crash_before_a_rounds_evaluation_arrived_resumes_and_fills_it_in(
    tmp_path: Path, demo_data, monkeypatch
) -> None:
    from flows.federated_training import federated_training
    from flows.runner import InProcessRunner
    from silotune.federation import load_state

    # ids of one length: the update payloads (and their byte counts) carry the id
    straight = _config(tmp_path / "a", demo_data, "fed-e-a", rounds=3, tracking=False)
    expected = federated_training(straight)

    crashy = _config(tmp_path / "b", demo_data, "fed-e-b", rounds=3, tracking=False)
    real_round = InProcessRunner.run_round

    def crash_in_round_2(self, config, round_, global_ref, *, evaluate, reuse=None, silos=None):
        if round_ == 1:  # round 1 is committed; its evaluation would come with this wave
            raise RuntimeError("coordinator crashed")
        return real_round(self, config, round_, global_ref, evaluate=evaluate, reuse=reuse, silos=silos)

    monkeypatch.setattr(InProcessRunner, "run_round", crash_in_round_2)
    with pytest.raises(RuntimeError, match="coordinator crashed"):
        federated_training(crashy)
    store, lay = LocalStore(crashy.store.root), FederationLayout("fed-e-b")
    state = load_state(store, "fed-e-b")
    assert state.completed_rounds == 1 and state.pending_evaluation == 0
    assert state.history[0].evaluated is False and state.history[0].eval == {}
    assert not store.exists(lay.evaluation(0))
    monkeypatch.setattr(InProcessRunner, "run_round", real_round)

    out = federated_training(crashy)  # resumes at round 2; its wave supplies round 1's evaluation
    a, b = _final(straight, 3), _final(crashy, 3)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed federation differs from the uninterrupted one"
    assert _comparable(out["history"]) == _comparable(expected["history"])
    norms = [h.delta_norm for h in expected["history"]]
    assert [h.delta_norm for h in out["history"]] == pytest.approx(norms, rel=1e-12)
    untimed = {"eval_seconds"}
    assert out["initial_eval"].model_dump(exclude=untimed) == expected["initial_eval"].model_dump(exclude=untimed)
    assert get_json(store, lay.evaluation(0))["eval"] == _by_silo(expected["history"][0])


def test_a_wave_below_quorum_still_records_the_evaluations_it_got(
    tmp_path: Path, demo_data, monkeypatch
) -> None:
    """lab's training fails in round 2 (quorum 2 lost), but its evaluation of round 1's output counts."""
    import silotune.federation.silo as fed_silo
    from flows.federated_training import federated_training
    from silotune.federation import load_state

    real_train = fed_silo.train_step

    def lab_fails_in_round_2(config, silo, round_, *args, **kwargs):
        if silo == "lab" and round_ == 1:
            raise RuntimeError("privacy budget spent")
        return real_train(config, silo, round_, *args, **kwargs)

    monkeypatch.setattr("tasks.local_train.train_step", lab_fails_in_round_2)
    cfg = _config(tmp_path, demo_data, "fed-qe", rounds=2, tracking=False)
    with pytest.raises(QuorumError, match="round 2: only 1 silo"):
        federated_training(cfg)
    store, lay = LocalStore(cfg.store.root), FederationLayout("fed-qe")
    state = load_state(store, "fed-qe")
    assert state.completed_rounds == 1 and state.pending_evaluation is None
    h = state.history[0]
    assert h.evaluated and sorted(h.eval) == ["clinic", "lab"]
    assert get_json(store, lay.evaluation(0))["eval"] == _by_silo(h)
