"""The real stack on loopback: SeaweedFS, Prefect server, MLflow server, one in-process worker per pool.

One stack for the module (free ports, a temporary state folder). The tests run in order: a federation
through the workers; a silo killed mid-round (the quorum holds); a silo killed mid-round below quorum,
then a coordinator restart that resumes after the last completed round; finally ``down`` must leave
no process and no open port.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from silotune.config import FederationConfig, StoreSpec, parse_config
from silotune.errors import StoreError
from silotune.store import FederationLayout, S3Store, get_json, sha256

pytestmark = [pytest.mark.integration, pytest.mark.stack, pytest.mark.timeout(600)]

SILOS = ("clinic", "lab")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from flows import stack as stk

    root = tmp_path_factory.mktemp("stack")
    st = stk.up(root, silos=list(SILOS), auto_ports=True, echo=print)
    yield st
    with contextlib.suppress(Exception):  # the last test stops it and checks; this is the safety net
        stk.down(root, echo=print)


def _config(st: Any, demo_data, fid: str, **over: Any) -> FederationConfig:
    data = {
        "federation_id": fid,
        "rounds": 2,
        "seed": 1,
        "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
        "lora": {"r": 4},
        "train": {"local_steps": 2, "batch_size": 4, "learning_rate": 5e-2, "torch_threads": 1},
        "silos": [
            {"name": s, "train_path": str(demo_data[s]["train"]), "eval_path": str(demo_data[s]["eval"])}
            for s in SILOS
        ],
        "aggregation": {"min_silos": 2},
        "evaluation": {"max_examples": 8},
        "store": st.store_spec(),
        "tracking": st.tracking_spec("stack-test"),
        "orchestration": {"mode": "workpools", "silo_timeout_s": 120, "pickup_timeout_s": 60},
    }
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    return parse_config(data)


def _start(st: Any, cfg: FederationConfig) -> Any:
    from flows.stack import prefect_api

    with prefect_api(st):
        from prefect.deployments import run_deployment

        return run_deployment("federated-training/federated-training", parameters={"config": cfg}, timeout=0)


def _wait_final(st: Any, flow_run_id: Any, timeout: float = 300) -> Any:
    from flows.stack import prefect_api

    with prefect_api(st):
        from prefect.client.orchestration import get_client

        deadline = time.monotonic() + timeout
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                fr = client.read_flow_run(flow_run_id)
                if fr.state is not None and fr.state.is_final():
                    return fr
                time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} not final after {timeout} s")


def _silo_runs(st: Any, fid: str) -> list[Any]:
    from flows.stack import prefect_api

    with prefect_api(st):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"federation:{fid}"]))
            )


def _store(st: Any, identity: str = "coordinator") -> S3Store:
    from flows.stack import s3_client

    return S3Store(StoreSpec(**st.store_spec()), client=s3_client(st, identity))


def _kill_mid_run(st: Any, fid: str, run_name: str, pool: str, timeout: float = 180) -> None:
    """SIGKILL ``pool``'s worker as soon as the silo run ``run_name`` of ``fid`` is running."""
    from flows.stack import kill_worker

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for fr in _silo_runs(st, fid):
            if fr.name == run_name and fr.state is not None and not fr.state.is_scheduled():
                assert not fr.state.is_final(), f"{run_name} finished too fast"
                if fr.state.is_running():
                    kill_worker(st, pool)
                    return
        time.sleep(0.1)
    raise AssertionError(f"{run_name} of {fid} never started")


