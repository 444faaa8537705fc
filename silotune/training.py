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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from opacus.grad_sample import utils as grad_sample_utils  # module attribute: tests wrap prepare_module
from tqdm.auto import tqdm

from silotune.adapters import AdapterModel, TensorDict, delta, global_norm, tensor_bytes
from silotune.aggregation.scaffold import attach_correction, parameters_by_key
from silotune.compute import Placement, apply_threads, autocast
from silotune.config import TrainSpec
from silotune.data import IGNORE_INDEX, Example, batches, collate, per_sequence_loss
from silotune.distributed import train_distributed
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


# Model families whose logits are exactly ``lm_head(final hidden state)``: no logit scaling or
# soft-capping after the head, so the response-only lever computes the same loss as the plain path.
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe"})


def pack(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """One row holding every example back to back, no padding (the packing lever).

    Position ids restart at 0 for each example; transformers then builds a block-diagonal
    causal mask from them (``find_packed_sequence_indices``), so no token attends across
    examples. Labels are shifted per example before concatenation, so no token predicts the
    next example's first token; ``segments`` names each token's example.
    """
    ids: list[int] = []
    shift: list[int] = []
    pos: list[int] = []
    seg: list[int] = []
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids += e.input_ids
        shift += [*e.labels[1:], IGNORE_INDEX]
        pos += range(n)
        seg += [i] * n
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([pos]),
        "shift_labels": torch.tensor([shift]),
        "segments": torch.tensor([seg]),
        "num_examples": torch.tensor(len(batch)),
        # real tokens, for throughput (a packed row has no padding)
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }


