"""Orchestration overhead of a warm federated round: embedded default vs the real stack, in one run.

Run: ``.venv/bin/python bench/round_overhead.py [--silos 3] [--rounds 4] [--steps 1] [--json out.json]``

The same federation (tiny model, ``--silos`` demo silos, ``--steps`` local steps, a short holdout) runs
twice:

- **embedded**: ``federated_training(config)`` in this process on a temporary local Prefect API, silos
  as subflows one after another, a local-folder store, MLflow on a SQLite file;
- **stack**: ``silotune stack up`` on free loopback ports (SeaweedFS, Prefect server, MLflow server, one
  in-process worker per pool), the ``federated-training`` deployment run on the coordinator pool, each
  silo's round and evaluation a flow run on the silo's own pool, results through S3.

A round's time is read back from Prefect: the interval between the ends of consecutive
``track-r<k>`` task runs. Round 1 is dropped (first contact); the others are "warm" (each worker has
the model loaded). Overhead = round time − the work inside it: the silo flow runs of each phase
(their longest, since stack silos run side by side; their sum for embedded, which runs them in turn)
plus the coordinator's aggregate/commit/track tasks. Printed: median warm round and overhead for
both, absolute seconds and the ratio. The target is a warm-round overhead of at most 2 s with 3 silos
on the stack. ``--database sqlite,postgres`` runs the stack with each Prefect database in turn.

Note what "silo runs" include: a silo flow run from Running to Completed, i.e. the training or
evaluation plus the engine's own work inside the run (task run, result upload to S3). The overhead is
everything else: creating the runs, the workers claiming and starting them, the coordinator noticing
the final states and reading the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from silotune.modeling import OFFLINE_ENV

for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from silotune.config import FederationConfig, parse_config  # noqa: E402
from silotune.demo import DEMO_SILOS, make_demo_silos  # noqa: E402

TARGET_S = 2.0


def make_config(
    fid: str, data: dict[str, Any], silos: list[str], args: argparse.Namespace, **sections: Any
) -> FederationConfig:
    return parse_config(
        {
            "federation_id": fid,
            "rounds": args.rounds,
            "seed": 0,
            "model": {"name_or_path": "tiny-llama", "max_seq_len": 128},
            "lora": {"r": 4},
            "train": {"local_steps": args.steps, "batch_size": 4, "learning_rate": 5e-2, "torch_threads": 1},
            "silos": [
                {"name": s, "train_path": str(data[s]["train"]), "eval_path": str(data[s]["eval"])}
                for s in silos
            ],
            "aggregation": {"min_silos": len(silos)},
            "evaluation": {"max_examples": 8, "batch_size": 8},
            **sections,
        }
    )


def _span(run: Any) -> tuple[float, float]:
    return run.start_time.timestamp(), run.end_time.timestamp()


def round_breakdown(client: Any, coordinator_run_id: Any, rounds: int) -> list[dict[str, float]]:
    """Per round: wall seconds, silo work, coordinator task work, overhead (rounds 2..R)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[coordinator_run_id]))
    )
    by_name = {t.name: t for t in tasks if t.end_time is not None}
    silo_runs = [
        fr
        for fr in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="-")), limit=200
        )
        if fr.end_time is not None and ("-round-" in fr.name or "-evaluate-" in fr.name)
    ]
    out = []
    for r in range(1, rounds):
        t_start = by_name[f"track-r{r - 1}"].end_time.timestamp()
        t_end = by_name[f"track-r{r}"].end_time.timestamp()
        coord = sum(
            by_name[n].end_time.timestamp() - by_name[n].start_time.timestamp()
            for n in (f"aggregate-r{r}", f"commit-r{r}", f"track-r{r}")
        )
        phases: dict[str, list[float]] = {"round": [], "evaluate": []}
        for fr in silo_runs:
            s, e = _span(fr)
            if t_start <= s and e <= t_end:
                phases["round" if "-round-" in fr.name else "evaluate"].append(e - s)
        out.append(
            {
                "round": r + 1,
                "seconds": t_end - t_start,
                "coordinator_tasks": coord,
                "silo_runs": phases["round"] + phases["evaluate"],
                "phase_max": [max(v) if v else 0.0 for v in phases.values()],
                "phase_sum": [sum(v) for v in phases.values()],
            }
        )
    return out


