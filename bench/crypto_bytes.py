"""Bytes and encryption time per update: TenSEAL default CKKS vs silotune's CKKS vs secure aggregation.

Run: ``.venv/bin/python bench/crypto_bytes.py [--silos 4] [--repeats 3]``

One synthetic delta per silo, 460,800 float32 values drawn from N(0, (1e-3)^2): the size of
SmolLM2-135M LoRA r=8 on q and v. Every scheme encrypts (or masks) each silo's delta with its
FedAvg weight 1/S, the coordinator sums, a silo decrypts (or the coordinator unmasks), and the
result is compared with the plaintext weighted sum. Encryption time is one silo's
``encrypt_update`` / ``mask_update`` call, bytes included, median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from silotune.crypto import ckks
from silotune.crypto import secagg as sa

NUMEL = 460_800  # SmolLM2-135M, LoRA r=8 on q_proj and v_proj
SCALE = 1e-3


@dataclass
class Row:
    name: str
    bytes_per_update: int
    encrypt_s: float
    aggregate_s: float
    decrypt_s: float | None  # None: no decryption step (secure aggregation unmasks at the coordinator)
    max_abs_err: float


def _timed(fn: Callable[[], bytes], repeats: int) -> tuple[float, bytes]:
    times, out = [], b""
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _err(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(float((out[k].double() - ref[k]).abs().max()) for k in ref)


def bench_ckks(
    name: str, preset: str, deltas, weights, ref, repeats: int, *, public_key: bool = False
) -> Row:
    secret = ckks.load_context(ckks.create_secret_context(preset))
    public = ckks.load_context(ckks.public_context(secret))
    enc_ctx = public if public_key else secret
    enc_s, first = _timed(lambda: ckks.encrypt_update(deltas[0], enc_ctx, weight=weights[0]), repeats)
    blobs = [first] + [
        ckks.encrypt_update(d, enc_ctx, weight=w) for d, w in zip(deltas[1:], weights[1:], strict=True)
    ]
    t = time.perf_counter()
    agg = ckks.sum_encrypted(blobs, public)
    agg_s = time.perf_counter() - t
    t = time.perf_counter()
    out = ckks.decrypt_update(agg, secret)
    dec_s = time.perf_counter() - t
    return Row(name, len(first), enc_s, agg_s, dec_s, _err(out, ref))


def bench_secagg(deltas, weights, ref, repeats: int) -> Row:
    names = [f"silo-{i}" for i in range(len(deltas))]
    round_no = iter(range(10**6))

    def setup() -> tuple[str, dict[str, sa.SecAggClient], dict[str, bytes], dict[str, dict[str, bytes]]]:
        rid = f"bench/round-{next(round_no)}"  # masks are single-use: a fresh round per run
        clients = {n: sa.SecAggClient(n, round_id=rid, roster=names) for n in names}
        adverts = {n: c.advertise() for n, c in clients.items()}
        shares = {n: c.share_keys(adverts) for n, c in clients.items()}
        inbox = {n: {s: shares[s][n] for s in names if s != n} for n in names}
        return rid, clients, adverts, inbox

    times = []
    for _ in range(repeats):
        rid, clients, adverts, inbox = setup()
        t = time.perf_counter()
        first = clients[names[0]].mask_update(deltas[0], inbox[names[0]], weight=weights[0])
        times.append(time.perf_counter() - t)
    masked = {names[0]: first}
    masked |= {
        n: clients[n].mask_update(d, inbox[n], weight=w)
        for n, d, w in zip(names[1:], deltas[1:], weights[1:], strict=True)
    }
    t = time.perf_counter()
    responses = {n: clients[n].unmask(names) for n in names}
    result = sa.unmask_sum(masked, responses, adverts=adverts, round_id=rid, roster=names)
    unmask_s = time.perf_counter() - t
    return Row(
        f"secagg masking (S={len(names)}, 32-bit ring)",
        len(first),
        statistics.median(times),
        unmask_s,
        None,
        _err(result.delta, ref),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    # Two tensors, as a LoRA adapter has A and B matrices; sorted order differs from insertion order.
    deltas = [
        {
            "v.lora_B": torch.randn(NUMEL // 2, generator=g) * SCALE,
            "q.lora_A": torch.randn(NUMEL // 2, generator=g) * SCALE,
        }
        for _ in range(args.silos)
    ]
    weights = [1.0 / args.silos] * args.silos
    ref = {k: sum(w * d[k].double() for d, w in zip(deltas, weights, strict=True)) for k in deltas[0]}
    fp32 = NUMEL * 4

    rows = [
        bench_ckks(
            "CKKS tenseal-default (N=8192 [60,40,40,60] 2^40, slots)",
            "tenseal-default",
            deltas,
            weights,
            ref,
            args.repeats,
        ),
        bench_ckks(
            "CKKS slots-n4096 (N=4096 [60,49] 2^40, slots)", "slots-n4096", deltas, weights, ref, args.repeats
        ),
        bench_ckks(
            "CKKS packed-n4096, secret key (DEFAULT)", ckks.DEFAULT_PRESET, deltas, weights, ref, args.repeats
        ),
        bench_ckks(
            "CKKS packed-n4096, public key only",
            ckks.DEFAULT_PRESET,
            deltas,
            weights,
            ref,
            args.repeats,
            public_key=True,
        ),
        bench_secagg(deltas, weights, ref, args.repeats),
    ]
    base = rows[0]
    print(
        f"delta: {NUMEL:,} float32 values of scale {SCALE:g} ({fp32 / 1e6:.2f} MB), {args.silos} silos with "
        f"weight 1/{args.silos}; {args.repeats} repeats (median); torch threads {torch.get_num_threads()}, "
        f"CPUs {os.cpu_count()}"
    )
    print()
    header = (
        f"{'scheme':<56} {'bytes/update':>13} {'x fp32':>7} {'enc s':>7} {'M val/s':>8} "
        f"{'max abs err':>11} {'bytes vs dflt':>13} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.name:<56} {r.bytes_per_update:>13,} {r.bytes_per_update / fp32:>7.2f} {r.encrypt_s:>7.3f} "
            f"{NUMEL / r.encrypt_s / 1e6:>8.2f} {r.max_abs_err:>11.2e} "
            f"{r.bytes_per_update / base.bytes_per_update:>13.3f} {base.encrypt_s / r.encrypt_s:>7.1f}x"
        )
    print()
    print(f"{'scheme':<56} {'aggregate s':>11} {'decrypt s':>10}   (coordinator sum / unmask; silo decrypt)")
    for r in rows:
        dec = "n/a" if r.decrypt_s is None else f"{r.decrypt_s:.3f}"
        print(f"{r.name:<56} {r.aggregate_s:>11.3f} {dec:>10}")
    chosen = rows[2]
    print()
    print("targets for the chosen CKKS parameters (packed-n4096, secret key) vs tenseal-default:")
    checks = [
        ("bytes <= 4x fp32", chosen.bytes_per_update / fp32 <= 4, f"{chosen.bytes_per_update / fp32:.2f}x"),
        (
            "encryption >= 3x faster",
            base.encrypt_s / chosen.encrypt_s >= 3,
            f"{base.encrypt_s / chosen.encrypt_s:.1f}x",
        ),
        ("max abs error <= 1e-6", chosen.max_abs_err <= 1e-6, f"{chosen.max_abs_err:.2e}"),
        (
            "secagg bytes <= 1.1x fp32",
            rows[4].bytes_per_update / fp32 <= 1.1,
            f"{rows[4].bytes_per_update / fp32:.3f}x",
        ),
    ]
    for what, ok, value in checks:
        print(f"  {'met ' if ok else 'MISS'}  {what:<28} {value}")


if __name__ == "__main__":
    main()