def padded(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """The padded batch with shifted labels and per-token example ids, for :class:`SequenceLoss`."""
    out = collate(batch, pad_id)
    labels = out.pop("labels")
    out["shift_labels"] = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    out["segments"] = torch.arange(labels.size(0)).unsqueeze(1).expand_as(labels)
    out["num_examples"] = torch.tensor(labels.size(0))
    return out


def response_head_refusal(model: torch.nn.Module) -> str | None:
    """Why the LM head of ``model`` cannot run on the answer positions alone (None: it can).

    It can where the logits are ``head(decoder(...))`` and nothing else (:data:`PLAIN_HEAD_MODELS`: no
    soft-capping or scaling), and not under prompt tuning (its virtual tokens shift the positions)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(getattr(base, "config", None), "model_type", "?")
    if kind not in PLAIN_HEAD_MODELS:
        return (
            f"model type {kind!r} is not one whose logits are lm_head(hidden) alone; "
            f"supported: {', '.join(sorted(PLAIN_HEAD_MODELS))}"
        )
    peft_config = getattr(model, "peft_config", None)
    if peft_config and any(c.is_prompt_learning for c in peft_config.values()):
        return "does not apply to prompt tuning"
    return None


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def response_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, LM head) of ``model`` when the head can run on the answer positions alone
    (:func:`response_head_refusal`), else None."""
    return None if response_head_refusal(model) is not None else _decoder_and_head(model)


class SequenceLoss(torch.nn.Module):
    """Per-example mean response-token loss [B] of ``model``, with the CPU speed levers.

    ``response_only``: run the decoder, keep only the hidden states at positions that carry a
    label, and apply the LM head to those rows; the head is ~1/5 of SmolLM2-135M's FLOPs and
    most positions of a chat example are prompt tokens. Without it the head runs everywhere
    (what ``model(...)`` does). A module (not a function), so DDP can wrap it.
    """

    def __init__(self, model: torch.nn.Module, *, response_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.response_only = response_only
        if response_only:
            refusal = response_head_refusal(model)
            if refusal is not None:
                raise ConfigError(f"train.response_logits_only: {refusal}")
            self.decoder, self.head = _decoder_and_head(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        shift_labels: torch.Tensor,
        segments: torch.Tensor,
        num_examples: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mask = shift_labels != IGNORE_INDEX
        kwargs = (
            {"attention_mask": attention_mask} if position_ids is None else {"position_ids": position_ids}
        )
        if self.response_only:
            hidden = self.decoder(input_ids=input_ids, **kwargs).last_hidden_state
            logits = self.head(hidden[mask])
        else:
            logits = self.model(input_ids=input_ids, **kwargs).logits[mask]
        tok = torch.nn.functional.cross_entropy(logits.float(), shift_labels[mask], reduction="none")
        n = int(num_examples)
        seg = segments[mask]
        sums = torch.zeros(n, device=tok.device, dtype=tok.dtype).index_add(0, seg, tok)
        counts = torch.zeros(n, device=tok.device, dtype=tok.dtype).index_add(0, seg, torch.ones_like(tok))
        return sums / counts.clamp_min(1)


def lever_batch(examples: Sequence[Example], pad_id: int, spec: TrainSpec) -> dict[str, torch.Tensor]:
    """The batch the levered step takes: packed (``train.packing``) or padded with shifted labels."""
    return pack(examples, pad_id) if spec.packing else padded(examples, pad_id)


def uses_levers(spec: TrainSpec) -> bool:
    return spec.packing or spec.response_logits_only


def train_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    max_grad_norm: float | None,
    *,
    placement: Placement | None = None,
    loss_fn: torch.nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    loss_scale: float = 1.0,
    clip: Callable[[list[torch.nn.Parameter], float], Any] | None = None,
) -> float:
    """One optimizer step on the mean per-sequence loss; returns that loss.

    ``batch`` is on the model's device. ``loss_fn`` (a :class:`SequenceLoss`, maybe DDP-wrapped)
    takes a :func:`lever_batch`; without it the plain path runs ``model(...)`` on a padded batch.
    ``loss_scale`` multiplies the loss that is back-propagated (a data-parallel rank's share of
    the global batch), not the loss returned. ``scaler``: fp16's loss scaling.
    """
    with autocast(placement):
        if loss_fn is not None:
            seq_loss = loss_fn(**batch)
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            seq_loss, _, _ = per_sequence_loss(out.logits, batch["labels"], with_exact=False)
    loss = seq_loss.mean()
    optimizer.zero_grad(set_to_none=True)
    scaled = loss * loss_scale if loss_scale != 1.0 else loss
    if scaler is not None:
        scaler.scale(scaled).backward()
        scaler.unscale_(optimizer)
    else:
        scaled.backward()
    if max_grad_norm is not None:
        (clip or torch.nn.utils.clip_grad_norm_)(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
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
    parallel: Any | None = None,
    control: Mapping[str, torch.Tensor] | None = None,
) -> tuple[TensorDict, TrainResult]:
    """Train the adapter from ``global_state`` on ``examples``; return (delta, report).

    ``frozen``: adapter tensors kept fixed (FFA-LoRA freezes every LoRA A). ``exchanged``:
    the tensors whose delta is returned (default: all). ``dp``: run DP-SGD instead.
    ``objective`` (:func:`silotune.methods.objectives.build_objective`) replaces the SFT batch
    and step, e.g. DPO on preference pairs; None is SFT. With ``spec.processes > 1`` the round
    runs in that many processes (:mod:`silotune.distributed`); ``parallel`` is set inside them.
    The model computes on ``adapter.placement`` (device, precision, threads). ``control``: SCAFFOLD's
    ``c - c_i`` per exchanged tensor; after every optimizer step the tensor moves by ``-lr * (c - c_i)``
    (:mod:`silotune.aggregation.scaffold`).
    """
    if control is not None and (spec.processes > 1 or parallel is not None):
        raise ConfigError(f"{desc}: SCAFFOLD's corrected steps run in one process; set train.processes: 1")
    if dp is not None and objective is not None:
        raise ConfigError(
            f"{desc}: DP-SGD with objective {type(objective).__name__} is not supported: its per-example "
            "clipping treats each row as a privacy unit, but a preference pair is two rows; use client-level "
            "DP (privacy.client_dp), which protects the whole update"
        )
    if spec.processes > 1 and parallel is None:
        # One silo, several processes: torchrun runs this function in each; rank 0's delta comes back.
        d, report = train_distributed(
            adapter,
            global_state,
            examples,
            spec,
            seed=seed,
            dp=dp,
            frozen=frozen,
            exchanged=exchanged,
            objective=objective,
        )
        return d, TrainResult(**report)
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    else:
        apply_threads(adapter.placement)
    if dp is not None and adapter.placement.precision == "fp16":
        raise ConfigError(
            f"{desc}: DP-SGD with train.precision fp16 is not supported (its loss scaling would scale the "
            "per-example gradients Opacus clips); use bf16 or fp32"
        )
    if dp is not None and uses_levers(spec):
        raise ConfigError(
            f"{desc}: train.packing/train.response_logits_only do not apply to DP-SGD: Opacus needs one "
            "row per example and the model's own forward"
        )
    adapter.load_state(global_state)
    model = adapter.model
    with adapter.frozen(frozen):
        params = [p for p in model.parameters() if p.requires_grad]
        proximal = attach_proximal_term(params, spec.proximal_mu)  # FedProx; None when mu == 0
        corrected = None
        if control is not None:  # SCAFFOLD: (parameters, c - c_i) that every optimizer step corrects
            keys = sorted(control)
            corrected = (parameters_by_key(model, keys), [control[k] for k in keys])
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
                parallel=parallel,
                corrected=corrected,
            )
        else:
            losses, tokens = _dp_sgd_loop(
                adapter,
                examples,
                spec,
                params,
                dp,
                seed=seed,
                desc=desc,
                progress=progress,
                corrected=corrected,
            )
        seconds = time.perf_counter() - start
        detach_proximal_term(proximal)
        model.eval()
    d = delta(adapter.state(), global_state)  # FSDP: every rank gathers the full weights here
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
    parallel: Any | None = None,
    corrected: tuple[list[torch.nn.Parameter], list[torch.Tensor]] | None = None,
) -> tuple[list[float], int]:
    model = adapter.model
    placement = adapter.placement
    loss_fn: torch.nn.Module | None = None
    clip = None
    if objective is None and (uses_levers(spec) or parallel is not None):
        loss_fn = SequenceLoss(model, response_only=spec.response_logits_only)
        if parallel is not None:  # wrapped before the optimizer exists: FSDP re-homes the parameters
            loss_fn = parallel.wrap(loss_fn)
            params, clip = parallel.trainable(params), parallel.clip
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    if corrected is not None:  # dropped with the optimizer at the end of the round
        attach_correction(optimizer, *corrected, spec.learning_rate)
    # fp16 overflows without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler("cuda") if placement.precision == "fp16" else None
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout, if configured
    pad_id = adapter.tokenizer.pad_token_id
    losses: list[float] = []
    tokens = 0
    bar = tqdm(total=spec.local_steps, desc=desc, unit="step", disable=not progress, leave=False)
    # Every rank draws the same global batches (same seed) and trains on its own slice of each.
    for batch_examples in batches(examples, spec.batch_size, steps=spec.local_steps, generator=gen):
        if objective is None:
            mine = parallel.shard(batch_examples) if parallel is not None else batch_examples
            batch = lever_batch(mine, pad_id, spec) if loss_fn is not None else collate(mine, pad_id)
            tokens += int(batch["attention_mask"].sum())
            scale = parallel.loss_scale(len(mine), len(batch_examples)) if parallel is not None else 1.0
            loss = train_step(
                model,
                adapter.to_device(batch),
                optimizer,
                params,
                spec.max_grad_norm,
                placement=placement,
                loss_fn=loss_fn,
                scaler=scaler,
                loss_scale=scale,
                clip=clip,
            )
            if parallel is not None:
                loss = parallel.global_mean(loss, len(mine), len(batch_examples))
            losses.append(loss)
        else:
            batch = objective.collate(batch_examples, pad_id)
            tokens += int(batch["attention_mask"].sum())
            losses.append(
                objective.step(adapter, adapter.to_device(batch), optimizer, params, spec.max_grad_norm)
            )
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update(1)
    bar.close()
    if parallel is not None:
        tokens = parallel.total(tokens)
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
    corrected: tuple[list[torch.nn.Parameter], list[torch.Tensor]] | None = None,
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
        if corrected is not None:  # on the inner optimizer: the DP wrapper steps it once per step
            attach_correction(base, *corrected, spec.learning_rate)
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
                batch = adapter.to_device(collate(batch_examples, pad_id))
                tokens += int(batch["attention_mask"].sum())
                with autocast(adapter.placement):
                    # ew mode needs input_ids positional
                    out = gsm(batch["input_ids"], attention_mask=batch["attention_mask"])
                    seq_loss, _, _ = per_sequence_loss(out.logits, batch["labels"], with_exact=False)
                loss = seq_loss.mean()
                loss.backward()
                losses.append(float(loss.detach()))
            else:
                # An empty Poisson batch is still a step: the noise alone is released.
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
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
