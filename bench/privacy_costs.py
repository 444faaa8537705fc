"""What privacy and protection cost, each against its baseline in the same run.

Run: ``.venv/bin/python bench/privacy_costs.py [--model smollm2-135m-instruct|tiny-llama] [--steps 3]
[--repeats 3] [--silos 4]``

1. DP-SGD step vs the non-private step: silotune's ``train_local`` on the demo "lab" silo, LoRA r=8 on
   q,v, batch 4 (DP: Poisson sampling with expected batch 4), with Opacus per-example gradients in
   ``hooks`` and ``ew`` modes. Runs are interleaved (plain, hooks, ew, plain, ...) so machine noise
   hits all three; reported as training tokens per second (DP batches vary in size) and the ratio
   plain / DP, i.e. how many times slower a DP step is per token.
2. Encryption and masking bytes and seconds per update: TenSEAL's default CKKS parameters vs
   silotune's packed CKKS preset vs secure-aggregation masking, on a 460,800-value delta (SmolLM2
   LoRA r=8 on q,v), from ``bench/crypto_bytes.py``; bytes as a ratio of fp32, encryption speed as
   a ratio of the TenSEAL default.
3. Signing and verification, measured against the plain fp32 delta in the same run: (a) the upload
   per silo per round under secagg and packed CKKS (update + its signature + the signed result record)
   as a multiple of the fp32 bytes of the same delta, against the 1.1x target; (b) the seconds each
   check adds per round of 3 silos, in real rounds through the library's round code with every key
   pinned (``bench_round_checks``): signing and verifying updates, result records, secure-aggregation
   messages, the coordinator's globals, survivor sets and manifests; reading a result record (size
   limit, signature, json + pydantic); a CKKS silo recomputing the aggregate before it decrypts; and
   the keyed ChaCha20 noise against torch's generator. The delta is random: LoRA r=8 on q,v of
   SmolLM2-135M (460,800 float32 values), no model is loaded; under protection FFA-LoRA (always on
   there) exchanges the LoRA B half, 184,320 values, so the rounds measure both sizes.

``--parts`` picks sections (default ``dp,crypto,signing``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from silotune.adapters import AdapterModel
from silotune.config import LoraSpec, ModelSpec, TrainSpec
from silotune.data import encode_dataset, read_records
from silotune.demo import make_demo_silos
from silotune.training import DPSGD, train_local


def dp_step_costs(model: str, steps: int, repeats: int) -> list[tuple[str, float]]:
    adapter = AdapterModel.create(ModelSpec(name_or_path=model, max_seq_len=128), LoraSpec(r=8), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_demo_silos(Path(tmp), seed=0)
        examples = encode_dataset(read_records(paths["lab"]["train"]), adapter.tokenizer, 128)
    spec = TrainSpec(local_steps=steps, batch_size=4, learning_rate=2e-3)
    g = adapter.state()
    q = 4 / len(examples)
    modes = {
        "non-private": None,
        "DP-SGD (opacus hooks)": DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=q, noise_seed=1),
        "DP-SGD (opacus ew)": DPSGD(
            noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=q, noise_seed=1, grad_sample_mode="ew"
        ),
    }
    for dp in modes.values():  # warm-up: first-call costs out of the timings
        train_local(
            adapter, g, examples, TrainSpec(local_steps=1, batch_size=4), seed=0, progress=False, dp=dp
        )
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for rep in range(repeats):
        for name, dp in modes.items():
            _, res = train_local(adapter, g, examples, spec, seed=rep, progress=False, dp=dp)
            rates[name].append(res.tokens_per_second)
            print(f"  repeat {rep + 1}: {name:<24} {res.tokens_per_second:8.1f} tok/s", flush=True)
    return [(name, statistics.median(v)) for name, v in rates.items()]


def _crypto_module():
    path = Path(__file__).with_name("crypto_bytes.py")
    spec = importlib.util.spec_from_file_location("crypto_bytes", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["crypto_bytes"] = mod
    spec.loader.exec_module(mod)
    return mod


# -- 3. signing and verification, measured in real rounds ---------------------------------------------

SMOLLM2_LAYERS, SMOLLM2_HIDDEN, SMOLLM2_KV_DIM, LORA_RANK = 30, 576, 192, 8  # SmolLM2-135M; LoRA r=8
SILOS = ("clinic", "bank", "lab")
TARGET_X_FP32 = 1.1  # upload target of secagg and packed CKKS: signature and result record included
DELTA_SCALE = 1e-3


def smollm2_lora_shapes() -> dict[str, tuple[int, int]]:
    """The LoRA r=8 tensors on q_proj and v_proj of SmolLM2-135M: 460,800 values in all."""
    shapes = {}
    for i in range(SMOLLM2_LAYERS):
        for module, out_dim in (("q_proj", SMOLLM2_HIDDEN), ("v_proj", SMOLLM2_KV_DIM)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (LORA_RANK, SMOLLM2_HIDDEN)
            shapes[f"{prefix}.lora_B.weight"] = (out_dim, LORA_RANK)
    return shapes


def _numel(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


class CheckTimer:
    """Seconds and calls of every Ed25519 signature and verification, by (scope, operation, purpose).

    Wraps what every signer and verifier goes through (``sign_update``, and ``verify_update`` in the
    signing module and in the protection base), so the timed calls are exactly those the round code
    makes: the domain-separated message (sha256 of the payload) and the Ed25519 step. Loading a key
    from its PEM file is outside. ``scope`` tags calls nested in a timed step (``read_result``,
    ``_checked_sum``), so the step's total and its signature part are not counted twice.
    """

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str, str], int] = defaultdict(int)
        self.scope = ""

    @contextmanager
    def within(self, scope: str) -> Iterator[None]:
        outer, self.scope = self.scope, scope
        try:
            yield
        finally:
            self.scope = outer

    @contextmanager
    def installed(self) -> Iterator[CheckTimer]:
        from silotune.crypto import signing
        from silotune.protection import base

        sign, verify, base_verify = signing.sign_update, signing.verify_update, base.verify_update

        def timed(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    what = (self.scope, op, kwargs.get("purpose", "update"))
                    self.seconds[what] += time.perf_counter() - t
                    self.calls[what] += 1

            return wrapper

        signing.sign_update = timed("sign", sign)
        signing.verify_update = timed("verify", verify)
        base.verify_update = timed("verify", base_verify)
        try:
            yield self
        finally:
            signing.sign_update, signing.verify_update, base.verify_update = sign, verify, base_verify


@dataclass
class RoundCosts:
    seconds: dict[str, float]  # what was timed -> seconds in the round, summed over the silos
    calls: dict[str, int]
    upload: dict[str, int]  # the first silo's bytes: update, update_sig, record, record_sig, messages
    exchanged: int  # values in the exchanged delta
    wall: float  # the round's wall time in this bench (silos one after another, no training)


def _bench_config(root: Path, protection: str) -> Any:
    from silotune.config import parse_config
    from silotune.keys import pin_local_keys

    silos = []
    for s in SILOS:
        data = root / "data" / f"{s}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text('{"instruction": "unused", "response": "unused"}\n')
        silos.append({"name": s, "train_path": str(data), "private_dir": str(root / "silos" / s)})
    raw = {
        "federation_id": f"bench-{protection}",
        "rounds": 8,
        "model": {"name_or_path": "tiny-llama"},  # never loaded: the deltas are random tensors
        "lora": {"r": LORA_RANK},
        "silos": silos,
        "store": {"root": str(root / "store")},
        "tracking": {"kind": "none"},
        "security": {"protection": protection, "signing": True, "keys_dir": str(root / "coordinator")},
        "aggregation": {"min_silos": 2, "options": {"weighted": False}},
    }
    # Every silo's key and the coordinator's pinned in the config: every check the code has is on.
    return pin_local_keys(parse_config(raw))


def _round_record(config: Any, silo: str, round_: int, ref: Any, sig_ref: Any, nbytes: int) -> Any:
    """What ``silo-round`` reports (realistic metrics), redacted as the silo's default policy releases."""
    from silotune.federation import EvalRecord, SiloRoundResult, UpdateRecord
    from silotune.results import Release, redact

    update = UpdateRecord(
        silo=silo,
        round=round_,
        update=ref,
        num_examples=400,
        train={
            "num_examples": 400,
            "steps": 8,
            "tokens": 25_431,
            "first_loss": 2.3418,
            "final_loss": 0.8127,
            "mean_loss": 1.2234,
            "seconds": 21.84,
            "tokens_per_second": 1164.4,
            "update_norm": 0.03311,
            "update_bytes": nbytes,
        },
        protection=config.security.protection,
        signature=sig_ref,
        bytes_up=nbytes + 64,
        bytes_down=nbytes,
    )
    evaluation = EvalRecord(
        silo=silo, round=round_ - 1, result={"num_examples": 40, "loss": 1.0312, "exact_match": 0.425}
    )
    record = SiloRoundResult(
        silo=silo,
        round=round_,
        update=update,
        evaluation=evaluation,
        run_id="0b6f7c1e-8f2d-4c55-9a51-3f0e7d2b9a11",
    )
    return redact(record, Release(), config)


