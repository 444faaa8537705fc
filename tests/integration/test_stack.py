"""The real stack on loopback: SeaweedFS, Prefect server, MLflow server, one in-process worker per pool.

Every silo worker is ``silotune silo join <silo> --policy <state>/policies/<silo>.yaml`` and enforces
that policy on each run.

1. One stack (free ports, a temporary state folder) started without a config: each silo has the
   stack's default policy (signed uploads with pinned keys, this stack's store and coordinator key, its
   own private folder and data). The tests run in order: a federation through the workers; a silo
   killed mid-round (the quorum holds); a silo killed mid-round below quorum, then a coordinator restart
   that resumes after the last completed round; the Prefect API's auth; finally ``down`` must leave no
   process and no open port.
2. :class:`TestProtectedStack`: a second stack started with three protected configs (``up(config=...)``),
   so every silo's policy is strict (the configs' protection, signing and DP as floors; each config
   accepted): secure aggregation with DP-SGD, CKKS with DP-SGD, and three silos at quorum 2 where one
   silo's tightened policy refuses the coordinator's config. A test instrument in the silo workers
   (a ``sitecustomize`` on their ``PYTHONPATH``) records every update a silo packs before protection, and
   the buckets and databases are scanned for its values.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from ops import stack as stk
from ops.policies import stack_config
from ops.state import REPO_ROOT, StackError
from silotune.config import FederationConfig, StoreSpec, parse_config
from silotune.errors import StoreError
from silotune.store import FederationLayout, S3Store, get_json, sha256

pytestmark = [pytest.mark.integration, pytest.mark.stack, pytest.mark.timeout(600)]

SILOS = ("clinic", "lab")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    st = stk.up(root, silos=list(SILOS), auto_ports=True, echo=print)
    yield st
    with contextlib.suppress(Exception):  # the last test stops it and checks; this is the safety net
        stk.down(root, echo=print)


def _config(st: Any, demo_data, fid: str, **over: Any) -> FederationConfig:
    # Made for the stack: the silos' and coordinator's folders of the stack, every key pinned (signing).
    return stack_config(st, parse_config(_raw_config(st, demo_data, fid, **over)))


def _raw_config(
    st: Any | None, demo_data, fid: str, silos: tuple[str, ...] = SILOS, **over: Any
) -> dict[str, Any]:
    data = {
        "federation_id": fid,
        "rounds": 2,
        "seed": 1,
        "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
        "lora": {"r": 4},
        "train": {"local_steps": 2, "batch_size": 4, "learning_rate": 5e-2, "torch_threads": 1},
        "silos": [
            {"name": s, "train_path": str(demo_data[s]["train"]), "eval_path": str(demo_data[s]["eval"])}
            for s in silos
        ],
        "aggregation": {"min_silos": 2},
        "evaluation": {"max_examples": 8},
        "store": st.store_spec() if st is not None else {},
        "tracking": st.tracking_spec("stack-test") if st is not None else {},
        "orchestration": {"mode": "workpools", "silo_timeout_s": 120, "pickup_timeout_s": 60},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return data


def _start(st: Any, cfg: FederationConfig) -> Any:
    from ops.prefect_server import prefect_api

    with prefect_api(st):
        from prefect.deployments import run_deployment

        return run_deployment("federated-training/federated-training", parameters={"config": cfg}, timeout=0)


def _wait_final(st: Any, flow_run_id: Any, timeout: float = 300) -> Any:
    from ops.prefect_server import prefect_api

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
    from ops.prefect_server import prefect_api

    with prefect_api(st):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"federation:{fid}"]))
            )


def _store(st: Any, identity: str = "coordinator") -> S3Store:
    from ops.credentials import s3_client

    return S3Store(StoreSpec(**st.store_spec()), client=s3_client(st, identity))


def _kill_mid_run(st: Any, fid: str, run_name: str, pool: str, timeout: float = 180) -> None:
    """SIGKILL ``pool``'s worker as soon as the silo run ``run_name`` of ``fid`` is running."""
    from ops.stack import kill_worker

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