def run_embedded(cfg: FederationConfig) -> tuple[list[dict[str, float]], float]:
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.federated_training import federated_training

    with prefect_test_harness(server_startup_timeout=120):
        t0 = time.perf_counter()
        state = federated_training(cfg, return_state=True)
        total = time.perf_counter() - t0
        assert state.is_completed(), state
        with get_client(sync_client=True) as client:
            rows = round_breakdown(client, state.state_details.flow_run_id, cfg.rounds)
    for row in rows:  # silos run one after another
        row["overhead"] = row["seconds"] - sum(row["phase_sum"]) - row["coordinator_tasks"]
    return rows, total


def run_stack(
    cfg_for: Any, silos: list[str], state_dir: Path, database: str
) -> tuple[list[dict[str, float]], float, float]:
    from flows import stack as stk

    t0 = time.perf_counter()
    st = stk.up(state_dir, silos=silos, auto_ports=True, database=database, echo=lambda *a: None)
    up_s = time.perf_counter() - t0
    try:
        cfg = cfg_for(st)
        with stk.prefect_api(st):
            from prefect.client.orchestration import get_client
            from prefect.deployments import run_deployment

            t0 = time.perf_counter()
            fr = run_deployment(
                "federated-training/federated-training",
                parameters={"config": cfg},
                timeout=1800,
                poll_interval=1,
            )
            total = time.perf_counter() - t0
            assert fr.state is not None and fr.state.is_completed(), fr.state
            with get_client(sync_client=True) as client:
                rows = round_breakdown(client, fr.id, cfg.rounds)
    finally:
        stk.down(state_dir, echo=lambda *a: None)
    for row in rows:  # silos run side by side
        row["overhead"] = row["seconds"] - sum(row["phase_max"]) - row["coordinator_tasks"]
    return rows, total, up_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--silos", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument(
        "--database",
        default="sqlite",
        help="Prefect server database(s) of the stack runs, comma-separated: sqlite (default), postgres",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    silos = [s.name for s in DEMO_SILOS][: args.silos]
    with tempfile.TemporaryDirectory(prefix="silotune-bench-") as tmp:
        tmpd = Path(tmp)
        tmpd.chmod(0o755)  # a PostgreSQL run as the `postgres` user must reach its data folder in here
        data = make_demo_silos(tmpd / "data", seed=0, scale=0.1)
        emb_cfg = make_config(
            "bench-embedded",
            data,
            silos,
            args,
            store={"root": str(tmpd / "store")},
            tracking={"uri": f"sqlite:///{tmpd / 'mlflow.db'}", "artifact_root": str(tmpd / "mlart")},
        )
        emb_rows, emb_total = run_embedded(emb_cfg)

        def stack_cfg(st: Any) -> FederationConfig:
            return make_config(
                "bench-stack",
                data,
                silos,
                args,
                store=st.store_spec(),
                tracking=st.tracking_spec("bench"),
                orchestration={"mode": "workpools"},
            )

        stacks = {}
        for db in args.database.split(","):
            stacks[db] = run_stack(stack_cfg, silos, tmpd / f"stack-{db}", db)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(
        f"config: tiny-llama, {len(silos)} silos, {args.rounds} rounds ({args.rounds - 1} warm), "
        f"{args.steps} local step(s)"
    )
    runs = [("embedded", emb_rows)] + [(f"stack/{db}", v[0]) for db, v in stacks.items()]
    for label, rows in runs:
        for r in rows:
            work = sum(r["phase_sum"] if label == "embedded" else r["phase_max"])
            print(
                f"  {label:15s} round {r['round']}: {r['seconds']:.2f} s = silo runs {work:.2f} "
                f"+ coordinator tasks {r['coordinator_tasks']:.2f} + overhead {r['overhead']:.2f}"
            )
    e_round, e_ovh = med(emb_rows, "seconds"), med(emb_rows, "overhead")
    print(f"embedded: whole federation {emb_total:.1f} s; warm round {e_round:.2f} s, overhead {e_ovh:.2f} s")
    for db, (rows, total, up_s) in stacks.items():
        s_round, s_ovh = med(rows, "seconds"), med(rows, "overhead")
        print(
            f"stack/{db}: start-up {up_s:.1f} s, whole federation {total:.1f} s; warm round {s_round:.2f} s "
            f"(ratio stack/embedded {s_round / e_round:.2f}), overhead {s_ovh:.2f} s "
            f"(target <= {TARGET_S:.1f} s: {'met' if s_ovh <= TARGET_S else 'NOT met'})"
        )
    if args.json:
        out = {"embedded": emb_rows, **{f"stack/{db}": v[0] for db, v in stacks.items()}}
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