def bench_round_checks(protection: str, rounds: int, seed: int = 0) -> list[RoundCosts]:
    """``rounds`` real rounds of 3 silos through the library's round code, every check on and timed.

    Each round does what the flows do, minus training (a random delta instead): secure aggregation's
    adverts and shares, each step answered with a signed record; each silo reads and checks the
    global it receives (the coordinator's signature; under CKKS the recomputed sum before it
    decrypts), packs its delta, signs it and writes its signed result record; the coordinator reads
    the records (size limit, signature, json + pydantic), screens the uploads (signatures), fixes
    the survivors and takes the unmask answers (secagg), aggregates, signs the next global and the
    round's manifest. Round 0 starts from a plaintext global (under CKKS no sum to check yet).
    """
    from silotune.federation import FederationState
    from silotune.protection import ObjectRef
    from silotune.protection.base import sign_object
    from silotune.store import FederationLayout, LocalStore, put_tensors

    out: list[RoundCosts] = []
    g = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        config = _bench_config(Path(tmp), protection)
        store = LocalStore(config.store.root)
        init = {
            k: torch.randn(s, generator=g) * 0.02 if "lora_A" in k else torch.zeros(s)
            for k, s in smollm2_lora_shapes().items()
        }
        key0 = FederationLayout(config.federation_id).global_adapter(0)
        global_ref = ObjectRef(key=key0, sha256=put_tensors(store, key0, init))
        sign_object(config, store, key0, store.get(key0), round_=0, purpose="global")
        state = FederationState(
            federation_id=config.federation_id, fingerprint=config.fingerprint(), global_ref=global_ref
        )
        for r in range(rounds):
            costs, state = _one_round(config, store, r, state, g)
            out.append(costs)
    return out


