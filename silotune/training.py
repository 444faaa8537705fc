"""The local post-training recipe a silo runs each round (SFT by default, any method), optionally DP-SGD.

Reads top to bottom: seed, fresh optimizer, ``local_steps`` AdamW steps on
per-sequence losses, then the delta against the global adapter it started from.
The optimizer state is not carried across rounds: every round starts from the
broadcast global, as in FedAvg.

With :class:`DPSGD` the same loop runs DP-SGD (Abadi et al., CCS 2016) through
Opacus: each step Poisson-samples the batch (each example independently with
probability ``sample_rate``), Opacus computes per-example gradients of the
per-sequence loss, clips each to ``max_grad_norm`` and adds Gaussian noise
``noise_multiplier * max_grad_norm`` to their sum. Sampling and noise both draw
from ChaCha20 under :attr:`DPSGD.noise_key` (:mod:`silotune.privacy.noise`), a key
the silo derives from its secret and the round's inputs: a retried round releases
the same update, a round re-run on other inputs draws independent noise, and nobody
without the secret can predict either. No torch generator is involved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from opacus.grad_sample import utils as grad_sample_utils  # module attribute: tests wrap prepare_module
from tqdm.auto import tqdm

from silotune.adapters import AdapterModel, TensorDict, delta, global_norm, tensor_bytes
from silotune.config import TrainSpec
from silotune.data import Example, batches, collate, per_sequence_loss
from silotune.errors import ConfigError
from silotune.fedprox import attach_proximal_term, detach_proximal_term
from silotune.privacy.noise import KEY_BYTES, KeyedNoiseDPOptimizer, seed_key, subkey, uniform


@dataclass(frozen=True)
class TrainResult:
    """What a silo reports about its local training (small, serialisable)."""

    num_examples: int
    steps: int
    tokens: int
    first_loss: float
    final_loss: float
    mean_loss: float
    seconds: float
    tokens_per_second: float
    update_norm: float
    update_bytes: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings for one silo's local round (already resolved: σ is a number).

    Set exactly one of ``noise_key`` (32 bytes from
    :func:`silotune.privacy.noise.derive_noise_key`: what a silo uses) or
    ``noise_seed`` (an integer; tests and benches only, the key then has the
    seed's entropy and anyone who knows the seed can reproduce the noise).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    noise_seed: int | None = None
    grad_sample_mode: str = "hooks"
    noise_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if (self.noise_key is None) == (self.noise_seed is None):
            problems.append("set exactly one of noise_key and noise_seed")
        if self.noise_key is not None and (
            not isinstance(self.noise_key, bytes) or len(self.noise_key) != KEY_BYTES
        ):
            problems.append(f"noise_key must be {KEY_BYTES} bytes")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            problems.append(f"noise_multiplier={self.noise_multiplier!r} must be > 0")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            problems.append(f"max_grad_norm={self.max_grad_norm!r} must be > 0")
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate={self.sample_rate!r} must be in (0, 1]")
        if problems:
            raise ValueError("DPSGD: " + "; ".join(problems))

    @property
    def key(self) -> bytes:
        """The ChaCha20 key all of this round's sampling and noise derive from."""
        if self.noise_key is not None:
            return self.noise_key
        assert self.noise_seed is not None
        return seed_key(self.noise_seed)


def poisson_batches(
    examples: Sequence[Example],
    sample_rate: float,
    *,
    steps: int,
    generator: torch.Generator | None = None,
    key: bytes | None = None,
) -> Iterator[list[Example]]:
    """``steps`` Poisson-sampled batches: each example joins each batch with prob. ``sample_rate``.

    The batch size varies (it may be 0); this is the sampling the privacy accountant assumes.
    Pass exactly one source of randomness: ``key`` (ChaCha20, step ``i`` under
    ``subkey(key, "poisson/i")``; what DP-SGD uses) or a torch ``generator``.
    """
    if (generator is None) == (key is None):
        raise ValueError("poisson_batches: pass exactly one of generator and key")
    for i in range(steps):
        if key is not None:
            u = uniform(subkey(key, f"poisson/{i}"), len(examples))
        else:
            u = torch.rand(len(examples), generator=generator)
        picked = u < sample_rate
        yield [examples[j] for j in picked.nonzero().flatten().tolist()]


def silo_seed(seed: int, round_: int, silo_index: int) -> int:
    """A distinct, reproducible seed per (federation seed, round, silo)."""
    return (seed * 1_000_003 + round_ * 10_007 + silo_index) % (2**31 - 1)