def test_federation_through_workers(stack, demo_data) -> None:
    from mlflow.tracking import MlflowClient

    t0 = time.monotonic()
    cfg = _config(stack, demo_data, "stack-a")
    fr = _wait_final(stack, _start(stack, cfg).id)
    assert fr.state.is_completed(), fr.state.message
    print(f"2-silo, 2-round federation through the workers: {time.monotonic() - t0:.1f} s")

    # The bucket: both rounds' updates and manifests, every object intact.
    store, lay = _store(stack), FederationLayout("stack-a")
    for r in range(2):
        manifest = get_json(store, lay.manifest(r))
        assert manifest["included"] == ["clinic", "lab"] and manifest["excluded"] == {}
        assert set(manifest["objects"]) == {"global_in", "global_out", "update/clinic", "update/lab"}
        for ref in manifest["objects"].values():
            assert sha256(store.get(ref["key"])) == ref["sha256"]
    state = get_json(store, lay.state())
    assert state["completed_rounds"] == 2
    assert store.exists(lay.final("adapter_model.safetensors"))

    # Each silo's identity reads federations/ and writes only its own prefixes (the whole matrix, on the
    # real server, is in test_stack_s3.py).
    clinic = _store(stack, "silo-clinic")
    assert clinic.get(lay.global_adapter(1))
    clinic.put("updates/clinic/stack-a/probe", b"probe")
    for key in (
        "updates/lab/stack-a/probe",
        "results/lab/stack-a/probe",
        "published/lab/stack-a/final/adapter_model.safetensors",
        lay.global_adapter(2),
        lay.state(),
    ):
        with pytest.raises(StoreError, match="AccessDenied"):
            clinic.put(key, b"tampered")
    for key in ("updates/lab/stack-a/00001/update.safetensors", "results/lab/stack-a/00001/train.json"):
        with pytest.raises(StoreError, match="AccessDenied"):
            clinic.get(key)

    # MLflow (server, artifacts proxied to S3): the run, its metrics, the registered adapter with lineage.
    client = MlflowClient(stack.mlflow_uri)
    run = client.get_run(state["tracking_run_id"])
    assert run.info.status == "FINISHED"
    assert {"global.loss", "silo.clinic.train.final_loss", "silo.lab.eval.loss"} <= set(run.data.metrics)
    assert "adapter/adapter_model.safetensors" in {
        f.path for f in client.list_artifacts(run.info.run_id, "adapter")
    }
    mv = client.get_model_version_by_alias("silotune-stack-a", "champion")
    assert mv.run_id == run.info.run_id
    assert mv.tags["silotune.federation_id"] == "stack-a" and mv.tags["silotune.rounds"] == "2"
    assert mv.tags["silotune.silos"] == "clinic,lab" and mv.tags["silotune.config_hash"] == cfg.fingerprint()

    # Prefect: every silo run completed, on its silo's own pool: one wave of silo-round runs per round
    # (each evaluates the global it receives, then trains), then one evaluation of the final global.
    runs = _silo_runs(stack, "stack-a")
    assert sorted(r.name for r in runs) == sorted(
        [f"{s}-round-{r}" for s in SILOS for r in range(2)] + [f"{s}-evaluate-1" for s in SILOS]
    )
    assert all(r.state.is_completed() for r in runs)
    assert [h["evaluated"] for h in state["history"]] == [True, True]
    assert set(state["initial_eval"]["eval"]) == set(SILOS)
    for r in runs:
        silo = next(t.removeprefix("silo:") for t in r.tags if t.startswith("silo:"))
        assert r.work_pool_name == f"silo-{silo}" and r.name.startswith(silo)
    assert fr.work_pool_name == "coordinator"


def test_silo_killed_mid_round_quorum_holds(stack, demo_data) -> None:
    from flows.stack import start_worker

    cfg = _config(
        stack,
        demo_data,
        "stack-b",
        train={"local_steps": 8},
        aggregation={"min_silos": 1},
        orchestration={"silo_timeout_s": 10, "pickup_timeout_s": 10},
    )
    run = _start(stack, cfg)
    _kill_mid_run(stack, "stack-b", "lab-round-1", "silo-lab")
    try:
        fr = _wait_final(stack, run.id)
        assert fr.state.is_completed(), fr.state.message
        store, lay = _store(stack), FederationLayout("stack-b")
        m1, m2 = get_json(store, lay.manifest(0)), get_json(store, lay.manifest(1))
        assert m1["included"] == ["clinic", "lab"]
        assert m2["included"] == ["clinic"]
        assert "pool 'silo-lab'" in m2["excluded"]["lab"]  # lost mid-round, then not there to evaluate
        lab_round = next(r for r in _silo_runs(stack, "stack-b") if r.name == "lab-round-1")
        assert lab_round.state.is_crashed()
    finally:
        start_worker(stack, "silo-lab")


