"""One federated round per post-training method on the real SmolLM2-135M-Instruct, on CPU.

Each method runs the library's round functions (start → train_silo × 2 → aggregate_round →
evaluate_silo) on two demo silos, then publishes the artifact and loads it back onto a
fresh base; optionally one LoRA DPO round on the preference silo. Prints one row per
method: trainable parameters, bytes exchanged per silo, seconds per step, holdout loss
before and after, and whether the artifact reloads to the same logits.

    python bench/methods_real.py                       # lora, qlora, ia3, prompt_tuning, full (+ DPO)
    python bench/methods_real.py --methods lora,qlora --steps 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LR = {"lora": 2e-3, "qlora": 2e-3, "ia3": 1e-2, "prompt_tuning": 1e-2, "full": 2e-5}


def _round(method: str, objective: str, silos: dict[str, dict[str, Path]], work: Path, args) -> dict:  # type: ignore[no-untyped-def]
    import torch

    from silotune.adapters import AdapterModel
    from silotune.config import parse_config
    from silotune.federation import aggregate_round, evaluate_silo, start_federation, train_silo
    from silotune.methods import get_method, parse_options
    from silotune.store import LocalStore, get_tensors

    cfg = parse_config(
        {
            "federation_id": f"real-{method.replace('_', '-')}-{objective}",
            "seed": 0,
            "model": {"name_or_path": args.model, "max_seq_len": args.seq},
            "method": {
                "name": method,
                "options": {"num_virtual_tokens": 16} if method == "prompt_tuning" else {},
            },
            "objective": {"name": objective, "beta": 0.1},
            "train": {
                "local_steps": args.steps,
                "batch_size": args.batch,
                "learning_rate": LR[method],
                "torch_threads": args.threads,
            },
            "silos": [
                {"name": n, "train_path": str(p["train"]), "eval_path": str(p["eval"])}
                for n, p in silos.items()
            ],
            "evaluation": {"max_examples": args.eval_examples, "batch_size": 8},
            "store": {"root": str(work / "store")},
            "tracking": {"kind": "none"},
        }
    )
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    adapter = AdapterModel.create(cfg.model, cfg.lora, seed=0, method=cfg.method)
    load_s = time.perf_counter() - t0
    store = LocalStore(cfg.store.root)
    state = start_federation(cfg, store, adapter)
    names = list(silos)
    before = [evaluate_silo(cfg, n, -1, state.global_ref, store, adapter) for n in names]
    recs = [train_silo(cfg, n, 0, state.global_ref, store, adapter, progress=False) for n in names]
    agg = aggregate_round(cfg, store, 0, state.global_ref, recs)
    after = [evaluate_silo(cfg, n, 0, agg.next_global, store, adapter) for n in names]
    folder = adapter.save_pretrained(work / "artifact", get_tensors(store, agg.next_global.key))
    impl = get_method(method)
    reloaded = impl.load_artifact(folder, adapter.model_path, parse_options(impl, cfg.method.options))
    ids = torch.tensor([[1, 20, 300, 4000, 5]])
    with torch.no_grad():
        adapter.model.eval()
        reloaded.eval()
        a = adapter.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        b = reloaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    row = {
        "method": method,
        "objective": objective,
        "trainable": adapter.num_trainable(),
        "update_bytes": recs[0].train["update_bytes"],
        "load_s": load_s,
        "s_per_step": sum(r.train["seconds"] for r in recs) / sum(r.train["steps"] for r in recs),
        "loss_before": sum(e.result["loss"] for e in before if e) / len(names),
        "loss_after": sum(e.result["loss"] for e in after if e) / len(names),
        "reload_max_abs_diff": float((a - b).abs().max()),
        "seconds": time.perf_counter() - t0,
    }
    if objective == "dpo":
        row["margin_before"] = before[0].result["pref_margin"] if before[0] else None
        row["margin_after"] = after[0].result["pref_margin"] if after[0] else None
        row["reward_acc_after"] = after[0].result["reward_accuracy"] if after[0] else None
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,qlora,ia3,prompt_tuning,full")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--eval-examples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dpo", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import os

    from silotune.demo import make_demo_silos, make_preference_silo
    from silotune.modeling import OFFLINE_ENV

    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_silos(Path(tmp) / "data", seed=0, scale=0.2)
        silos = {n: data[n] for n in ("clinic", "bank")}
        for m in args.methods.split(","):
            rows.append(_round(m, "sft", silos, Path(tmp) / m, args))
            print(json.dumps(rows[-1]), flush=True)
        if args.dpo:
            p = make_preference_silo(Path(tmp) / "prefs", seed=0, scale=0.2)
            lines = p["train"].read_text().splitlines(keepends=True)
            (Path(tmp) / "pa.jsonl").write_text("".join(lines[::2]))
            (Path(tmp) / "pb.jsonl").write_text("".join(lines[1::2]))
            pref = {
                "prefs-a": {"train": Path(tmp) / "pa.jsonl", "eval": p["eval"]},
                "prefs-b": {"train": Path(tmp) / "pb.jsonl", "eval": p["eval"]},
            }
            rows.append(_round("lora", "dpo", pref, Path(tmp) / "dpo", args))
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nOne federated round per method, {args.model}, "
        f"2 silos × {args.steps} steps × batch {args.batch}, CPU"
    )
    print(
        f"{'method':<14} {'obj':<4} {'trainable':>11} {'upload/silo':>12} {'s/step':>7} "
        f"{'holdout loss':>16} {'reload Δ':>9}"
    )
    for r in rows:
        print(
            f"{r['method']:<14} {r['objective']:<4} {r['trainable']:>11,} {r['update_bytes'] / 1e6:>9.2f} MB "
            f"{r['s_per_step']:>7.1f} {r['loss_before']:>7.3f} → {r['loss_after']:<6.3f} "
            f"{r['reload_max_abs_diff']:>9.1e}"
        )
        if r["objective"] == "dpo":
            print(
                f"{'':<14} DPO held-out margin {r['margin_before']:.3f} → {r['margin_after']:.3f}, "
                f"implicit-reward accuracy {r['reward_acc_after']:.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
