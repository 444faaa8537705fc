"""Peak training memory of a post-training method, estimated from the model's shape.

Pure Python on purpose (no torch, no silotune imports): ``plan`` uses it to pick
a method per silo, and ``bench/gpu_qlora_memory.py`` runs it on machines that
have nothing of silotune but this file.

The estimate is the sum of what is alive at the peak of a training step:

``weights``
    every parameter at its storage precision; QLoRA's quantised linear layers at
    ``bits``/8 bytes per parameter plus their quantisation constants (4-bit:
    one fp32 absmax per 64-value block, 0.5 bit/param; with double quantisation
    an 8-bit absmax per block plus an fp32 constant per 256 blocks, ~0.127
    bit/param; 8-bit LLM.int8: one fp32 scale per output row). Embeddings,
    norms and an untied LM head stay unquantised (``other_bytes``).
``gradients`` and ``optimizer``
    one gradient and two AdamW moments per *trainable* parameter, at the
    trainable parameters' precision (``adapter_bytes``; PEFT keeps adapters in
    fp32 even on a 16-bit base).
``activations``
    what autograd saves for the backward pass, per decoder layer of a Llama
    (RMSNorm, SDPA attention, SwiGLU MLP), counted tensor by tensor in units of
    batch × sequence tokens (h: hidden, kv: key/value width, i: MLP width):

    ============  ===========================  ==========================================
    method        per layer                     why
    ============  ===========================  ==========================================
    full          9h + 2kv + 4i                 norms keep input, normalised and scaled
                                                outputs; q, k, v, attention output (SDPA);
                                                o_proj input; gate, SiLU, up, product
    lora          4h + 2kv + 3i (+ h per        frozen linears keep only their weight; the
                  adapted linear whose input    LoRA A matmul keeps its input (shared by
                  no other op keeps)            q/k/v); SiLU and product need gate and up
    qlora         lora + o_proj, MLP inputs     bitsandbytes' 4-bit matmul keeps its input
                  (+2h + i)                     whenever the input needs a gradient
    ia3           4h + 4kv + 4i                 scaled k/v outputs and the scaled MLP input
    prompt tun.   4h + 2kv + 3i                 as LoRA without adapters, on s + n tokens
    ============  ===========================  ==========================================

    plus, with ``attention="eager"``, the softmax matrix (heads × s² per
    sequence). With gradient checkpointing only each layer's input (h) is kept,
    plus one layer's activations during its recomputation.
``logits``
    the LM head output, the fp32 log-softmax kept by the loss, and the
    gradient of the logits (batch × sequence × vocabulary each): the largest
    single term for small models with large vocabularies such as SmolLM2.
``reference``
    DPO: full fine-tuning keeps a frozen copy of the base; PEFT methods disable
    their adapter instead (free). A DPO batch is twice the rows (chosen and
    rejected).

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

METHOD_NAMES = ("full", "lora", "qlora", "ia3", "prompt_tuning")


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
# Built-in model names that silotune can load, mapped to their shapes.
# Model descriptor names (silotune.openness) mapped to their shapes.
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


def _quant_bytes(shape: ModelShape, bits: int, double_quant: bool) -> tuple[int, int]:
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


def trainable_params(
    shape: ModelShape,
    method: str,
    *,
    lora_r: int = 8,
    lora_targets: Sequence[str] = ("q_proj", "v_proj"),
    ia3_targets: Sequence[str] = ("k_proj", "v_proj", "down_proj"),
    ia3_feedforward: Sequence[str] = ("down_proj",),
    num_virtual_tokens: int = 16,
    train_embeddings: bool = True,
) -> int:
    lin = shape.linears()
    if method in ("lora", "qlora"):
        _check_targets(lora_targets, lin)
        return shape.num_layers * sum(lora_r * (lin[t][0] + lin[t][1]) for t in lora_targets)
    if method == "ia3":
        _check_targets(ia3_targets, lin)
        return shape.num_layers * sum(lin[t][0] if t in ia3_feedforward else lin[t][1] for t in ia3_targets)
    if method == "prompt_tuning":
        return num_virtual_tokens * shape.hidden_size
    if method == "full":
        emb = shape.vocab_size * shape.hidden_size * (1 if shape.tie_embeddings else 2)
        return shape.num_params() - (0 if train_embeddings else emb)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHOD_NAMES)}")


def _check_targets(targets: Sequence[str], lin: Mapping[str, Any]) -> None:
    bad = [t for t in targets if t not in lin]
    if bad:
        raise ValueError(f"unknown target modules {bad}; a Llama layer has {sorted(lin)}")


def activation_elements_per_token(
    shape: ModelShape,
    method: str,
    *,
    lora_targets: Sequence[str] = ("q_proj", "v_proj"),
) -> int:
    """Elements autograd keeps per token and decoder layer (see the module docstring's table)."""
    h, kv, i = shape.hidden_size, shape.kv_dim, shape.intermediate_size
    if method == "full":
        return 9 * h + 2 * kv + 4 * i
    if method in ("lora", "qlora"):
        n = 4 * h + 2 * kv + 3 * i
        # The normalised attention input (h) is kept once if any of q/k/v is adapted; the
        # MLP's normalised input once if gate/up are; o_proj and down_proj inputs are their own.
        if any(t in lora_targets for t in ("q_proj", "k_proj", "v_proj")) or method == "qlora":
            n += h
        if "o_proj" in lora_targets and method == "lora":
            n += h
        if any(t in lora_targets for t in ("gate_proj", "up_proj")) and method == "lora":
            n += h
        if "down_proj" in lora_targets and method == "lora":
            n += i
        if method == "qlora":  # the 4-bit matmul keeps every input that needs a gradient
            n += 2 * h + i
        return n
    if method == "ia3":
        return 4 * h + 4 * kv + 4 * i
    if method == "prompt_tuning":
        return 4 * h + 2 * kv + 3 * i
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHOD_NAMES)}")


