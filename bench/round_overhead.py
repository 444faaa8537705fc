"""Orchestration overhead of a warm federated round: embedded default vs the real stack, in one run.

Run: ``.venv/bin/python bench/round_overhead.py [--silos 3] [--rounds 4] [--steps 1] [--timeline]
[--no-embedded] [--model tiny-llama] [--threads 1|auto] [--colocated] [--json out.json]``

``--colocated`` is the co-located row: the real SmolLM2-135M, 3 silos × 4 local steps, each silo's
torch threads from its CPU budget (``train.torch_threads`` unset: cores ÷ co-located workers, or all
cores while co-located runs take turns); it also prints the per-step time of the stack against the
embedded run (target ≤ 1.25×; three workers each starting every core's worth of OpenMP threads made
it ~10×).

The same federation (tiny model, ``--silos`` demo silos, ``--steps`` local steps, a short holdout) runs
twice:

- **embedded**: ``federated_training(config)`` in this process on a temporary local Prefect API, silos
  as subflows one after another, a local-folder store, MLflow on a SQLite file;
- **stack**: ``silotune stack up`` on free loopback ports (SeaweedFS, Prefect server, MLflow server, one
  in-process worker per pool), the ``federated-training`` deployment run on the coordinator pool, each
  silo's round (and the final evaluation) a flow run on the silo's own pool, results through S3.

A round is one wave of silo runs: each silo's ``silo-round`` run evaluates the global adapter it
receives (the previous round's output) and trains from it; the coordinator then aggregates and
commits (one ``commit-r<k>`` task, which also records and tracks the previous round's evaluation).
A round's time is read back from Prefect: the interval between the ends of consecutive ``commit-r<k>``
task runs. Round 1 is dropped (first contact); the others are "warm" (each worker has the model
loaded). Overhead = round time − the work inside it: the wave's silo runs (their longest, since stack
silos run side by side; their sum for embedded, which runs them in turn) plus the coordinator's tasks
in the interval (aggregate, commit). Printed: median warm round and overhead for both, absolute
seconds and the ratio. The target is a warm-round overhead of at most 2 s with 3 silos on the stack.
``--database sqlite,postgres`` runs the stack with each Prefect database in turn. ``--timeline``
also prints, for the median warm round of each run, every run's and task's state changes in order
(seconds from the previous commit).

Note what "silo runs" include: a silo flow run from Running to Completed, i.e. the evaluation and
the training plus the engine's own work inside the run (two task runs, the result upload). The
overhead is everything else: creating the runs, the workers claiming and starting them, the
coordinator noticing the final states and reading the results, the gaps between coordinator tasks.
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
TARGET_STEP_RATIO = 1.25  # co-located stack vs embedded, per local step (--colocated)


def make_config(
    fid: str, data: dict[str, Any], silos: list[str], args: argparse.Namespace, **sections: Any
) -> FederationConfig:
    return parse_config(
        {
            "federation_id": fid,
            "rounds": args.rounds,
            "seed": 0,
            "model": {"name_or_path": args.model, "max_seq_len": 128},
            "lora": {"r": 4},
            "train": {
                "local_steps": args.steps,
                "batch_size": 4,
                "learning_rate": 5e-2,
                # auto: the silo's CPU budget (cores ÷ co-located workers, or all while taking turns)
                "torch_threads": None if args.threads == "auto" else int(args.threads),
            },
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


def round_breakdown(
    client: Any, coordinator_run_id: Any, rounds: int, *, side_by_side: bool, timeline: bool = False
) -> list[dict[str, Any]]:
    """Per warm round (2..R): wall seconds, silo work, coordinator task work, overhead, and its timeline."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterStartTime,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[coordinator_run_id])), limit=200
    )
    # The coordinator's own tasks; embedded silo subflows also appear as task runs of the parent
    # (named after the silo flow), and their time is counted as silo work.
    coord = [
        t
        for t in tasks
        if t.start_time is not None and t.end_time is not None and not t.name.startswith("silo-")
    ]
    commits = {t.name: t.end_time for t in coord if t.name.startswith("commit-r")}
    out = []
    for r in range(1, rounds):
        t_start, t_end = commits[f"commit-r{r - 1}"], commits[f"commit-r{r}"]
        runs = [
            fr
            for fr in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    start_time=FlowRunFilterStartTime(after_=t_start, before_=t_end)
                ),
                limit=200,
            )
            if fr.id != coordinator_run_id and fr.end_time is not None and "-round-" in fr.name
        ]
        in_round = [t for t in coord if t_start <= t.start_time and t.end_time <= t_end]
        silo_s = [e - s for s, e in map(_span, runs)]
        work = (max(silo_s) if side_by_side else sum(silo_s)) if silo_s else 0.0
        coordinator = sum(t.end_time.timestamp() - t.start_time.timestamp() for t in in_round)
        seconds = (t_end - t_start).total_seconds()
        row: dict[str, Any] = {
            "round": r + 1,
            "seconds": seconds,
            "silo_runs": silo_s,
            "silo_work": work,
            "coordinator_tasks": coordinator,
            "overhead": seconds - work - coordinator,
        }
        if timeline:
            row["timeline"] = _timeline(
                client, t_start, runs, in_round, TaskRunFilter, TaskRunFilterFlowRunId
            )
        out.append(row)
    return out


