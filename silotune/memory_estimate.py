"""Peak training memory of a post-training method, estimated from the model's shape.

Pure Python on purpose (the standard library only): the estimator is arithmetic
over a :class:`ModelShape` and a method's :class:`Footprint`, and knows no method
by name. Each registered method (:mod:`silotune.methods`) declares its own
footprint from its options: what it trains, what autograd keeps for it, whether
its base is quantised. :mod:`silotune.silo_memory` turns a federation config into
a footprint per silo; ``plan`` uses the same path to pick a method per silo.

The estimate is the sum of what is alive at the peak of a training step:

``weights``
    every parameter at its storage precision; a quantised base's linear layers at
    ``bits``/8 bytes per parameter plus their quantisation constants (4-bit:
    one fp32 absmax per 64-value block, 0.5 bit/param; with double quantisation
    an 8-bit absmax per block plus an fp32 constant per 256 blocks, ~0.127
    bit/param; 8-bit LLM.int8: one fp32 scale per output row). Embeddings,
    norms and an untied LM head stay unquantised (``other_bytes``).
``gradients`` and ``optimizer``
    one gradient and two AdamW moments per *trainable* parameter, at the
    trainable parameters' precision (``adapter_bytes``; PEFT keeps adapters in
    fp32 even on a 16-bit base), or at the weights' precision for a method that
    trains the base's own weights.
``activations``
    what autograd saves for the backward pass, per decoder layer of a Llama
    (RMSNorm, SDPA attention, SwiGLU MLP), counted tensor by tensor in units of
    batch × sequence tokens by each method (its ``Footprint.activations_per_token``;
    the methods' docstrings give the count and why), plus, with
    ``attention="eager"``, the softmax matrix (heads × s² per sequence). With
    gradient checkpointing only each layer's input (h) is kept, plus one layer's
    activations during its recomputation.
``logits``
    the LM head output, the fp32 log-softmax kept by the loss, and the
    gradient of the logits (batch × sequence × vocabulary each): the largest
    single term for small models with large vocabularies such as SmolLM2.
``reference``
    DPO: a method whose reference policy is a frozen copy of the base (full
    fine-tuning) keeps that copy; PEFT methods disable their adapter instead
    (free). A DPO batch is twice the rows (chosen and rejected).

The sum is an upper bound of the true peak (gradients of early layers are
allocated as late activations are freed); ``bench/memory.py`` and
``bench/gpu_qlora_memory.py`` compare it with measurements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that memory depends on."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_embeddings: bool = False
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.hd

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every linear layer in one decoder layer."""
        h, i, q = self.hidden_size, self.intermediate_size, self.num_heads * self.hd
        return {
            "q_proj": (h, q),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        return self.num_layers * sum(a * b for a, b in self.linears().values())

    def other_params(self) -> int:
        """Embeddings, LM head (if untied) and RMSNorm weights: never quantised."""
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else emb
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return emb + head + norms

    def num_params(self) -> int:
        return self.linear_params() + self.other_params()

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "model") -> ModelShape:
        """From a Hugging Face ``config.json`` mapping (Llama, Mistral, Qwen2 and similar)."""
        return cls(
            name=name,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim"),
        )

    def hf_config(self) -> dict[str, Any]:
        """A ``LlamaConfig`` keyword mapping of this shape (for building a random model of it)."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "tie_word_embeddings": self.tie_embeddings,
            "head_dim": self.hd,
        }


SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("smollm2-135m", 49152, 576, 1536, 30, 9, 3, tie_embeddings=True),
        ModelShape("smollm2-360m", 49152, 960, 2560, 32, 15, 5, tie_embeddings=True),
        ModelShape("llama-1b", 32000, 2048, 5632, 22, 32, 4),  # TinyLlama-1.1B dimensions
        ModelShape("llama-3.2-1b", 128256, 2048, 8192, 16, 32, 8, tie_embeddings=True),
        ModelShape("llama-2-7b", 32000, 4096, 11008, 32, 32, 32),
        ModelShape("llama-3.1-8b", 128256, 4096, 14336, 32, 32, 8),
        ModelShape("llama-2-13b", 32000, 5120, 13824, 40, 40, 40),
        ModelShape("llama-65b", 32000, 8192, 22016, 80, 64, 64),
    )
}
# Built-in model and descriptor names (silotune.openness) mapped to the preset of their shape.
MODEL_SHAPES = {
    "smollm2-135m-instruct": "smollm2-135m",
    "tinyllama-1.1b": "llama-1b",
    "mistral-7b": "llama-2-7b",  # 7.24B with GQA; Llama-2-7B's dimensions are within a few % of its memory
}


def shape_for_params(params_b: float) -> ModelShape:
    """The preset whose parameter count is closest to ``params_b`` billion (for planning by size)."""
    return min(SHAPES.values(), key=lambda s: abs(s.num_params() / 1e9 - params_b))


@dataclass(frozen=True)
class MemoryEstimate:
    method: str
    model: str
    batch: int
    seq: int
    params: int
    trainable_params: int
    weights: int
    quant_constants: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    reference: int

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.quant_constants
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.reference
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def summary(self) -> str:
        parts = ", ".join(
            f"{k} {v / MIB:.0f} MiB"
            for k, v in (
                ("weights", self.weights + self.quant_constants),
                ("grads+optimizer", self.gradients + self.optimizer),
                ("activations", self.activations),
                ("logits", self.logits),
                ("reference", self.reference),
            )
            if v
        )
        return f"{self.total / GIB:.2f} GiB ({parts})"


def quantised_bytes(shape: ModelShape, bits: int, double_quant: bool) -> tuple[int, int]:
    """(packed weight bytes, constant bytes) of the quantised linear layers."""
    n = shape.linear_params()
    if bits == 4:
        blocks = n / 64
        consts = blocks * 1 + blocks / 256 * 4 if double_quant else blocks * 4
        return int(n / 2), int(consts)
    if bits == 8:
        rows = shape.num_layers * sum(out for _, out in shape.linears().values())
        return n, rows * 4
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def check_targets(shape: ModelShape, targets: Sequence[str]) -> None:
    """Refuse target modules that a Llama decoder layer does not have."""
    lin = shape.linears()
    bad = [t for t in targets if t not in lin]
    if bad:
        raise ValueError(f"unknown target modules {bad}; a Llama layer has {sorted(lin)}")


@dataclass(frozen=True)
class Footprint:
    """What one method, with its options, puts in memory on one model shape.

    Declared by each method (``Method.footprint``); the estimator only sums it.
    """

    method: str
    trainable_params: int
    # Elements autograd keeps per token and decoder layer (compute dtype).
    activations_per_token: int
    # Storage of unquantised base weights (4 fp32 on CPU, 2 bf16 on GPU).
    weight_bytes: int = 4
    # Embeddings, norms and LM head of a quantised base (PEFT's prepare_model_for_kbit_training: fp32).
    other_bytes: int = 4
    # Activation dtype.
    compute_bytes: int = 4
    # Input features per layer that PEFT casts to the adapter's dtype before the adapter (kept when the
    # compute dtype differs from the adapter's).
    adapter_input_features: int = 0
    # Tokens the method prepends to every sequence (soft prompts).
    virtual_tokens: int = 0
    # Bits of a quantised base's linear layers (None: unquantised). A quantised base's LM head
    # computes at ``other_bytes``.
    quantised_bits: int | None = None
    double_quant: bool = True
    # The trainable parameters are the base's own weights: no separate adapter, gradients and
    # moments at the weights' precision, and the mixed-precision recipe applies.
    trains_base: bool = False
    # Per-token elements of h the final norm keeps (1: its input; 3 when its weight trains).
    final_norm_outputs: int = 1
    # DPO's reference policy is a frozen copy of the base (not the base with the adapter disabled).
    reference_copy: bool = False


def estimate(
    shape: ModelShape,
    footprint: Footprint,
    *,
    batch: int,
    seq: int,
    adapter_bytes: int = 4,
    optimizer_states: int = 2,
    mixed_precision: bool = False,
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    objective: str = "sft",
) -> MemoryEstimate:
    """Estimated peak memory (bytes) of one training step; see the module docstring for the model.

    ``adapter_bytes``: trainable parameters, their gradients and AdamW moments (4: fp32).
    ``optimizer_states``: 2 for Adam/AdamW, 0 for SGD. ``mixed_precision``: a method that trains
    the base's weights, on a 16-bit model with fp32 master weights and fp32 moments (the usual
    recipe: 2 + 2 + 4 + 8 = 16 bytes per parameter).
    """
    fp = footprint
    compute, other = fp.compute_bytes, fp.other_bytes
    n_params = shape.num_params()
    trainable = fp.trainable_params
    quant = 0
    if fp.quantised_bits is not None:
        packed, quant = quantised_bytes(shape, fp.quantised_bits, fp.double_quant)
        weights = packed + shape.other_params() * other
    else:
        weights = n_params * fp.weight_bytes
    if not fp.trains_base:
        weights += trainable * adapter_bytes  # the adapter itself (full FT trains the weights in place)
    grad_bytes = fp.weight_bytes if fp.trains_base else adapter_bytes
    gradients = trainable * grad_bytes
    if fp.trains_base and mixed_precision:
        optimizer = trainable * (4 + 4 * optimizer_states)  # fp32 master copy + fp32 moments
    else:
        optimizer = trainable * grad_bytes * optimizer_states

    rows = batch * (2 if objective == "dpo" else 1)
    tokens = rows * (seq + fp.virtual_tokens)
    # PEFT casts a 16-bit input to the adapter's fp32 before the A matmul, and keeps the copy.
    per_layer_extra = fp.adapter_input_features * adapter_bytes if adapter_bytes != compute else 0
    if attention == "eager":
        eager = shape.num_heads * (tokens // rows) * rows * (tokens // rows) * compute
    else:
        eager = 0
    layer_bytes = tokens * (fp.activations_per_token * compute + per_layer_extra) + eager
    if gradient_checkpointing:
        activations = shape.num_layers * tokens * shape.hidden_size * compute + layer_bytes
    else:
        activations = shape.num_layers * layer_bytes
    activations += tokens * shape.hidden_size * fp.final_norm_outputs * compute
    # LM head output (compute dtype, fp32 after prepare_model_for_kbit_training), fp32 log-softmax, its grad.
    head_bytes = other if fp.quantised_bits is not None else compute
    logits = tokens * shape.vocab_size * (head_bytes + 4 + 4)
    reference = n_params * fp.weight_bytes if (objective == "dpo" and fp.reference_copy) else 0
    return MemoryEstimate(
        method=fp.method,
        model=shape.name,
        batch=batch,
        seq=seq,
        params=n_params,
        trainable_params=trainable,
        weights=int(weights),
        quant_constants=int(quant),
        gradients=int(gradients),
        optimizer=int(optimizer),
        activations=int(activations),
        logits=int(logits),
        reference=int(reference),
    )