def _one_round(config: Any, store: Any, r: int, state: Any, g: torch.Generator) -> tuple[RoundCosts, Any]:
    from silotune.federation import SiloRoundResult, SiloStepResult, aggregate_round, commit_round
    from silotune.federation import close_upload as close_round_upload
    from silotune.protection import ObjectRef, SiloContext, exchanged_keys, run_silo_step, scheme_for
    from silotune.protection.ckks import CkksScheme
    from silotune.results import put_result, read_result
    from silotune.store import sha256

    scheme = scheme_for(config)
    timer = CheckTimer()
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    upload: dict[str, int] = defaultdict(int)
    exchanged = 0
    checked_sum = CkksScheme._checked_sum

    def clock(name: str, fn: Callable[..., Any], *args: Any, scope: str = "", **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            with timer.within(scope or timer.scope):
                return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - t
            calls[name] += 1

    def timed_sum(self: Any, ctx: Any, pointer: Any) -> bytes:
        return clock("ckks_check", checked_sum, self, ctx, pointer, scope="ckks_check")

    def step(silo: str, stage: str) -> tuple[str, str]:
        keys = clock(f"protocol {stage}", run_silo_step, config, silo, r, stage, store)["keys"]
        record = SiloStepResult(silo=silo, round=r, stage=stage, objects=keys)
        rkey = put_result(config, store, silo, r, stage, record)
        if silo == SILOS[0]:
            for k in [*keys, rkey]:
                upload["messages"] += len(store.get(k)) + len(store.get(k + ".sig"))
        return silo, stage

    def read(silo: str, stage: str, model: type) -> Any:
        return clock("read_result", read_result, config, store, silo, r, stage, model, scope="read_result")

    global_ref = state.global_ref
    CkksScheme._checked_sum = timed_sum  # type: ignore[method-assign]
    start = time.perf_counter()
    try:
        with timer.installed():
            steps = [step(s, stage) for stage in scheme.steps_before_upload for s in SILOS]
            for s in SILOS:
                ctx = SiloContext(config, s, r, store)
                current, _ = clock("silo reads the global", scheme.read_global, ctx, global_ref)
                delta = {
                    k: torch.randn(current[k].shape, generator=g) * DELTA_SCALE
                    for k in exchanged_keys(config, current)
                }
                payload = clock("silo packs", scheme.pack, ctx, delta)
                ukey = ctx.layout.update(r, s, scheme.extension)
                sig = ctx.vault.signing_key().sign(
                    payload, federation_id=config.federation_id, round=r, silo=s
                )
                store.put(ukey + ".sig", sig)
                store.put(ukey, payload)
                refs = (
                    ObjectRef(key=ukey, sha256=sha256(payload)),
                    ObjectRef(key=ukey + ".sig", sha256=sha256(sig)),
                )
                rkey = put_result(
                    config, store, s, r, "round", _round_record(config, s, r, *refs, len(payload))
                )
                if s == SILOS[0]:
                    exchanged = _numel(delta)
                    upload["update"], upload["update_sig"] = len(payload), len(sig)
                    upload["record"], upload["record_sig"] = (
                        len(store.get(rkey)),
                        len(store.get(rkey + ".sig")),
                    )
            records = [read(s, "round", SiloRoundResult).update for s in SILOS]
            if scheme.steps_after_upload:
                survivors = clock(
                    "coordinator closes the upload", close_round_upload, config, store, r, records
                )
                steps += [step(s, stage) for stage in scheme.steps_after_upload for s in survivors]
            for silo, stage in steps:
                read(silo, stage, SiloStepResult)
            agg = clock("coordinator aggregates", aggregate_round, config, store, r, global_ref, records)
            state = clock("coordinator commits", commit_round, config, store, state, r, records, [], agg)
    finally:
        CkksScheme._checked_sum = checked_sum  # type: ignore[method-assign]
    wall = time.perf_counter() - start
    for (scope, op, purpose), sec in timer.seconds.items():
        name = f"{scope}/{op} {purpose}" if scope else f"{op} {purpose}"
        seconds[name] += sec
        calls[name] += timer.calls[(scope, op, purpose)]
    return RoundCosts(dict(seconds), dict(calls), dict(upload), exchanged, wall), state


def full_delta_uploads(seed: int = 0) -> dict[str, int]:
    """Bytes of the 460,800-value delta as each scheme packs it (one silo of 3, weight 1/3)."""
    from silotune.crypto import ckks
    from silotune.crypto import secagg as sa
    from silotune.store import save_tensors

    g = torch.Generator().manual_seed(seed)
    delta = {k: torch.randn(s, generator=g) * DELTA_SCALE for k, s in smollm2_lora_shapes().items()}
    names = list(SILOS)
    clients = {n: sa.SecAggClient(n, round_id="bench/full", roster=names) for n in names}
    adverts = {n: c.advertise() for n, c in clients.items()}
    shares = {n: c.share_keys(adverts) for n, c in clients.items()}
    inbox = {s: shares[s][names[0]] for s in names[1:]}
    secret = ckks.create_secret_context(ckks.DEFAULT_PRESET)
    return {
        "values": _numel(delta),
        "none": len(save_tensors(delta, {"federation_id": "bench", "round": "0", "silo": names[0]})),
        "secagg": len(clients[names[0]].mask_update(delta, inbox, weight=1 / 3)),
        "ckks": len(ckks.encrypt_update(delta, secret, weight=1 / 3)),
    }


def bench_noise(repeats: int) -> tuple[float, float]:
    """Seconds to draw N(0, σ²) noise for the 460,800 values: keyed ChaCha20 vs torch's generator."""
    from silotune.privacy.noise import gaussian_noise, seed_key

    shapes = smollm2_lora_shapes()
    key, gen = seed_key(0), torch.Generator().manual_seed(0)
    keyed, plain = [], []
    for _ in range(repeats + 1):  # the first of each is a warm-up
        t = time.perf_counter()
        gaussian_noise(shapes, DELTA_SCALE, key)
        keyed.append(time.perf_counter() - t)
        t = time.perf_counter()
        {k: torch.randn(s, generator=gen) * DELTA_SCALE for k, s in shapes.items()}
        plain.append(time.perf_counter() - t)
    return statistics.median(keyed[1:]), statistics.median(plain[1:])


# What each timed entry is, in print order: (key, who, label). Entries marked "added" are the checks.
CHECKS: list[tuple[str, str]] = [
    ("sign update", "silo: sign its update"),
    ("sign result", "silo: sign its result records"),
    ("sign advert", "silo: sign its secagg advert"),
    ("sign share", "silo: sign its secagg shares"),
    ("sign unmask", "silo: sign its secagg unmask answer"),
    ("verify advert", "silo + coordinator: verify adverts"),
    ("verify share", "silo: verify the shares it receives"),
    ("verify unmask", "coordinator: verify unmask answers"),
    ("verify update", "coordinator: verify update signatures"),
    ("read_result", "coordinator: read result records (size limit, signature, json + pydantic)"),
    ("read_result/verify result", "  of which the signature"),
    ("sign global", "coordinator: sign the next global (CKKS: its pointer)"),
    ("sign survivors", "coordinator: sign the survivor set"),
    ("sign manifest", "coordinator: sign the round's manifest"),
    ("verify global", "silo: verify the coordinator's global"),
    ("verify survivors", "silo + coordinator: verify the survivor set"),
    ("ckks_check", "silo: recompute the CKKS aggregate before decrypting (_checked_sum)"),
    ("ckks_check/verify update", "  of which the listed uploads' signatures"),
]
CONTEXT: list[tuple[str, str]] = [
    ("silo packs", "silo: mask / encrypt / serialise its delta"),
    ("silo reads the global", "silo: read the global (CKKS: check the sum, decrypt)"),
    ("protocol secagg-advertise", "silo: secagg advertise step"),
    ("protocol secagg-share", "silo: secagg share step"),
    ("protocol secagg-unmask", "silo: secagg unmask step"),
    ("coordinator closes the upload", "coordinator: fix the survivors"),
    ("coordinator aggregates", "coordinator: screen and aggregate"),
]


def _added(costs: RoundCosts) -> float:
    """Seconds the checks add to a round: every signature and verification, the rest of reading a
    result record, and the CKKS recomputation (nested signature checks counted once)."""
    s = costs.seconds
    signs = sum(v for k, v in s.items() if k.split("/")[-1].split(" ")[0] in ("sign", "verify"))
    nested = sum(v for k, v in s.items() if "/" in k)
    return signs - nested + s.get("read_result", 0.0) + s.get("ckks_check", 0.0)


def _median_round(costs: list[RoundCosts]) -> tuple[dict[str, float], dict[str, int], float, float]:
    keys = sorted({k for c in costs for k in c.seconds})
    seconds = {k: statistics.median(c.seconds.get(k, 0.0) for c in costs) for k in keys}
    calls = {k: max(c.calls.get(k, 0) for c in costs) for k in keys}
    return (
        seconds,
        calls,
        statistics.median(_added(c) for c in costs),
        statistics.median(c.wall for c in costs),
    )


def signing_costs(rounds: int, repeats: int) -> None:
    shapes = smollm2_lora_shapes()
    values = sum(a * b for a, b in shapes.values())
    b_values = sum(a * b for k, (a, b) in shapes.items() if "lora_B" in k)
    print(
        f"  delta: random N(0, {DELTA_SCALE:g}^2) tensors shaped as SmolLM2-135M LoRA r={LORA_RANK} "
        f"on q_proj, v_proj ({len(shapes)} tensors, {values:,} float32 values, {values * 4:,} bytes); "
        "no model is loaded.\n"
        f"  Under secagg and ckks FFA-LoRA is always on: only LoRA B is exchanged ({b_values:,} values). "
        f"{len(SILOS)} silos, every key pinned, signing on; {rounds} measured rounds per scheme (median) "
        "after one warm-up round."
    )
    by_scheme = {p: bench_round_checks(p, rounds + 1)[1:] for p in ("none", "secagg", "ckks")}
    full = full_delta_uploads()

    print(
        f"\n  a) upload per silo per round vs the fp32 bytes of the same delta (target <= {TARGET_X_FP32}x)"
    )
    print(
        f"  {'scheme':<30} {'values':>8} {'fp32 bytes':>11} {'update':>11} {'+ sig':>6} {'+ record':>9} "
        f"{'+ sig':>6} {'total':>11} {'x fp32':>7}  target"
    )
    verdicts = []
    for name in ("none", "secagg", "ckks"):
        c = by_scheme[name][0]
        extra = c.upload["update_sig"] + c.upload["record"] + c.upload["record_sig"]
        rows = [
            (f"{name} (round, {'FFA B' if name != 'none' else 'A and B'})", c.exchanged, c.upload["update"])
        ]
        if name != "none":
            rows.insert(0, (f"{name} (460,800-value delta)", full["values"], full[name]))
        for label, n, upd in rows:
            total = upd + extra
            ratio = total / (4 * n)
            verdict = "-" if name == "none" else ("met" if ratio <= TARGET_X_FP32 else "MISSED")
            if name != "none":
                verdicts.append((label, ratio, verdict))
            print(
                f"  {label:<30} {n:>8,} {4 * n:>11,} {upd:>11,} {c.upload['update_sig']:>6} "
                f"{c.upload['record']:>9,} {c.upload['record_sig']:>6} {total:>11,} {ratio:>7.3f}  {verdict}"
            )
    sa_round = by_scheme["secagg"][0]
    msgs = sa_round.upload.get("messages", 0)
    sa_total = sa_round.upload["update"] + sa_round.upload["update_sig"] + sa_round.upload["record"]
    sa_total += sa_round.upload["record_sig"] + msgs
    print(
        f"  secagg also sends per silo per round: advert, {len(SILOS) - 1} encrypted shares and an unmask "
        f"answer, each signed, and 3 signed step records: {msgs:,} bytes; with them the FFA upload is "
        f"{sa_total / (4 * sa_round.exchanged):.3f}x fp32"
    )

    print(f"\n  b) seconds each check adds per round of {len(SILOS)} silos (calls per round in brackets)")
    print(f"  {'check':<76} {'none':>14} {'secagg':>14} {'ckks':>14}")
    medians = {p: _median_round(by_scheme[p]) for p in by_scheme}

    def row(key: str, label: str) -> None:
        cells = []
        for p in ("none", "secagg", "ckks"):
            sec, calls, _, _ = medians[p]
            cells.append(f"{sec[key]:.4f} ({calls[key]:>2})" if key in sec else "-")
        if any(c != "-" for c in cells):
            print(f"  {label:<76} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}")

    for key, label in CHECKS:
        row(key, label)
    added = [medians[p][2] for p in ("none", "secagg", "ckks")]
    print(f"  {'added by the checks, per round':<76} " + " ".join(f"{a:>14.4f}" for a in added))
    print("  for scale, the round's own work in this bench (no training):")
    for key, label in CONTEXT:
        row(key, label)
    walls = [medians[p][3] for p in ("none", "secagg", "ckks")]
    print(
        f"  {'round wall time in this bench (silos in sequence)':<76} "
        + " ".join(f"{w:>14.4f}" for w in walls)
    )
    print(
        f"  {'checks / round wall time':<76} "
        + " ".join(f"{a / w:>14.1%}" for a, w in zip(added, walls, strict=True))
    )
    keyed, plain = bench_noise(repeats)
    print(
        f"\n  noise for the {values:,} values (one DP-SGD step's draw; client DP draws once per round): "
        f"keyed ChaCha20 gaussian_noise {keyed:.4f} s vs torch.randn with a torch.Generator {plain:.4f} s: "
        f"{keyed / plain:.2f}x, +{keyed - plain:.4f} s per draw"
    )
    print(
        "\n  upload target (<= 1.1x fp32, signature and signed result record included): "
        + "; ".join(f"{label} {ratio:.3f}x {verdict}" for label, ratio, verdict in verdicts)
    )


def crypto_costs(silos: int, repeats: int) -> str:
    """Section 2; returns its summary sentence."""
    cb = _crypto_module()
    g = torch.Generator().manual_seed(0)
    deltas = [
        {
            "v.lora_B": torch.randn(cb.NUMEL // 2, generator=g) * cb.SCALE,
            "q.lora_A": torch.randn(cb.NUMEL // 2, generator=g) * cb.SCALE,
        }
        for _ in range(silos)
    ]
    weights = [1.0 / silos] * silos
    ref = {k: sum(w * d[k].double() for d, w in zip(deltas, weights, strict=True)) for k in deltas[0]}
    fp32 = cb.NUMEL * 4
    default = cb.bench_ckks("TenSEAL default CKKS", "tenseal-default", deltas, weights, ref, repeats)
    packed = cb.bench_ckks(
        "silotune CKKS packed-n4096", cb.ckks.DEFAULT_PRESET, deltas, weights, ref, repeats
    )
    masked = cb.bench_secagg(deltas, weights, ref, repeats)
    print(
        f"  {'scheme':<34} {'bytes':>11} {'x fp32':>7} {'enc s':>7} {'speed vs default':>17} {'max err':>9}"
    )
    for row in (default, packed, masked):
        print(
            f"  {row.name:<34} {row.bytes_per_update:>11,} {row.bytes_per_update / fp32:>7.2f} "
            f"{row.encrypt_s:>7.3f} {default.encrypt_s / row.encrypt_s:>16.1f}x {row.max_abs_err:>9.1e}"
        )
    return (
        f"packed CKKS is {packed.bytes_per_update / fp32:.2f}x fp32 bytes "
        f"(default {default.bytes_per_update / fp32:.2f}x) and encrypts "
        f"{default.encrypt_s / packed.encrypt_s:.1f}x faster than the default; "
        f"masking is {masked.bytes_per_update / fp32:.3f}x fp32 bytes"
    )


PARTS = ("dp", "crypto", "signing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per scheme in section 3")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, model {args.model}")
    start = time.perf_counter()
    summary = []

    if "dp" in parts:
        print("\n1. DP-SGD vs non-private local training (tokens/s, median of repeats)")
        rates = dp_step_costs(args.model, args.steps, args.repeats)
        base = rates[0][1]
        for name, r in rates:
            print(f"  {name:<24} {r:8.1f} tok/s   cost ratio vs non-private: {base / r:5.2f}x")
        summary.append(
            f"DP-SGD costs {base / rates[1][1]:.2f}x (hooks) / {base / rates[2][1]:.2f}x (ew) a "
            "non-private step per token"
        )

    if "crypto" in parts:
        print("\n2. Encryption / masking per update (460,800 fp32 values)")
        summary.append(crypto_costs(args.silos, args.repeats))

    if "signing" in parts:
        print("\n3. Signing and verification per update and per round, against the plain fp32 delta")
        signing_costs(args.rounds, args.repeats)

    if summary:
        print("\nsummary: " + "; ".join(summary))
    print(f"\nbench time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