def _timeline(
    client: Any, t0: Any, runs: list[Any], coord_tasks: list[Any], task_filter: Any, by_run: Any
) -> list[tuple[float, str]]:
    """(seconds after ``t0``, what happened) for every state of the round's runs and tasks, in order."""
    base = t0.timestamp()
    events: list[tuple[float, str]] = []
    for t in coord_tasks:
        events += [
            (t.start_time.timestamp(), f"task {t.name} start"),
            (t.end_time.timestamp(), f"task {t.name} end"),
        ]
    names = {fr.id: fr.name for fr in runs}
    for fr in runs:
        events.append((fr.created.timestamp(), f"run {fr.name} created"))
        for st in client.read_flow_run_states(fr.id):
            events.append((st.timestamp.timestamp(), f"run {fr.name} {st.name}"))
    if names:
        inner = client.read_task_runs(task_run_filter=task_filter(flow_run_id=by_run(any_=list(names))))
        for t in inner:
            if t.start_time is not None and t.end_time is not None:
                who = names.get(t.flow_run_id, "?")
                events += [
                    (t.start_time.timestamp(), f"  {who}: task {t.name} start"),
                    (t.end_time.timestamp(), f"  {who}: task {t.name} end"),
                ]
    return sorted((t - base, what) for t, what in events)


def run_embedded(cfg: FederationConfig, timeline: bool) -> tuple[list[dict[str, Any]], float]:
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.federated_training import federated_training

    with prefect_test_harness(server_startup_timeout=120):
        t0 = time.perf_counter()
        state = federated_training(cfg, return_state=True)
        total = time.perf_counter() - t0
        assert state.is_completed(), state
        with get_client(sync_client=True) as client:
            rows = round_breakdown(
                client, state.state_details.flow_run_id, cfg.rounds, side_by_side=False, timeline=timeline
            )
    return rows, total