def train_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    max_grad_norm: float | None,
) -> float:
    """One optimizer step on the mean per-sequence loss; returns that loss."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    seq_loss, _, _ = per_sequence_loss(out.logits, batch["labels"], with_exact=False)
    loss = seq_loss.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def train_local(
    adapter: AdapterModel,
    global_state: TensorDict,
    examples: Sequence[Example],
    spec: TrainSpec,
    *,
    seed: int,
    desc: str = "local training",
    progress: bool = True,
    dp: DPSGD | None = None,
    frozen: Sequence[str] = (),
    exchanged: Sequence[str] | None = None,
    objective: Any | None = None,
) -> tuple[TensorDict, TrainResult]:
    """Train the adapter from ``global_state`` on ``examples``; return (delta, report).

    ``frozen``: adapter tensors kept fixed (FFA-LoRA freezes every LoRA A). ``exchanged``:
    the tensors whose delta is returned (default: all). ``dp``: run DP-SGD instead.
    ``objective`` (:func:`silotune.methods.objectives.build_objective`) replaces the SFT batch
    and step, e.g. DPO on preference pairs; None is SFT.
    """
    if dp is not None and objective is not None:
        raise ConfigError(
            f"{desc}: DP-SGD with objective {type(objective).__name__} is not supported: its per-example "
            "clipping treats each row as a privacy unit, but a preference pair is two rows; use client-level "
            "DP (privacy.client_dp), which protects the whole update"
        )
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    adapter.load_state(global_state)
    model = adapter.model
    with adapter.frozen(frozen):
        params = [p for p in model.parameters() if p.requires_grad]
        proximal = attach_proximal_term(params, spec.proximal_mu)  # FedProx; None when mu == 0
        model.train()
        start = time.perf_counter()
        if dp is None:
            losses, tokens = _sgd_loop(
                adapter,
                examples,
                spec,
                params,
                seed=seed,
                desc=desc,
                progress=progress,
                objective=objective,
            )
        else:
            losses, tokens = _dp_sgd_loop(
                adapter, examples, spec, params, dp, seed=seed, desc=desc, progress=progress
            )
        seconds = time.perf_counter() - start
        detach_proximal_term(proximal)
        model.eval()
    d = delta(adapter.state(), global_state)
    if exchanged is not None:
        d = {k: d[k] for k in exchanged}
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"{desc}: training loss became non-finite ({losses[-1]})")
    seen = losses or [float("nan")]  # DP-SGD: every Poisson batch may have come out empty
    result = TrainResult(
        num_examples=len(examples),
        steps=spec.local_steps,
        tokens=tokens,
        first_loss=seen[0],
        final_loss=seen[-1],
        mean_loss=sum(seen) / len(seen),
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else float("nan"),
        update_norm=global_norm(d),
        update_bytes=tensor_bytes(d),
    )
    return d, result


def _sgd_loop(
    adapter: AdapterModel,
    examples: Sequence[Example],
    spec: TrainSpec,
    params: list[torch.nn.Parameter],
    *,
    seed: int,
    desc: str,
    progress: bool,
    objective: Any | None = None,
) -> tuple[list[float], int]:
    model = adapter.model
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout, if configured
    pad_id = adapter.tokenizer.pad_token_id
    losses: list[float] = []
    tokens = 0
    bar = tqdm(total=spec.local_steps, desc=desc, unit="step", disable=not progress, leave=False)
    for batch_examples in batches(examples, spec.batch_size, steps=spec.local_steps, generator=gen):
        if objective is None:
            batch = collate(batch_examples, pad_id)
            tokens += int(batch["attention_mask"].sum())
            losses.append(train_step(model, batch, optimizer, params, spec.max_grad_norm))
        else:
            batch = objective.collate(batch_examples, pad_id)
            tokens += int(batch["attention_mask"].sum())
            losses.append(objective.step(adapter, batch, optimizer, params, spec.max_grad_norm))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update(1)
    bar.close()
    return losses, tokens


def _dp_sgd_loop(
    adapter: AdapterModel,
    examples: Sequence[Example],
    spec: TrainSpec,
    params: list[torch.nn.Parameter],
    dp: DPSGD,
    *,
    seed: int,
    desc: str,
    progress: bool,
) -> tuple[list[float], int]:
    """DP-SGD through Opacus; the model is unwrapped again before returning (it is reused)."""
    model = adapter.model
    # Opacus needs train mode before wrapping. The wrapper must see the very parameter
    # objects the optimizer steps: wrapping, then moving or re-creating the model, leaves
    # the optimizer on stale tensors and silently trains nothing (checked below and in tests).
    gsm = grad_sample_utils.prepare_module(
        model, dp.grad_sample_mode, batch_first=True, loss_reduction="mean"
    )
    try:
        wrapped = [p for p in gsm.parameters() if p.requires_grad]
        if len(wrapped) != len(params) or any(a is not b for a, b in zip(wrapped, params, strict=True)):
            raise RuntimeError("DP-SGD: the wrapped model's trainable parameters are not the optimizer's")
        base = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
        expected = max(1, round(dp.sample_rate * len(examples)))
        optimizer = KeyedNoiseDPOptimizer(
            base,
            noise_key=subkey(dp.key, "dp-sgd/noise"),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=expected,
            loss_reduction="mean",
        )
        torch.manual_seed(seed)  # dropout, if configured
        pad_id = adapter.tokenizer.pad_token_id
        losses: list[float] = []
        tokens = 0
        bar = tqdm(
            total=spec.local_steps, desc=f"{desc} (DP-SGD)", unit="step", disable=not progress, leave=False
        )
        for batch_examples in poisson_batches(
            examples, dp.sample_rate, steps=spec.local_steps, key=subkey(dp.key, "dp-sgd/poisson")
        ):
            optimizer.zero_grad(set_to_none=True)
            if batch_examples:
                batch = collate(batch_examples, pad_id)
                tokens += int(batch["attention_mask"].sum())
                # ew mode needs input_ids positional
                out = gsm(batch["input_ids"], attention_mask=batch["attention_mask"])
                seq_loss, _, _ = per_sequence_loss(out.logits, batch["labels"], with_exact=False)
                loss = seq_loss.mean()
                loss.backward()
                losses.append(float(loss.detach()))
            else:
                # An empty Poisson batch is still a step: the noise alone is released.
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            optimizer.step()
            bar.set_postfix(loss=f"{losses[-1]:.3f}" if losses else "-", batch=len(batch_examples))
            bar.update(1)
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    finally:
        gsm.to_standard_module()
    for p in params:
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
    return losses, tokens