def test_workers_join_with_their_own_default_policies(stack, demo_data) -> None:
    """Each silo worker runs this checkout's code with its own policy file, folder and thread budget."""
    import stat

    from silotune.policy import check_config, load_policy

    assert Path(__file__).resolve().parents[2] == REPO_ROOT  # the workers run the code under test
    policies = {s: load_policy(stack.policy_path(s)) for s in SILOS}
    for s, p in policies.items():
        assert p.private_dir == str(stack.private_dir(s)) and p.train_path.startswith(str(stack.data_dir(s)))
        assert stat.S_IMODE(stack.silo_dir(s).stat().st_mode) == 0o700
        assert p.require_signing and p.federations == ["*"] and not p.require_accepted_config
        assert p.stores == [f"s3://127.0.0.1:{stack.ports['s3']}/silotune"]
        assert p.coordinator_key == str(stack.keys_dir / "coordinator.pub.pem")
        pid = stack.pids[f"worker-silo-{s}"]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert [a.decode() for a in argv[1:8]] == [
            "-m",
            "cli",
            "silo",
            "join",
            s,
            "--policy",
            str(stack.policy_path(s)),
        ]
        env = dict(
            kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv
        )
        assert os.readlink(f"/proc/{pid}/cwd") == str(REPO_ROOT)
        # its own S3 identity only, and no Prefect result storage
        assert env[b"AWS_ACCESS_KEY_ID"].decode() == stack.credentials()[f"silo-{s}"]["access_key"]
        assert b"PREFECT_DEFAULT_RESULT_STORAGE_BLOCK" not in env
        assert env[b"PYTHONPATH"].decode().split(os.pathsep)[0] == str(REPO_ROOT)
        # each worker learns how many silo workers share the host (it sizes its torch threads from it)
        assert env[b"SILOTUNE_COLOCATED_WORKERS"] == str(len(SILOS)).encode()
    assert len({p.private_dir for p in policies.values()}) == len(SILOS)
    # A config not made for this stack (no pinned keys, no coordinator key, unsigned) is refused.
    raw = parse_config(_raw_config(stack, demo_data, "not-made"))
    fields = {v.field for v in check_config(policies["clinic"], raw)}
    assert {"security.signing", "security.coordinator_key"} <= fields
    assert check_config(policies["clinic"], _config(stack, demo_data, "made")) == []


