"""How aggregation cost grows with the number of silos: time and bytes per rule and protection.

Run: ``PYTHONPATH=. nice .venv/bin/python bench/aggregation_scale.py [--silos 10 32 100 128] [--repeats 1]``
(``--rules fedavg --protections secagg`` for the secure-aggregation rows alone)

Each silo's delta is a random SmolLM2-135M-Instruct LoRA delta (r=8 on q_proj and v_proj; the shapes
come from the model's own GGUF metadata: hidden size, layers, heads, key/value heads), N(0, 1e-3²).
Plaintext rules see every tensor (A and B: 460,800 values); under secure aggregation or CKKS the
silos exchange LoRA B only (FFA-LoRA, 184,320 values), as silotune does.

Timed, per number of silos ``n`` (the coordinator's side of a round; the silos' work is parallel):

- each plaintext rule: ``silotune.aggregation.aggregate`` (validation included) over ``n`` updates;
- ``secagg``: ``unmask_sum`` over the ``n`` masked updates and the survivors' answers, no dropout
  (rebuilding every self-mask seed from its shares, removing every self mask, decoding the sum), on
  the masking graph silotune uses: complete up to 32 silos, else each silo's k = O(log n) neighbours;
- ``ckks``: ``sum_encrypted`` over the ``n`` ciphertexts (preset ``packed-n4096-s128`` beyond 32 silos).

Bytes: what one silo uploads (the update, and under secure aggregation its advert and its encrypted
share messages) against the fp32 bytes of the values it protects, and what the coordinator reads.
The growth of each row is fitted as ``t = a · n^b`` (least squares in log-log); the baseline is
plaintext FedAvg in the same run, so the ratios hold on any machine.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
import torch

from silotune.aggregation import ClientUpdate, aggregate, build_aggregator
from silotune.crypto import ckks
from silotune.crypto import secagg as sa
from silotune.modeling import _gguf_location

SCALE = 1e-3
RANK = 8
TARGETS = {"fedavg_100_s": 5.0, "upload_ratio_128": 1.1, "round_s": 60.0}


def smollm2_shapes(rank: int = RANK) -> dict[str, tuple[int, int]]:
    """LoRA factor shapes of SmolLM2-135M-Instruct (q_proj, v_proj), read from its GGUF header."""
    folder, name = _gguf_location()
    reader = gguf.GGUFReader(str(folder / name))

    def field(key: str) -> int:
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    hidden, layers = field("llama.embedding_length"), field("llama.block_count")
    heads, kv_heads = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    out = {"q_proj": hidden, "v_proj": hidden // heads * kv_heads}
    shapes = {}
    for layer in range(layers):
        for module, out_features in out.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, hidden)
            shapes[f"{prefix}.lora_B.weight"] = (out_features, rank)
    return shapes


def deltas(n: int, shapes: dict[str, tuple[int, int]], seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) * SCALE for k, s in shapes.items()} for _ in range(n)]


def numel(shapes: dict[str, tuple[int, int]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


RULES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "median": {},
    "trimmed_mean": {"trim_ratio": 0.1},
    "norm_bounded": {"max_norm": 1.0},
    "krum": {"num_byzantine": 2},
    "multi_krum": {"num_byzantine": 2},
    "fltrust": {},
}


def bench_plain(n: int, shapes, repeats: int, rules: list[str]) -> dict[str, tuple[float, int, int]]:
    """rule -> (seconds, bytes one silo uploads, bytes the coordinator reads)."""
    ds = deltas(n, shapes, seed=n)
    updates = [ClientUpdate(silo=f"silo-{i:03d}", delta=d, num_examples=100 + i) for i, d in enumerate(ds)]
    up = numel(shapes) * 4  # safetensors fp32 payload (plus a header of a few kB)
    out = {}
    for name, options in RULES.items():
        if name != "fedavg" and name not in rules:
            continue
        rule = build_aggregator(name, **options)
        if hasattr(rule, "set_root_update"):
            rule.set_root_update(deltas(1, shapes, seed=10_000 + n)[0])
        seconds, _ = timed(lambda rule=rule: aggregate(rule, updates), repeats)
        out[name] = (seconds, up, n * up)
    return out


def bench_secagg(n: int, shapes, complete_up_to: int = sa.COMPLETE_UP_TO) -> tuple[Any, ...]:
    """(coordinator seconds, per-silo update bytes, per-silo protocol message bytes, mask s, error,
    note on the graph and where the protocol bytes go)."""
    names = [f"silo-{i:03d}" for i in range(n)]
    params = sa.SecAggParams(max_silos=max(64, n))
    rid = f"bench/{n}"
    ds = deltas(n, shapes, seed=n)
    clients = {
        m: sa.SecAggClient(m, round_id=rid, roster=names, params=params, complete_up_to=complete_up_to)
        for m in names
    }
    graph = clients[names[0]].graph
    adverts = {m: c.advertise() for m, c in clients.items()}
    shares = {m: c.share_keys({p: adverts[p] for p in graph.holders(m)}) for m, c in clients.items()}
    inbox = {m: {s: shares[s][m] for s in names if m in shares[s]} for m in names}
    w = 1.0 / n
    masked = {}
    t = time.perf_counter()
    masked[names[0]] = clients[names[0]].mask_update(ds[0], inbox[names[0]], weight=w)
    mask_s = time.perf_counter() - t
    for m, d in zip(names[1:], ds[1:], strict=True):
        masked[m] = clients[m].mask_update(d, inbox[m], weight=w)
    responses = {m: clients[m].unmask(names) for m in names}
    t = time.perf_counter()
    result = sa.unmask_sum(
        masked,
        responses,
        adverts=adverts,
        round_id=rid,
        roster=names,
        params=params,
        complete_up_to=complete_up_to,
    )
    seconds = time.perf_counter() - t
    ref = {k: sum(d[k].double() for d in ds) / n for k in shapes}
    err = max(float((result.delta[k].double() / (result.weight * n) * n - ref[k]).abs().max()) for k in ref)
    share_bytes = sum(len(b) for b in shares[names[0]].values())
    messages = len(adverts[names[0]]) + share_bytes + len(responses[names[0]])
    header = len(masked[names[0]]) - 4 * numel(shapes)
    advert, answer = len(adverts[names[0]]), len(responses[names[0]])
    note = (
        f"{graph.kind} k={graph.degree}: header {header / 1e3:.1f} kB, advert {advert} B, "
        f"{len(shares[names[0]])} shares {share_bytes / 1e3:.1f} kB, unmask {answer / 1e3:.1f} kB"
    )
    return seconds, len(masked[names[0]]), messages, mask_s, err, note


def bench_ckks(n: int, shapes) -> tuple[float, int, float, str, float]:
    """(coordinator seconds, per-silo bytes, encrypt s, preset, error)."""
    preset = (
        ckks.DEFAULT_PRESET if n <= ckks.ckks_preset(ckks.DEFAULT_PRESET).max_silos else "packed-n4096-s128"
    )
    secret = ckks.load_context(ckks.create_secret_context(preset))
    public = ckks.load_context(ckks.public_context(secret))
    ds = deltas(n, shapes, seed=n)
    t = time.perf_counter()
    blobs = [ckks.encrypt_update(ds[0], secret, weight=1.0 / n)]
    enc_s = time.perf_counter() - t
    blobs += [ckks.encrypt_update(d, secret, weight=1.0 / n) for d in ds[1:]]
    t = time.perf_counter()
    total = ckks.sum_encrypted(blobs, public)
    seconds = time.perf_counter() - t
    out = ckks.decrypt_update(total, secret)
    ref = {k: sum(d[k].double() for d in ds) / n for k in shapes}
    err = max(float((out[k].double() - ref[k]).abs().max()) for k in ref)
    return seconds, len(blobs[0]), enc_s, preset, err


def fit(ns: list[int], ts: list[float]) -> tuple[float, float]:
    """``t = a · n^b`` by least squares on logs: returns (a, b)."""
    b, log_a = np.polyfit(np.log(ns), np.log(np.maximum(ts, 1e-9)), 1)
    return float(math.exp(log_a)), float(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, nargs="+", default=[10, 32, 100, 128])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-crypto", action="store_true", help="plaintext rules only")
    parser.add_argument(
        "--rules", nargs="+", choices=list(RULES), default=list(RULES), help="plaintext rules (fedavg always)"
    )
    parser.add_argument(
        "--protections",
        nargs="+",
        choices=["secagg", "ckks"],
        default=["secagg", "ckks"],
        help="protected rows",
    )
    parser.add_argument(
        "--complete-up-to",
        type=int,
        default=sa.COMPLETE_UP_TO,
        help="secagg: largest roster masked over the complete graph (silotune's default: 32)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 gives stable timings on a shared machine)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    plain_shapes = smollm2_shapes()
    b_shapes = {k: s for k, s in plain_shapes.items() if "lora_B" in k}
    fp32_plain, fp32_b = numel(plain_shapes) * 4, numel(b_shapes) * 4
    print(
        f"SmolLM2-135M-Instruct LoRA r={RANK} on q_proj, v_proj: {numel(plain_shapes):,} values "
        f"(B only, FFA-LoRA: {numel(b_shapes):,}); torch threads {torch.get_num_threads()}, "
        f"CPUs {os.cpu_count()}"
    )
    times: dict[str, list[float]] = {}
    rows = []
    header = (
        f"{'silos':>5} {'rule':<13} {'protection':<10} {'seconds':>9} {'x FedAvg':>9} "
        f"{'upload/fp32':>11} {'coord. reads MB':>15}  notes"
    )
    print()
    print(header)
    print("-" * len(header))

    def show(row: tuple[Any, ...]) -> None:
        n, name, prot, s, ratio, total, note = row
        fedavg = next(r[3] for r in rows if r[0] == n and r[1] == "fedavg" and r[2] == "none")
        print(
            f"{n:>5} {name:<13} {prot:<10} {s:>9.3f} {s / fedavg:>9.1f} {ratio:>11.3f} "
            f"{total / 1e6:>15.1f}  {note}",
            flush=True,
        )

    for n in args.silos:
        for name, (s, up, total) in bench_plain(n, plain_shapes, args.repeats, args.rules).items():
            times.setdefault(name, []).append(s)
            rows.append((n, name, "none", s, up / fp32_plain, total, ""))
            show(rows[-1])
        if args.no_crypto:
            continue
        if "secagg" in args.protections:
            s, up, msgs, mask_s, err, note = bench_secagg(n, b_shapes, args.complete_up_to)
            times.setdefault("fedavg+secagg", []).append(s)
            rows.append(
                (
                    n,
                    "fedavg",
                    "secagg",
                    s,
                    (up + msgs) / fp32_b,
                    n * up,
                    f"mask {mask_s:.2f} s/silo, err {err:.1e}; {note}",
                )
            )
            show(rows[-1])
        if "ckks" not in args.protections:
            continue
        s, up, enc_s, preset, err = bench_ckks(n, b_shapes)
        times.setdefault("fedavg+ckks", []).append(s)
        rows.append(
            (n, "fedavg", "ckks", s, up / fp32_b, n * up, f"{preset}, enc {enc_s:.2f} s/silo, err {err:.1e}")
        )
        show(rows[-1])
    base = {n: s for n, name, prot, s, *_ in rows if name == "fedavg" and prot == "none"}
    print()
    print(f"growth t = a * n^b over n = {args.silos}:")
    fits = {}
    for name, ts in times.items():
        if len(ts) == len(args.silos) and len(ts) >= 2:
            fits[name] = fit(args.silos, ts)
            print(f"  {name:<15} b = {fits[name][1]:.2f}   a = {fits[name][0]:.3g} s")
    print()
    checks = []
    if 100 in args.silos:
        s100 = base[100]
        checks.append(
            ("plaintext FedAvg over 100 silos <= 5 s", s100 <= TARGETS["fedavg_100_s"], f"{s100:.3f} s")
        )
    if "krum" in fits:
        a, b = fits["krum"]
        n60 = (TARGETS["round_s"] / a) ** (1 / b) if b > 0 else math.inf
        print(f"Krum: a round exceeds 60 s from about n = {n60:,.0f} silos (extrapolated from the fit)")
    if 128 in args.silos and not args.no_crypto:
        for prot in args.protections:
            ratio = next(r for n, _, p, _, r, *_ in rows if n == 128 and p == prot)
            checks.append(
                (
                    f"{prot} per-silo upload at 128 silos <= 1.1x fp32",
                    ratio <= TARGETS["upload_ratio_128"],
                    f"{ratio:.3f}x",
                )
            )
    for what, ok, value in checks:
        print(f"  {'met ' if ok else 'MISS'}  {what:<48} {value}")


if __name__ == "__main__":
    main()
