"""Run on the coordinator's host (``ip netns exec <coordinator> python tests/multihost/coordinator_probe.py ...``):
start a federation on the stack there, wait for it, and report what the store, MLflow and Prefect hold,
as JSON. The test process is on the machine's own namespace and cannot reach the hosts' addresses.

    coordinator_probe.py federate STATE CONFIG OUT [--timeout S] [--update-silo SILO]
    coordinator_probe.py auth STATE OUT
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.prefect_server import prefect_api
from ops.state import Stack
from ops.tls import client_context


def _silo_runs(fid: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"federation:{fid}"]))
        )


def _task_runs(flow_run_id: object) -> list[dict]:
    """The coordinator run's task runs: name, final state, how many times each ran (retries)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [
        {"name": t.name, "state": t.state.type.value if t.state else None, "run_count": t.run_count}
        for t in runs
    ]


def federate(state: str, config: str, out: str, timeout: float, update_silo: str | None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from silotune.config import load_config
    from silotune.store import FederationLayout, get_json, open_store, sha256

    st = Stack.load(state)
    cfg = load_config(config)
    fid = cfg.federation_id
    report: dict = {"federation_id": fid}
    t0 = time.monotonic()
    with prefect_api(st):
        fr = run_deployment("federated-training/federated-training", parameters={"config": cfg}, timeout=0)
        report["flow_run_id"] = str(fr.id)
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    fr = client.read_flow_run(fr.id)
                except Exception:  # the server restarting: ask again
                    time.sleep(2)
                    continue
                if fr.state is not None and fr.state.is_final():
                    break
                time.sleep(0.5)
        report["wall_s"] = time.monotonic() - t0
        report["state"] = fr.state.type.value if fr.state else None
        report["message"] = fr.state.message if fr.state else None
        report["work_pool"] = fr.work_pool_name
        report["silo_runs"] = [
            {
                "name": r.name,
                "state": r.state.type.value if r.state else None,
                "pool": r.work_pool_name,
                "tags": sorted(r.tags),
                "seconds": r.total_run_time.total_seconds(),
            }
            for r in _silo_runs(fid)
        ]
        report["task_runs"] = _task_runs(fr.id)
        # The store, as the coordinator's identity reads it (its process has the coordinator's keys).
        store, lay = open_store(cfg.store), FederationLayout(fid)
        try:
            state_json = get_json(store, lay.state())
        except Exception as exc:
            state_json = {"error": str(exc)}
        report["store_state"] = state_json
        manifests = []
        for r in range(int(state_json.get("completed_rounds", 0))):
            m = get_json(store, lay.manifest(r))
            intact = all(sha256(store.get(ref["key"])) == ref["sha256"] for ref in m["objects"].values())
            manifests.append(
                {
                    "included": m["included"],
                    "excluded": m["excluded"],
                    "objects": sorted(m["objects"]),
                    "intact": intact,
                }
            )
            if update_silo and f"update/{update_silo}" in m["objects"] and "update_bytes" not in report:
                data = store.get(m["objects"][f"update/{update_silo}"]["key"])
                Path(out).with_suffix(".update").write_bytes(data)
                report["update_bytes"] = len(data)
        report["manifests"] = manifests
        # No manifest past the state's last round: nothing was committed that the state does not count.
        done = int(state_json.get("completed_rounds", 0))
        report["next_manifest_exists"] = store.exists(lay.manifest(done))
        report["final_exists"] = store.exists(lay.final("adapter_model.safetensors"))
    # MLflow, as its reader user (the coordinator logged and registered as its own user).
    os.environ.update(st.tls_env())
    os.environ.update(st.mlflow_env("reader"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(st.mlflow_uri)
    run_id = state_json.get("tracking_run_id")
    if run_id and report["state"] == "COMPLETED":  # the model is registered when the federation completes
        run = client.get_run(run_id)
        report["mlflow"] = {
            "status": run.info.status,
            "metrics": sorted(run.data.metrics),
            "artifacts": [f.path for f in client.list_artifacts(run_id, "adapter")],
        }
        mv = client.get_model_version_by_alias(f"silotune-{fid}", "champion")
        report["mlflow"]["champion"] = {"run_id": mv.run_id, "tags": dict(mv.tags)}
    report["config_fingerprint"] = cfg.fingerprint()
    if st.database == "postgres":  # the rows behind Prefect and MLflow are in PostgreSQL
        import psycopg2

        def count(db: str, sql: str, arg: str) -> int:
            conn = psycopg2.connect(host="127.0.0.1", port=st.ports["postgres"], user="postgres", dbname=db)
            try:
                with conn.cursor() as cur:
                    cur.execute(sql, (arg,))
                    return int(cur.fetchone()[0])
            finally:
                conn.close()

        report["postgres"] = {
            "prefect_flow_runs": count(
                "prefect", "SELECT count(*) FROM flow_run WHERE tags::jsonb ? %s", f"federation:{fid}"
            ),
            "mlflow_runs": count("mlflow", "SELECT count(*) FROM runs WHERE run_uuid = %s", run_id or ""),
        }
    Path(out).write_text(json.dumps(report, indent=2, default=str))


def _status(
    url: str, ca: Path | None, headers: dict[str, str] | None = None, data: bytes | None = None
) -> int:
    req = urllib.request.Request(url, headers=headers or {}, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10, context=client_context(ca)) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def auth(state: str, out: str) -> None:
    """What each service answers without credentials, with wrong ones, and with each role's."""
    from base64 import b64encode

    st = Stack.load(state)
    ca = st.ca_file

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()}

    users = st.mlflow_users()
    api = f"{st.mlflow_uri}/api/2.0/mlflow"
    search = f"{api}/experiments/search?max_results=1"
    json_h = {"Content-Type": "application/json"}
    reader = basic("reader", users["reader"])
    # The coordinator's experiment (the configs' default name), which the coordinator created.
    req = urllib.request.Request(f"{api}/experiments/get-by-name?experiment_name=silotune", headers=reader)
    with urllib.request.urlopen(req, timeout=10, context=client_context(ca)) as r:
        experiment = json.loads(r.read())["experiment"]["experiment_id"]
    body = json.dumps({"experiment_id": experiment}).encode()
    report = {
        "prefect_no_auth": _status(f"{st.prefect_api}/flows/filter", ca, data=b"{}"),
        "prefect_auth": _status(
            f"{st.prefect_api}/flows/filter",
            ca,
            {**basic(*st.prefect_auth_string().split(":", 1)), **json_h},
            data=b"{}",
        ),
        "mlflow_no_auth": _status(search, ca),
        "mlflow_wrong_password": _status(search, ca, basic("reader", "wrong")),
        "mlflow_reader_read": _status(f"{api}/experiments/get?experiment_id={experiment}", ca, reader),
        "mlflow_reader_write": _status(f"{api}/runs/create", ca, {**reader, **json_h}, body),
        "s3_anonymous": _status(f"{st.s3_endpoint}/silotune", ca),
    }
    Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "federate":
        timeout = float(args[args.index("--timeout") + 1]) if "--timeout" in args else 600.0
        silo = args[args.index("--update-silo") + 1] if "--update-silo" in args else None
        federate(args[0], args[1], args[2], timeout, silo)
    elif cmd == "restart-prefect":
        from ops.stack import restart_prefect_server

        restart_prefect_server(Stack.load(args[0]))
    elif cmd == "auth":
        auth(args[0], args[1])
    else:
        raise SystemExit(f"unknown command {cmd}")