def test_stack_config_command_makes_a_config_the_default_policies_run(stack, demo_data, tmp_path) -> None:
    import yaml
    from typer.testing import CliRunner

    from cli import app
    from silotune.config import load_config
    from silotune.policy import check_config, load_policy

    raw = _raw_config(stack, demo_data, "cli-made", security={"protection": "secagg"})
    (tmp_path / "in.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "store"}))
    out = tmp_path / "out.yaml"
    res = CliRunner().invoke(
        app, ["stack", "config", str(tmp_path / "in.yaml"), "--out", str(out), "--state-dir", str(stack.root)]
    )
    assert res.exit_code == 0, res.output
    cfg = load_config(out)
    assert cfg.security.signing and cfg.security.keys_dir == str(stack.keys_dir)
    assert cfg.store.endpoint_url == stack.s3_endpoint and cfg.orchestration.mode == "workpools"
    assert {s.private_dir for s in cfg.silos} == {str(stack.private_dir(s)) for s in SILOS}
    assert all(s.public_key for s in cfg.silos) and cfg.security.coordinator_key
    assert all(check_config(load_policy(stack.policy_path(s)), cfg) == [] for s in SILOS)
    assert stk.status(stack.root)["policies"] == {s: str(stack.policy_path(s)) for s in SILOS}
    # A config naming a silo the stack does not have is refused before anything starts.
    with pytest.raises(StackError, match="not in --silos"):
        stk.up(tmp_path / "other", silos=["clinic"], config=cfg, auto_ports=True, echo=print)
    assert not (tmp_path / "other" / "stack.json").exists()


def test_silo_killed_mid_round_quorum_holds(stack, demo_data) -> None:
    from ops.stack import start_worker

    cfg = _config(
        stack,
        demo_data,
        "stack-b",
        train={"local_steps": 8},
        aggregation={"min_silos": 1},
        # Co-located silos take turns on the host's cores (train.serialise_colocated), so a round's
        # silo runs finish one after another: the timeout covers both, and bounds the lost one.
        orchestration={"silo_timeout_s": 60, "pickup_timeout_s": 10},
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
    from ops.stack import kill_worker, start_worker

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


def test_stock_process_worker_serves_a_silo_pool(stack, demo_data) -> None:
    """The public fallback of ops/prefect_private.py: Prefect's own process worker serves lab's pool
    (``prefect worker start --pool silo-lab --type process``, a Python process per flow run) for a
    round next to clinic's in-process worker, and lab's policy reaches each run's process through
    ``$SILOTUNE_SILO_POLICY``."""
    import json

    from ops.stack import kill_worker, start_worker
    from ops.supervise import tail

    kill_worker(stack, "silo-lab")
    try:
        start_worker(stack, "silo-lab", stock=True)
        pid = stack.pids["worker-silo-lab"]
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        assert argv[-8:-1] == ["worker", "start", "--pool", "silo-lab", "--type", "process", "--name"]
        t0 = time.monotonic()
        cfg = _config(
            stack,
            demo_data,
            "stack-stock",
            rounds=1,
            train={"local_steps": 1},
            # each lab run starts a Python process (imports, model load) on a shared machine
            orchestration={"silo_timeout_s": 300, "pickup_timeout_s": 120},
        )
        fr = _wait_final(stack, _start(stack, cfg).id, timeout=600)
        assert fr.state.is_completed(), fr.state.message
        print(f"1 round, lab on the stock process worker: {time.monotonic() - t0:.1f} s")
        store, lay = _store(stack), FederationLayout("stack-stock")
        assert get_json(store, lay.manifest(0))["included"] == ["clinic", "lab"]
        runs = {r.name: r for r in _silo_runs(stack, "stack-stock")}
        assert set(runs) == {f"{s}-{stage}-0" for s in SILOS for stage in ("round", "evaluate")}
        not_completed = {
            n: f"{r.state.name}: {r.state.message}" for n, r in runs.items() if not r.state.is_completed()
        }
        if not_completed:  # what the silos' workers logged, to tell the silo's failure from the stack's
            logs = {p: tail(stack.logs / f"worker-{p}.log", 60) for p in ("silo-lab", "silo-clinic")}
            recorded = [
                {
                    **{k: h.get(k) for k in ("round", "excluded", "eval_failures")},
                    "evaluated": sorted(h.get("eval") or {}),
                }
                for h in get_json(store, lay.state())["history"]
            ]
            raise AssertionError(
                f"silo runs not completed: {not_completed}; the federation recorded: {recorded}; "
                f"worker logs: {logs}"
            )
        # lab's runs ran in processes the stock worker started (it records their pid; silotune's
        # in-process worker starts none)
        assert runs["lab-round-0"].infrastructure_pid and runs["lab-evaluate-0"].infrastructure_pid
        assert not runs["clinic-round-0"].infrastructure_pid

        # lab's policy is enforced there: a config not made for the stack (unsigned, no pinned
        # coordinator key) is refused before any data is read, and the refusal is logged at lab.
        raw = parse_config(
            _raw_config(
                stack, demo_data, "stack-stock-refused", ("lab",), rounds=1, aggregation={"min_silos": 1}
            )
        )
        fr2 = _wait_final(stack, _start(stack, raw).id, timeout=600)
        assert fr2.state.is_failed()
        refusals = (stack.private_dir("lab") / "refusals.log").read_text().splitlines()
        entries = [json.loads(line) for line in refusals]
        assert any(e["federation_id"] == "stack-stock-refused" for e in entries)
        fields = {
            v["field"]
            for e in entries
            if e["federation_id"] == "stack-stock-refused"
            for v in e["violations"]
        }
        assert "security.signing" in fields
    finally:
        kill_worker(stack, "silo-lab")
        start_worker(stack, "silo-lab")


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
    from ops.stack import down
    from ops.supervise import group_alive, port_open

    pids = dict(stack.pids)
    down(stack.root, echo=print)
    assert not [n for n, p in pids.items() if group_alive(p)]
    assert not [n for n, p in stack.ports.items() if port_open(p)]
    root = str(stack.root)
    leftovers = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if root in (d / "cmdline").read_bytes().decode(errors="replace"):
                    leftovers.append(d.name)
    assert not leftovers


# -- protected federations with strict silo policies -------------------------------------------------

# A test instrument for the silo workers (never part of the stack): a sitecustomize that records every
# update a silo packs, before secure aggregation masks it or CKKS encrypts it.
SPY = '''
"""Test instrument of tests/integration/test_stack.py: records each delta a silo packs, unprotected."""
import importlib.abc
import sys
import uuid
from pathlib import Path

OUT = Path(__file__).with_name("packed")
TARGETS = {"silotune.protection.secagg": "SecAggScheme", "silotune.protection.ckks": "CkksScheme"}


def _record(cls):
    real = cls.pack

    def pack(self, ctx, delta):
        from safetensors.torch import save_file

        OUT.mkdir(exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in delta.items()}
        save_file(tensors, str(OUT / f"{ctx.silo}-{ctx.config.federation_id}-{ctx.round}-{uuid.uuid4().hex}.st"))
        return real(self, ctx, delta)

    cls.pack = pack


class _Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _record(getattr(module, TARGETS[name]))

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Spy())
'''

PSILOS = ("clinic", "bank", "lab")
DP = {"sample_dp": {"target_epsilon": 8.0, "delta": 1e-3}}


def _protected(demo_data, fid: str, silos: tuple[str, ...], **over: Any) -> FederationConfig:
    """A config before it is made for the stack (``up(config=...)`` does that)."""
    raw = _raw_config(None, demo_data, fid, silos, **over)
    for key in ("store", "tracking"):  # up() replaces them with the stack's
        raw.pop(key)
    return parse_config({**raw, "tracking": {"kind": "mlflow", "experiment": "stack-protected"}})


PROTECTED = {
    "prot-secagg": {"silos": ("clinic", "lab"), "security": {"protection": "secagg"}, "privacy": DP},
    "prot-ckks": {"silos": ("clinic", "lab"), "rounds": 1, "security": {"protection": "ckks"}, "privacy": DP},
    "prot-refuse": {
        "silos": PSILOS,
        "rounds": 1,
        "security": {"protection": "secagg"},
        "privacy": DP,
        "aggregation": {"min_silos": 2},
    },
}


def _needles(spy: Path, fid: str) -> list[bytes]:
    """Windows of 4 consecutive float32 values (none zero) of every update the silos packed for ``fid``."""
    import torch
    from safetensors.torch import load_file

    out = []
    files = sorted((spy / "packed").glob(f"*-{fid}-*.st"))
    for f in files:
        for t in load_file(str(f)).values():
            flat = t.flatten().to(torch.float32)
            step = max(1, flat.numel() // 16)
            for i in range(0, max(1, flat.numel() - 4), step):
                window = flat[i : i + 4]
                if window.numel() == 4 and bool((window != 0).all()):
                    out.append(window.numpy().tobytes())
    return out


def _everything_stored(st: Any) -> list[bytes]:
    """Every object of the stack's buckets (data, Prefect results, MLflow) and its two databases."""
    from ops.credentials import s3_client
    from ops.state import DATA_BUCKET, MLFLOW_BUCKET, RESULTS_BUCKET

    c = s3_client(st, "admin")
    blobs = []
    for bucket in (DATA_BUCKET, RESULTS_BUCKET, MLFLOW_BUCKET):
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                blobs.append(c.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    for db in (st.root / "prefect" / "prefect.db", st.root / "mlflow" / "mlflow.db"):
        blobs.append(db.read_bytes())
    return blobs


def _assert_no_plaintext_update(st: Any, spy: Path, fid: str, updates: int) -> None:
    from safetensors.torch import load_file, save

    files = sorted((spy / "packed").glob(f"*-{fid}-*.st"))
    assert len(files) >= updates, f"the instrument saw {len(files)} packed update(s) of {fid}, not {updates}"
    needles = _needles(spy, fid)
    assert needles
    # The scan finds an update stored in plaintext (the payload format of an unprotected upload) ...
    plain = save(load_file(str(files[0])))
    assert any(n in plain for n in needles)
    # ... and finds none of them anywhere in the stack's buckets or databases.
    blobs = _everything_stored(st)
    found = [i for i, n in enumerate(needles) if any(n in b for b in blobs)]
    assert not found, f"{len(found)} plaintext window(s) of a silo's update are stored"


@pytest.fixture(scope="class")
def pstack(tmp_path_factory, demo_data):
    spy = tmp_path_factory.mktemp("spy")
    (spy / "sitecustomize.py").write_text(SPY)
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(spy), os.environ.get("PYTHONPATH")])))
    root = tmp_path_factory.mktemp("pstack")
    configs = [_protected(demo_data, fid, **over) for fid, over in PROTECTED.items()]
    t0 = time.monotonic()
    try:
        st = stk.up(root, config=configs, auto_ports=True, echo=print)
        print(f"protected stack up in {time.monotonic() - t0:.1f} s")
        yield st, spy
    finally:
        with contextlib.suppress(Exception):
            stk.down(root, echo=print)
        mp.undo()