def test_below_quorum_then_coordinator_restart_resumes(stack, demo_data) -> None:
    from flows.stack import kill_worker, start_worker

    cfg = _config(
        stack,
        demo_data,
        "stack-c",
        rounds=3,
        train={"local_steps": 8},
        # The lab worker was just restarted: its first run loads the model, then evaluates and trains.
        orchestration={"silo_timeout_s": 30, "pickup_timeout_s": 30},
    )
    run = _start(stack, cfg)
    _kill_mid_run(stack, "stack-c", "lab-round-1", "silo-lab")
    fr = _wait_final(stack, run.id)
    assert fr.state.is_failed()
    assert "round 2: only 1 silo(s) returned an update, quorum is 2" in fr.state.message
    store, lay = _store(stack), FederationLayout("stack-c")
    assert get_json(store, lay.state())["completed_rounds"] == 1
    round1 = store.get(lay.manifest(0))

    # Restart the coordinator (and bring the silo back); the same federation resumes after round 1.
    kill_worker(stack, "coordinator")
    start_worker(stack, "coordinator", "silo-lab")
    fr2 = _wait_final(stack, _start(stack, cfg).id)
    assert fr2.state.is_completed(), fr2.state.message
    state = get_json(store, lay.state())
    assert state["completed_rounds"] == 3
    assert store.get(lay.manifest(0)) == round1  # the completed round was kept, not redone
    round1_runs = [r for r in _silo_runs(stack, "stack-c") if "round:1" in r.tags and "-round-" in r.name]
    assert len(round1_runs) == 2  # from the first attempt only
    assert [h["included"] for h in state["history"]] == [["clinic", "lab"]] * 3
    # The wave that fell below quorum still recorded the evaluation it got of round 1's output.
    assert list(state["history"][0]["eval"]) == ["clinic"] and "lab" in state["history"][0]["eval_failures"]
    assert all(h["evaluated"] for h in state["history"])


def test_prefect_api_requires_the_auth_string(stack) -> None:
    import base64
    import json
    import stat
    import urllib.error
    import urllib.request

    def status(url: str, secret: str | None = None, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode()
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, data=body, headers=headers), timeout=10
            ) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    api = stack.prefect_api
    assert status(f"{api}/health")[0] == 200  # probes stay open
    assert status(f"{api}/flows/filter", body=b"{}")[0] == 401
    assert status(f"{api}/flows/filter", "silotune:wrong", body=b"{}")[0] == 401
    assert status(f"{api}/flows/filter", stack.prefect_auth_string(), body=b"{}")[0] == 200
    code, ui = status(f"{stack.prefect_ui}/ui-settings")
    assert code == 200 and json.loads(ui)["auth"] == "BASIC"  # the UI asks for the string
    assert stat.S_IMODE(stack.prefect_auth_file.stat().st_mode) == 0o600


def test_down_leaves_no_process_and_no_port(stack) -> None:
    from flows.stack import _group_alive, down, port_open

    pids = dict(stack.pids)
    down(stack.root, echo=print)
    assert not [n for n, p in pids.items() if _group_alive(p)]
    assert not [n for n, p in stack.ports.items() if port_open(p)]
    root = str(stack.root)
    leftovers = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if root in (d / "cmdline").read_bytes().decode(errors="replace"):
                    leftovers.append(d.name)
    assert not leftovers