def run_stack(
    cfg_for: Any, silos: list[str], state_dir: Path, database: str, timeline: bool
) -> tuple[list[dict[str, Any]], float, float]:
    from ops import stack as stk
    from ops.prefect_server import prefect_api

    t0 = time.perf_counter()
    st = stk.up(state_dir, silos=silos, auto_ports=True, database=database, echo=lambda *a: None)
    up_s = time.perf_counter() - t0
    try:
        cfg = cfg_for(st)
        with prefect_api(st):
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
                rows = round_breakdown(client, fr.id, cfg.rounds, side_by_side=True, timeline=timeline)
    finally:
        stk.down(state_dir, echo=lambda *a: None)
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
    ap.add_argument(
        "--timeline",
        action="store_true",
        help="print the state timeline (runs, tasks) of the median warm round of each run",
    )
    ap.add_argument("--no-embedded", action="store_true", help="run the stack only (no ratio is printed)")
    ap.add_argument("--model", default="tiny-llama", help="tiny-llama (default) or smollm2-135m-instruct")
    ap.add_argument(
        "--threads",
        default="1",
        help="train.torch_threads: a number (default 1) or auto (the co-located CPU budget)",
    )
    ap.add_argument(
        "--colocated",
        action="store_true",
        help="the co-located row: the real model, 3 silos x 4 steps, threads auto; prints per-step ratio",
    )
    args = ap.parse_args(argv)
    if args.colocated:
        args.model, args.silos, args.steps, args.threads = "smollm2-135m-instruct", 3, 4, "auto"
    load_before = os.getloadavg()
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
        emb_rows, emb_total = ([], 0.0) if args.no_embedded else run_embedded(emb_cfg, args.timeline)

        def stack_cfg(st: Any) -> FederationConfig:
            # The stack's silos run under their policies: the config gets the stack's store, tracking,
            # private folders and pinned keys (signing on), as `silotune stack config` writes it.
            from ops.policies import stack_config

            return stack_config(
                st,
                make_config(
                    "bench-stack",
                    data,
                    silos,
                    args,
                    store=st.store_spec(),
                    tracking=st.tracking_spec("bench"),
                    orchestration={"mode": "workpools"},
                ),
            )

        stacks = {}
        for db in args.database.split(","):
            stacks[db] = run_stack(stack_cfg, silos, tmpd / f"stack-{db}", db, args.timeline)

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(
        f"config: {args.model}, {len(silos)} silos, {args.rounds} rounds ({args.rounds - 1} warm), "
        f"{args.steps} local step(s), threads {args.threads}"
    )
    runs = [("embedded", emb_rows)] + [(f"stack/{db}", v[0]) for db, v in stacks.items()]
    for label, rows in runs:
        for r in rows:
            print(
                f"  {label:15s} round {r['round']}: {r['seconds']:.2f} s = silo runs {r['silo_work']:.2f} "
                f"+ coordinator tasks {r['coordinator_tasks']:.2f} + overhead {r['overhead']:.2f}"
            )
    if args.timeline:
        for label, rows in runs:
            if not rows:
                continue
            row = sorted(rows, key=lambda x: x["overhead"])[len(rows) // 2]
            print(f"timeline of {label} round {row['round']} (s after round {row['round'] - 1}'s commit):")
            prev = 0.0
            for t, what in row["timeline"]:
                print(f"  {t:7.3f} (+{t - prev:5.3f}) {what}")
                prev = t
    e_round = None
    if emb_rows:
        e_round, e_ovh = med(emb_rows, "seconds"), med(emb_rows, "overhead")
        print(
            f"embedded: whole federation {emb_total:.1f} s; "
            f"warm round {e_round:.2f} s, overhead {e_ovh:.2f} s"
        )
    for db, (rows, total, up_s) in stacks.items():
        s_round, s_ovh = med(rows, "seconds"), med(rows, "overhead")
        ratio = f"ratio stack/embedded {s_round / e_round:.2f}" if e_round else "no embedded run"
        print(
            f"stack/{db}: start-up {up_s:.1f} s, whole federation {total:.1f} s; warm round {s_round:.2f} s "
            f"({ratio}), overhead {s_ovh:.2f} s "
            f"(target <= {TARGET_S:.1f} s: {'met' if s_ovh <= TARGET_S else 'NOT met'})"
        )
    # Per local step: a silo run (its evaluation of the global and its training) divided by its steps;
    # the co-located stack runs silos side by side, so one step there should cost about one embedded step.
    e_step = statistics.median(x / args.steps for r in emb_rows for x in r["silo_runs"]) if emb_rows else None
    for db, (rows, _total, _up) in stacks.items():
        s_step = statistics.median(x / args.steps for r in rows for x in r["silo_runs"])
        if e_step:
            print(
                f"per step (silo run / steps): embedded {e_step:.2f} s, stack/{db} {s_step:.2f} s, "
                f"ratio {s_step / e_step:.2f} (target <= {TARGET_STEP_RATIO})"
            )
    load_after = os.getloadavg()
    print(
        "load average (1/5/15 min) at start "
        + "/".join(f"{x:.2f}" for x in load_before)
        + ", at end "
        + "/".join(f"{x:.2f}" for x in load_after)
        + f" ({os.cpu_count()} CPUs)"
    )
    if args.json:
        out = {"embedded": emb_rows, **{f"stack/{db}": v[0] for db, v in stacks.items()}}
        out["load_average"] = {"start": load_before, "end": load_after}
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