class TestProtectedStack:
    """Secure aggregation and CKKS through the work pools, every silo with its strict policy in place."""

    def test_strict_policies_from_the_configs(self, pstack) -> None:
        from silotune.policy import acceptance_fingerprint, accepted_fingerprint, load_policy

        st, _ = pstack
        for silo in PSILOS:
            p = load_policy(st.policy_path(silo))
            fids = [f for f, over in PROTECTED.items() if silo in over["silos"]]
            assert p.federations == fids and p.require_accepted_config and p.require_signing
            assert set(p.protection) == {
                over["security"]["protection"] for f, over in PROTECTED.items() if f in fids
            }
            assert p.dp.require_sample_dp and p.dp.max_epsilon == 8.0 and p.base_model_sha256
            assert p.private_dir == str(st.private_dir(silo))
            for fid in fids:
                assert accepted_fingerprint(p, fid) == acceptance_fingerprint(st.federation_config(fid))

    def test_secagg_with_dp_and_signing(self, pstack) -> None:
        st, spy = pstack
        t0 = time.monotonic()
        cfg = st.federation_config("prot-secagg")
        assert cfg.security.signing and cfg.security.protection == "secagg" and cfg.privacy.sample_dp
        fr = _wait_final(st, _start(st, cfg).id)
        assert fr.state.is_completed(), fr.state.message
        print(f"secagg + DP-SGD + signing, 2 silos, 2 rounds: {time.monotonic() - t0:.1f} s")
        store, lay = _store(st), FederationLayout("prot-secagg")
        state = get_json(store, lay.state())
        assert state["completed_rounds"] == 2
        for r in range(2):
            m = get_json(store, lay.manifest(r))
            assert m["included"] == ["clinic", "lab"] and m["excluded"] == {}
            assert store.exists(lay.update(r, "clinic", "masked")) and not store.exists(
                lay.update(r, "clinic")
            )
        assert state["history"][-1]["protection"] == "secagg"
        assert state["history"][-1]["privacy"]["clinic"]["dp.epsilon"] > 0
        assert store.exists(lay.final("adapter_model.safetensors"))
        _assert_no_plaintext_update(st, spy, "prot-secagg", updates=4)

    def test_ckks_publishes_at_the_designated_silo(self, pstack, tmp_path) -> None:
        from peft import PeftModel

        from silotune.modeling import load_base_model, resolve_model_path

        st, spy = pstack
        t0 = time.monotonic()
        cfg = st.federation_config("prot-ckks")
        fr = _wait_final(st, _start(st, cfg).id)
        assert fr.state.is_completed(), fr.state.message
        print(f"CKKS + DP-SGD + signing, 2 silos, 1 round: {time.monotonic() - t0:.1f} s")
        store, lay = _store(st), FederationLayout("prot-ckks")
        assert get_json(store, lay.state())["completed_rounds"] == 1
        assert store.exists(lay.update(0, "lab", "ckks"))
        publisher = cfg.ckks_publisher
        prefix = lay.published(publisher, "")
        assert prefix == f"published/{publisher}/prot-ckks/final/"
        keys = store.list(prefix)
        assert lay.published(publisher, "adapter_model.safetensors") in keys
        assert not store.list(lay.final(""))  # the coordinator holds no key: it publishes nothing itself
        for key in keys:
            (tmp_path / key.rsplit("/", 1)[1]).write_bytes(store.get(key))
        assert PeftModel.from_pretrained(load_base_model(resolve_model_path("tiny-llama")), tmp_path)
        _assert_no_plaintext_update(st, spy, "prot-ckks", updates=2)

    def test_a_silo_refuses_and_the_round_goes_on_at_quorum(self, pstack) -> None:
        import json

        from silotune.policy import dump_policy, load_policy

        st, _ = pstack
        t0 = time.monotonic()
        # bank's operator tightens its policy (client-level DP required), then restarts its worker.
        path = st.policy_path("bank")
        policy = load_policy(path)
        dump_policy(
            policy.model_copy(update={"dp": policy.dp.model_copy(update={"require_client_dp": True})}), path
        )
        stk.restart_worker(st, "silo-bank")
        t1 = time.monotonic()
        cfg = st.federation_config("prot-refuse")
        assert cfg.privacy.client_dp is None and cfg.aggregation.min_silos == 2
        fr = _wait_final(st, _start(st, cfg).id)
        assert fr.state.is_completed(), fr.state.message
        print(
            f"3 silos, one refusing, quorum 2: bank restarted in {t1 - t0:.1f} s, "
            f"federation {time.monotonic() - t1:.1f} s"
        )
        store, lay = _store(st), FederationLayout("prot-refuse")
        m = get_json(store, lay.manifest(0))
        assert m["included"] == ["clinic", "lab"]
        why = m["excluded"]["bank"]
        assert "PolicyRefusal" in why and "silo bank refuses federation prot-refuse" in why
        assert "privacy.client_dp: client DP is off [policy: dp.require_client_dp: true]" in why
        # its own log of the refusal, in its private folder
        log = st.private_dir("bank") / "refusals.log"
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        assert entries and all(e["federation_id"] == "prot-refuse" for e in entries)
        assert {
            "field": "privacy.client_dp",
            "rule": "dp.require_client_dp: true",
            "message": "client DP is off",
        } in (entries[0]["violations"])
        # nothing of bank's in the store for this federation: no advert, share, update or record
        for area in ("updates", "messages", "results", "published"):
            assert store.list(f"{area}/bank/prot-refuse/") == [], area
        assert store.exists(lay.update(0, "clinic", "masked"))
        runs = {r.name: r for r in _silo_runs(st, "prot-refuse")}
        assert runs["bank-secagg-advertise-0"].state.is_failed()
        assert get_json(store, lay.state())["completed_rounds"] == 1
