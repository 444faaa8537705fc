"""SCAFFOLD against FedAvg on the non-IID demo silos: holdout loss per round, and the rounds to a target.

Both federations run the library's round functions (train_silo per silo → aggregate_round →
commit_round, then every silo evaluates the new global on its holdout) with the same seed, data,
model, LoRA, local steps and learning rate; only ``aggregation.algorithm`` differs. The loss per
round is the example-weighted mean of the silos' holdout losses (``summarize_evals``).

The target is FedAvg's best holdout loss over the run; the bench prints the first round at which
each algorithm reaches it and their ratio (SCAFFOLD rounds / FedAvg rounds; below 1: SCAFFOLD is
faster; "never": it did not get there within the rounds run).

    python bench/scaffold_vs_fedavg.py                                   # tiny-llama, 8 rounds
    python bench/scaffold_vs_fedavg.py --model smollm2-135m-instruct --rounds 6 --steps 5 --lr 2e-3 \\
        --out results/scaffold-vs-fedavg-smollm2-135m-instruct.txt
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SILOS = ("clinic", "bank", "lab")


def _curve(
    algorithm: str, silos: dict[str, dict[str, Path]], work: Path, args: argparse.Namespace
) -> list[float]:
    import torch

    from silotune.adapters import AdapterModel
    from silotune.config import parse_config
    from silotune.federation import (
        aggregate_round,
        commit_round,
        evaluate_silo,
        start_federation,
        summarize_evals,
        train_silo,
    )
    from silotune.store import LocalStore

    cfg = parse_config(
        {
            "federation_id": f"bench-{algorithm}",
            "rounds": args.rounds,
            "seed": args.seed,
            "model": {"name_or_path": args.model, "max_seq_len": args.seq},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "train": {
                "local_steps": args.steps,
                "batch_size": args.batch,
                "learning_rate": args.lr,
                "torch_threads": args.threads,
            },
            "silos": [
                {
                    "name": n,
                    "train_path": str(silos[n]["train"]),
                    "eval_path": str(silos[n]["eval"]),
                    "private_dir": str(work / algorithm / "silos" / n),
                }
                for n in SILOS
            ],
            "aggregation": {"name": "fedavg", "algorithm": algorithm},
            "evaluation": {"max_examples": args.eval_examples, "batch_size": 16},
            "store": {"root": str(work / algorithm / "store")},
            "tracking": {"kind": "none"},
        }
    )
    torch.set_num_threads(args.threads)
    adapter = AdapterModel.create(cfg.model, cfg.lora, seed=cfg.seed, method=cfg.method)
    store = LocalStore(cfg.store.root)
    state = start_federation(cfg, store, adapter)

    def holdout(round_: int) -> float:
        evals = [e for n in SILOS if (e := evaluate_silo(cfg, n, round_, state.global_ref, store, adapter))]
        metrics = summarize_evals(evals)
        assert metrics is not None
        return float(metrics.loss)

    losses = [holdout(-1)]
    for r in range(cfg.rounds):
        t0 = time.perf_counter()
        records = [train_silo(cfg, n, r, state.global_ref, store, adapter, progress=False) for n in SILOS]
        agg = aggregate_round(cfg, store, r, state.global_ref, records)
        state = commit_round(cfg, store, state, r, records, [], agg)
        losses.append(holdout(r))
        print(
            f"  {algorithm:8s} round {r + 1}: holdout loss {losses[-1]:.4f}",
            f"({time.perf_counter() - t0:.1f} s)",
        )
    return losses


def _first_at_most(curve: list[float], target: float) -> int | None:
    """The first round (1-based; 0 is the initial global) whose loss is at most ``target``."""
    return next((i for i, x in enumerate(curve) if x <= target + 1e-9), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="local steps per silo per round (K)")
    parser.add_argument("--lr", type=float, default=2e-2, help="local AdamW learning rate (η)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--scale", type=float, default=0.2, help="demo data scale (make_demo_silos)")
    parser.add_argument("--eval-examples", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args()

    from silotune.demo import make_demo_silos

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scaffold-bench-") as tmp:
        work = Path(tmp)
        silos = make_demo_silos(work / "data", seed=args.seed, scale=args.scale)
        curves = {a: _curve(a, silos, work, args) for a in ("fedavg", "scaffold")}
    seconds = time.perf_counter() - t0

    fedavg, scaffold = curves["fedavg"], curves["scaffold"]
    target = min(fedavg[1:])
    r_fedavg, r_scaffold = _first_at_most(fedavg, target), _first_at_most(scaffold, target)
    lines = [
        "SCAFFOLD (option II) vs FedAvg on the non-IID demo silos (clinic, bank, lab)",
        f"model {args.model}, LoRA r=8 on q_proj,v_proj, {args.rounds} rounds, "
        f"K={args.steps} local AdamW steps, lr={args.lr}, batch {args.batch}, max_seq_len {args.seq}, "
        f"demo scale {args.scale}, seed {args.seed}, example-weighted FedAvg, server sgd lr=1, "
        f"holdout: first {args.eval_examples} examples per silo",
        f"machine: {platform.machine()}, {args.threads} torch threads, {seconds:.0f} s for both runs",
        "",
        "round  fedavg    scaffold  (example-weighted mean holdout loss; round 0 = initial global)",
    ]
    for r, (a, b) in enumerate(zip(fedavg, scaffold, strict=True)):
        lines.append(f"{r:5d}  {a:8.4f}  {b:8.4f}")
    lines += [
        "",
        f"target: FedAvg's best holdout loss {target:.4f}, reached by FedAvg in round {r_fedavg}",
        f"SCAFFOLD reaches it in round {r_scaffold if r_scaffold is not None else 'never (within the run)'}",
        "ratio (SCAFFOLD rounds / FedAvg rounds): "
        + (f"{r_scaffold / r_fedavg:.2f}" if r_scaffold is not None and r_fedavg else "n/a"),
        f"final loss: FedAvg {fedavg[-1]:.4f}, SCAFFOLD {scaffold[-1]:.4f} "
        f"(SCAFFOLD / FedAvg {scaffold[-1] / fedavg[-1]:.3f})",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