def estimate(
    shape: ModelShape,
    method: str,
    *,
    batch: int,
    seq: int,
    lora_r: int = 8,
    lora_targets: Sequence[str] = ("q_proj", "v_proj"),
    bits: int = 4,
    double_quant: bool = True,
    weight_bytes: int = 4,
    other_bytes: int | None = None,
    compute_bytes: int | None = None,
    adapter_bytes: int = 4,
    optimizer_states: int = 2,
    mixed_precision: bool = False,
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    num_virtual_tokens: int = 16,
    train_embeddings: bool = True,
    objective: str = "sft",
) -> MemoryEstimate:
    """Estimated peak memory (bytes) of one training step; see the module docstring for the model.

    ``weight_bytes``: storage of unquantised base weights (4 fp32 on CPU, 2 bf16 on GPU).
    ``other_bytes``: embeddings/norms/LM head of a quantised model (default: ``weight_bytes``;
    4 after PEFT's ``prepare_model_for_kbit_training``). ``compute_bytes``: activation dtype
    (default: ``weight_bytes``). ``adapter_bytes``: trainable parameters, their gradients and
    AdamW moments (4: fp32). ``optimizer_states``: 2 for Adam/AdamW, 0 for SGD.
    ``mixed_precision``: full fine-tuning of a 16-bit model with fp32 master weights and fp32
    moments (the usual recipe: 2 + 2 + 4 + 8 = 16 bytes per parameter).
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHOD_NAMES)}")
    compute = compute_bytes or weight_bytes
    other = other_bytes or weight_bytes
    n_params = shape.num_params()
    trainable = trainable_params(
        shape,
        method,
        lora_r=lora_r,
        lora_targets=lora_targets,
        num_virtual_tokens=num_virtual_tokens,
        train_embeddings=train_embeddings,
    )
    quant = 0
    if method == "qlora":
        packed, quant = _quant_bytes(shape, bits, double_quant)
        weights = packed + shape.other_params() * other
    else:
        weights = n_params * weight_bytes
    if method in ("lora", "qlora", "ia3", "prompt_tuning"):
        weights += trainable * adapter_bytes  # the adapter itself (full FT trains the weights in place)
    grad_bytes = adapter_bytes if method != "full" else weight_bytes
    gradients = trainable * grad_bytes
    if method == "full" and mixed_precision:
        optimizer = trainable * (4 + 4 * optimizer_states)  # fp32 master copy + fp32 moments
    else:
        optimizer = trainable * grad_bytes * optimizer_states

    rows = batch * (2 if objective == "dpo" else 1)
    tokens = rows * (seq + (num_virtual_tokens if method == "prompt_tuning" else 0))
    per_layer = activation_elements_per_token(shape, method, lora_targets=lora_targets)
    if method in ("lora", "qlora") and adapter_bytes != compute:
        # PEFT casts a 16-bit input to the adapter's fp32 before the A matmul, and keeps the copy.
        per_layer_extra = sum(shape.linears()[t][0] for t in lora_targets) * adapter_bytes
    else:
        per_layer_extra = 0
    if attention == "eager":
        eager = shape.num_heads * (tokens // rows) * rows * (tokens // rows) * compute
    else:
        eager = 0
    layer_bytes = tokens * (per_layer * compute + per_layer_extra) + eager
    if gradient_checkpointing:
        activations = shape.num_layers * tokens * shape.hidden_size * compute + layer_bytes
    else:
        activations = shape.num_layers * layer_bytes
    final = 3 if method == "full" else 1  # the final norm: input (+ normalised, scaled)
    activations += tokens * shape.hidden_size * final * compute
    # LM head output (compute dtype, fp32 after prepare_model_for_kbit_training), fp32 log-softmax, its grad.
    head_bytes = other if method == "qlora" else compute
    logits = tokens * shape.vocab_size * (head_bytes + 4 + 4)
    reference = n_params * weight_bytes if (objective == "dpo" and method == "full") else 0
    return MemoryEstimate(
        method=method,
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
