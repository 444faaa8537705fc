"""Parameter-efficient methods on PEFT: LoRA, QLoRA, IA3, prompt tuning.

All four exchange PEFT's own state-dict entries (``get_peft_model_state_dict``),
so what a silo uploads saves to safetensors and loads back into any PEFT model
of the same base and shape; the reference policy for DPO is the same model with
its adapter disabled, so preference alignment costs no second model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal
from unittest import mock

import torch
from pydantic import Field

from silotune.compute import Placement
from silotune.errors import ConfigError, UpdateError
from silotune.memory_estimate import Footprint, ModelShape, check_targets
from silotune.methods.base import (
    ALL_DEFENSES_FULL,
    DTYPE_BYTES,
    METHODS,
    Built,
    Defense,
    DefenseSupport,
    MethodOptions,
    Payload,
    PlanChoice,
    Storage,
    Support,
    Table1Row,
    TensorDict,
    base_storage,
    load_base,
    wants_checkpointing,
)
from silotune.modeling import load_base_model, load_tokenizer

ADAPTERS = Table1Row(row="LoRA / adapters", gray_box="partial")


def lora_config(spec: Any) -> Any:
    """PEFT ``LoraConfig`` from a :class:`~silotune.config.LoraSpec`."""
    # peft takes ~5 s to import; config (the CLI, the tests) imports this module
    _import_peft()
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
    )


def initial_lora(template: Mapping[str, torch.Tensor], seed: int) -> TensorDict:
    """PEFT's default LoRA init (A: Kaiming-uniform, B: zeros), drawn from ``seed`` alone.

    Independent of any global RNG state, so the same seed always yields the same
    starting adapter, whichever process or silo computes it.
    """
    gen = torch.Generator().manual_seed(seed)
    out: TensorDict = {}
    for key in sorted(template):
        t = torch.empty_like(template[key])
        if "lora_B" in key or "lora_embedding_B" in key:
            torch.nn.init.zeros_(t)
        else:
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        out[key] = t
    return out


def _enable_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _check_trainable(model: Any, marker: str) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and marker not in name:
            raise RuntimeError(f"unexpected trainable parameter {name}")


class _PeftMethod:
    """State, loading, reference and saving shared by every PEFT method."""

    requires_weights: ClassVar[bool] = True
    defenses: ClassVar[Mapping[Defense, DefenseSupport]] = ALL_DEFENSES_FULL
    table1: ClassVar[Table1Row] = ADAPTERS
    ffa_lora: ClassVar[bool] = False
    uses_lora_section: ClassVar[bool] = False
    requires_packages: ClassVar[tuple[str, ...]] = ()
    plan_learning_rate: ClassVar[float] = 2e-4

    def plan_choices(self, *, gpu: bool) -> tuple[PlanChoice, ...]:
        # The paper's Figure 2 picks between LoRA/QLoRA by memory and full fine-tuning; other PEFT
        # methods stay available in configs but are never recommended.
        return ()

    def state(self, built: Built) -> TensorDict:
        # peft takes ~5 s to import; config (the CLI, the tests) imports this module
        _import_peft()
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(built.model)
        # What is exchanged lives in host memory whatever device trains it.
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}

    def load_state(self, built: Built, state: Mapping[str, torch.Tensor]) -> None:
        # peft takes ~5 s to import; config (the CLI, the tests) imports this module
        _import_peft()
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(built.model, dict(state))
        # PEFT loads a soft prompt into its prompt encoder itself, then reports the key as unexpected.
        unexpected = [k for k in getattr(result, "unexpected_keys", None) or () if k != "prompt_embeddings"]
        if unexpected:
            raise UpdateError("global", f"PEFT did not load keys {unexpected[:3]}")

    def reference_logits(self, built: Built, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        # The frozen base with the adapter switched off is exactly the pre-training policy.
        with torch.no_grad(), built.model.disable_adapter():
            return built.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def save(self, built: Built, folder: Path) -> None:
        built.model.save_pretrained(folder)

    def _load_base(self, path: Path, options: MethodOptions, placement: Placement | None = None) -> Any:
        return load_base(path, options, placement)

    def load_artifact(self, folder: Path, base_path: Path, options: MethodOptions) -> Any:
        """The published artifact on a fresh base, ready for inference."""
        # peft takes ~5 s to import; config (the CLI, the tests) imports this module
        _import_peft()
        from peft import PeftModel

        base = self._load_base(base_path, options)
        with _attach_quietly(base):
            return PeftModel.from_pretrained(base, folder)


_ATTACH_LOCK = threading.Lock()


def _import_peft() -> None:
    """Import peft without bitsandbytes: ``peft.helpers`` imports it eagerly whenever it is installed
    (on CPUs with AVX512-BF16 its import warns "Failed to load CPU gemm_4bit_forward from
    kernels-community"). Only QLoRA needs it, and QLoRA's model load imports it when it runs."""
    if "peft" in sys.modules:
        return
    with _ATTACH_LOCK:
        blocked = "bitsandbytes" not in sys.modules
        if blocked:
            sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # import raises ImportError
        try:
            importlib.import_module("peft")
        finally:
            if blocked and "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
                del sys.modules["bitsandbytes"]


@contextlib.contextmanager
def _attach_quietly(base: Any) -> Iterator[None]:
    """Attach PEFT to ``base`` without two side effects that every run printed.

    - peft looks for bitsandbytes layers whenever bitsandbytes is installed, which imports it (on CPUs
      with AVX512-BF16 it then warns "Failed to load CPU gemm_4bit_forward from kernels-community"). An
      unquantised base has no such layers, so the lookup is skipped; only QLoRA imports bitsandbytes.
      The lookup flags are peft module attributes: the patch is held under a lock, so a QLoRA build in
      another thread never sees it; where a peft version lacks them nothing is patched.
    - peft probes ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning.
    """
    patches = []
    if getattr(base, "hf_quantizer", None) is None:
        for name in ("peft.tuners.lora.model", "peft.tuners.ia3.model"):
            module = importlib.import_module(name)
            patches += [
                mock.patch.object(module, flag, lambda: False)
                for flag in ("is_bnb_available", "is_bnb_4bit_available")
                if hasattr(module, flag)
            ]
    with _ATTACH_LOCK, warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        for patch in patches:
            stack.enter_context(patch)
        yield


class LoRAOptions(MethodOptions):
    rank: int | None = Field(
        None,
        ge=1,
        description=(
            "A silo's own smaller rank: it trains the first `rank` components of the federation's "
            "`lora.r` adapter and uploads them zero-padded (heterogeneous ranks, HetLoRA). With "
            "aggregation.lora_merge 'stack': the rank of the fresh LoRA the silo trains each round, any "
            "size (FLoRA). None: lora.r."
        ),
    )


@METHODS.register("lora")
class LoRA(_PeftMethod):
    """Low-rank adapters on a full-precision base (Hu et al. 2021)."""

    name: ClassVar[str] = "lora"
    title: ClassVar[str] = "LoRA"
    payload: ClassVar[Payload] = Payload.ADAPTER
    options_model: ClassVar[type[MethodOptions]] = LoRAOptions
    trains: ClassVar[str] = "low-rank A/B matrices on the `lora.target_modules` linear layers"
    ffa_lora: ClassVar[bool] = True
    uses_lora_section: ClassVar[bool] = True

    def build(
        self, path: Path, options: MethodOptions, lora: Any, *, seed: int, placement: Placement | None = None
    ) -> Built:
        # peft takes ~5 s to import; config (the CLI, the tests) imports this module
        _import_peft()
        from peft import get_peft_model

        base = self._load_base(path, options, placement)
        if wants_checkpointing(options, placement):
            _enable_checkpointing(base)
        # LoRA's A matrices are random at init; seeding here makes the template reproducible.
        torch.manual_seed(seed)
        with _attach_quietly(base):
            model = get_peft_model(base, lora_config(lora))
        _check_trainable(model, "lora_")
        return Built(model=model)

    def initial_state(self, built: Built, template: Mapping[str, torch.Tensor], seed: int) -> TensorDict:
        return initial_lora(template, seed)

    def exchange_signature(self, options: MethodOptions, lora: Any) -> tuple[Any, ...]:
        # The base's precision (fp32, 8-bit, NF4) and a silo's smaller rank (uploaded zero-padded)
        # do not change what is exchanged: LoRA and QLoRA silos mix freely at one LoRA shape.
        return ("lora", lora.r, lora.alpha, tuple(sorted(lora.target_modules)))

    def footprint(self, shape: ModelShape, options: MethodOptions, lora: Any) -> Footprint:
        """Activations per token and layer: 4h + 2kv + 3i, plus h or i per adapted input no other op keeps.

        Frozen linears keep only their weight; SiLU and the gate·up product need gate and up
        (3i); the norms keep their inputs and q, k, v and the attention output stay for SDPA
        (4h + 2kv). The LoRA A matmul keeps its input: the normalised attention input once
        if any of q/k/v is adapted, the MLP's normalised input once if gate/up are, and the
        o_proj (h) and down_proj (i) inputs each their own.
        """
        assert isinstance(options, LoRAOptions)
        targets = tuple(lora.target_modules)
        check_targets(shape, targets)
        h, i = shape.hidden_size, shape.intermediate_size
        n = 4 * h + 2 * shape.kv_dim + 3 * i
        if any(t in targets for t in ("q_proj", "k_proj", "v_proj")):
            n += h
        if "o_proj" in targets:
            n += h
        if any(t in targets for t in ("gate_proj", "up_proj")):
            n += h
        if "down_proj" in targets:
            n += i
        return self._lora_footprint(shape, options, lora, n, base_storage(options))

    def _lora_footprint(
        self, shape: ModelShape, options: LoRAOptions, lora: Any, activations: int, storage: Storage
    ) -> Footprint:
        r = options.rank or lora.r
        lin = shape.linears()
        targets = tuple(lora.target_modules)
        return Footprint(
            method=self.name,
            trainable_params=shape.num_layers * sum(r * (lin[t][0] + lin[t][1]) for t in targets),
            activations_per_token=activations,
            adapter_input_features=sum(lin[t][0] for t in targets),
            **storage,
        )

    def plan_choices(self, *, gpu: bool) -> tuple[PlanChoice, ...]:
        if gpu:
            return (PlanChoice("LoRA on a 16-bit base", {"base_dtype": "bfloat16"}, base_bits=16),)
        # fp32 on CPUs: bf16 is 15-20× slower without bf16 units.
        return (PlanChoice("LoRA on an fp32 base", {}, base_bits=32),)


class QLoRAOptions(LoRAOptions):
    bits: Literal[4, 8] = Field(4, description="Base weight bits: 4 (NF4/FP4, QLoRA) or 8 (LLM.int8).")
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type (NF4: Dettmers et al. 2023)."
    )
    double_quant: bool = Field(
        True, description="Quantise the per-block absmax constants too (~0.37 bit/param saved)."
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description=(
            "Dtype of the dequantised matmuls. None: the silo's train.precision (bf16 on a bf16 GPU, "
            "float32 on CPUs, where bf16 is 15-20× slower without bf16 units)."
        ),
    )


@METHODS.register("qlora")
class QLoRA(LoRA):
    """LoRA on a 4-bit NF4 (or 8-bit) quantised, frozen base (Dettmers et al. 2023) via bitsandbytes."""

    name: ClassVar[str] = "qlora"
    title: ClassVar[str] = "QLoRA"
    options_model: ClassVar[type[MethodOptions]] = QLoRAOptions
    trains: ClassVar[str] = "LoRA A/B matrices; the base is stored in 4-bit NF4 (or 8-bit) and frozen"
    # Paper Table 1: quantising and training the base needs the weights, which a gray-box provider keeps.
    table1: ClassVar[Table1Row] = Table1Row(row="LoRA / adapters", gray_box="impossible")
    requires_packages: ClassVar[tuple[str, ...]] = ("bitsandbytes",)

    def footprint(self, shape: ModelShape, options: MethodOptions, lora: Any) -> Footprint:
        """Activations per token and layer: LoRA's with every adapted-input term, plus 2h + i.

        bitsandbytes' 4-bit matmul keeps its input whenever the input needs a gradient, so
        the attention input (h), o_proj's (h) and the MLP's inputs (h + i) are kept whichever
        modules carry adapters. Non-quantised weights (embeddings, norms, LM head) are fp32
        after ``prepare_model_for_kbit_training``.
        """
        assert isinstance(options, QLoRAOptions)
        check_targets(shape, lora.target_modules)
        h, i = shape.hidden_size, shape.intermediate_size
        n = 4 * h + 2 * shape.kv_dim + 3 * i + h + (2 * h + i)
        compute = DTYPE_BYTES[options.compute_dtype or "float32"]  # None: fp32 on CPUs (the upper bound)
        storage: Storage = {"weight_bytes": compute, "other_bytes": 4, "compute_bytes": compute}
        fp = self._lora_footprint(shape, options, lora, n, storage)
        return dataclasses.replace(fp, quantised_bits=options.bits, double_quant=options.double_quant)

    def plan_choices(self, *, gpu: bool) -> tuple[PlanChoice, ...]:
        dtype = {"compute_dtype": "bfloat16"} if gpu else {}
        return tuple(
            PlanChoice(f"QLoRA, {bits}-bit base", {"bits": bits, **dtype}, base_bits=bits, quantised=True)
            for bits in (8, 4)
        )

    def _load_base(self, path: Path, options: MethodOptions, placement: Placement | None = None) -> Any:
        # peft (~5 s) and transformers (~1 s) to import; config (the CLI, the tests) imports this module
        _import_peft()
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        assert isinstance(options, QLoRAOptions)
        device = placement.device if placement else "cpu"
        compute_name = options.compute_dtype or (placement.dtype_name if placement else "float32")
        compute = getattr(torch, compute_name)
        if options.bits == 4:
            q = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=options.quant_type,
                bnb_4bit_use_double_quant=options.double_quant,
                bnb_4bit_compute_dtype=compute,
            )
        else:
            q = BitsAndBytesConfig(load_in_8bit=True)
        # bitsandbytes quantises as the weights land on the device: on a GPU the fp32 base never
        # exists in host or device memory.
        model = load_base_model(path, dtype=compute_name, device=device, quantization_config=q)
        if device == "cpu":
            _keep_canonical_4bit_layout(model)
        # Freezes the base and keeps non-quantised weights (norms, embeddings) in fp32 for stable training.
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=wants_checkpointing(options, placement),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )


def _keep_canonical_4bit_layout(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight the
    first time it runs in eval mode without gradients, rounding its absmax constants to
    bf16, and never unpacks it for training: later training steps then take the
    inference kernel (no gradient to the layer's input) and every save or
    re-pack rounds the base again. A federation alternates evaluation and training
    every round, so the frozen base would drift and gradients would stop at
    quantised layers. The canonical layout (dequantise, fp32 matmul) is exact
    and differentiable in both modes.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class IA3Options(MethodOptions):
    target_modules: list[str] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        min_length=1,
        description="Modules whose activations get a learned scale (IA3 defaults for Llama).",
    )
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"], description="Of those, the ones scaled at their input (MLP)."
    )


@METHODS.register("ia3")
class IA3(_PeftMethod):
    """(IA)^3: learned per-channel rescaling of keys, values and MLP activations (Liu et al. 2022)."""

    name: ClassVar[str] = "ia3"
    title: ClassVar[str] = "IA3 adapters"
    payload: ClassVar[Payload] = Payload.ADAPTER
    options_model: ClassVar[type[MethodOptions]] = IA3Options
    trains: ClassVar[str] = "one scaling vector per adapted module (keys, values, MLP down-projection input)"

    def build(
        self, path: Path, options: MethodOptions, lora: Any, *, seed: int, placement: Placement | None = None
    ) -> Built:
        # peft takes ~5 s to import; config (the CLI, the tests) imports this module
        _import_peft()
        from peft import IA3Config, TaskType, get_peft_model

        assert isinstance(options, IA3Options)
        bad = sorted(set(options.feedforward_modules) - set(options.target_modules))
        if bad:
            raise ConfigError(f"method.options.feedforward_modules {bad} are not in target_modules")
        base = self._load_base(path, options, placement)
        if wants_checkpointing(options, placement):
            _enable_checkpointing(base)
        cfg = IA3Config(
            task_type=TaskType.CAUSAL_LM,
            target_modules=list(options.target_modules),
            feedforward_modules=list(options.feedforward_modules),
        )
        with _attach_quietly(base):
            model = get_peft_model(base, cfg)
        _check_trainable(model, "ia3_")
        return Built(model=model)

    def initial_state(self, built: Built, template: Mapping[str, torch.Tensor], seed: int) -> TensorDict:
        # IA3 starts as the identity: every scale is one, so round 0's global is the base model.
        return {k: torch.ones_like(template[k]) for k in sorted(template)}

    def exchange_signature(self, options: MethodOptions, lora: Any) -> tuple[Any, ...]:
        assert isinstance(options, IA3Options)
        return ("ia3", tuple(sorted(options.target_modules)), tuple(sorted(options.feedforward_modules)))

    def footprint(self, shape: ModelShape, options: MethodOptions, lora: Any) -> Footprint:
        """Activations per token and layer: 4h + 4kv + 4i (the scaled k/v outputs and MLP input)."""
        assert isinstance(options, IA3Options)
        check_targets(shape, options.target_modules)
        lin, h, kv, i = shape.linears(), shape.hidden_size, shape.kv_dim, shape.intermediate_size
        ff = set(options.feedforward_modules)
        # One scale per output channel, or per input channel of a feed-forward module.
        per_layer = sum(lin[t][0] if t in ff else lin[t][1] for t in options.target_modules)
        return Footprint(
            method=self.name,
            trainable_params=shape.num_layers * per_layer,
            activations_per_token=4 * h + 4 * kv + 4 * i,
            **base_storage(options),
        )


class PromptTuningOptions(MethodOptions):
    num_virtual_tokens: int = Field(16, ge=1, le=512, description="Length of the learned soft prompt.")
    init: Literal["sampled_vocab", "text"] = Field(
        "sampled_vocab",
        description=(
            "'sampled_vocab': embeddings of tokens drawn (seeded) from the first `init_vocab` ids "
            "(Lester et al. 2021); 'text': the embeddings of `init_text`, repeated to length."
        ),
    )
    init_vocab: int = Field(5000, ge=1, description="Draw 'sampled_vocab' tokens from ids below this.")
    init_text: str | None = Field(None, description="Text for init='text'.")


@METHODS.register("prompt_tuning")
class PromptTuning(_PeftMethod):
    """Soft prompts: learned virtual-token embeddings prepended to every input (Lester et al. 2021)."""

    name: ClassVar[str] = "prompt_tuning"
    title: ClassVar[str] = "prompt tuning (soft prompts)"
    payload: ClassVar[Payload] = Payload.SOFT_PROMPT
    options_model: ClassVar[type[MethodOptions]] = PromptTuningOptions
    trains: ClassVar[str] = "num_virtual_tokens × hidden_size prompt embeddings; the model is frozen"
    table1: ClassVar[Table1Row] = Table1Row(
        row="prompt tuning", gray_box="partial", black_box_note="only textual prompt engineering remains"
    )
    defenses: ClassVar[Mapping[Defense, DefenseSupport]] = {
        Defense.DIFFERENTIAL_PRIVACY: DefenseSupport(
            Support.LIMITED,
            "paper Table 4: limited for prompt tuning; the soft prompt is tiny, so noise calibrated to its "
            "few thousand values costs more utility per unit of ε",
        ),
        Defense.SECURE_AGGREGATION: DefenseSupport(
            Support.FULL, "a soft prompt is a dense tensor; masking applies"
        ),
        Defense.HOMOMORPHIC_ENCRYPTION: DefenseSupport(
            Support.FULL, "a soft prompt fits one CKKS ciphertext"
        ),
        Defense.ROBUST_AGGREGATION: DefenseSupport(
            Support.LIMITED,
            "paper Table 4: limited for prompt tuning; a whole update is one small prompt, so a poisoned "
            "prompt differs from honest ones in few coordinates and distance-based screening sees little",
        ),
    }

    def build(
        self, path: Path, options: MethodOptions, lora: Any, *, seed: int, placement: Placement | None = None
    ) -> Built:
        # peft takes ~5 s to import; config (the CLI, the tests) imports this module
        _import_peft()
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        assert isinstance(options, PromptTuningOptions)
        if options.init == "text" and not options.init_text:
            raise ConfigError("method.options.init_text is required when init='text'")
        base = self._load_base(path, options, placement)
        if wants_checkpointing(options, placement):
            _enable_checkpointing(base)
        cfg = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=options.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
        torch.manual_seed(seed)
        with _attach_quietly(base):
            model = get_peft_model(base, cfg)
        _check_trainable(model, "prompt_encoder")
        return Built(model=model, extras={"options": options, "path": path})

    def initial_state(self, built: Built, template: Mapping[str, torch.Tensor], seed: int) -> TensorDict:
        options: PromptTuningOptions = built.extras["options"]
        emb = built.model.get_input_embeddings().weight.detach().cpu()
        n = options.num_virtual_tokens
        if options.init == "text":
            ids = load_tokenizer(built.extras["path"])(options.init_text, add_special_tokens=False)[
                "input_ids"
            ]
            ids = (ids * math.ceil(n / max(1, len(ids))))[:n]
            idx = torch.tensor(ids, dtype=torch.long)
        else:
            gen = torch.Generator().manual_seed(seed)
            idx = torch.randint(0, min(options.init_vocab, emb.shape[0]), (n,), generator=gen)
        (key,) = template
        return {key: emb[idx].clone().to(template[key].dtype).reshape(template[key].shape).contiguous()}

    def exchange_signature(self, options: MethodOptions, lora: Any) -> tuple[Any, ...]:
        assert isinstance(options, PromptTuningOptions)
        return ("prompt_tuning", options.num_virtual_tokens)

    def footprint(self, shape: ModelShape, options: MethodOptions, lora: Any) -> Footprint:
        """Activations per token and layer: 4h + 2kv + 3i (LoRA's without adapters), on s + n tokens."""
        assert isinstance(options, PromptTuningOptions)
        h = shape.hidden_size
        return Footprint(
            method=self.name,
            trainable_params=options.num_virtual_tokens * h,
            activations_per_token=4 * h + 2 * shape.kv_dim + 3 * shape.intermediate_size,
            virtual_tokens=options.num_virtual_tokens,
            **base_storage(options),
        )


def merge_adapter(folder: Path, base_path: Path) -> Any:
    """The PEFT adapter in ``folder`` merged into a float32 base from ``base_path`` (for export).

    A QLoRA adapter is an ordinary LoRA adapter: it merges into the full-precision base. Raises
    ConfigError for an adapter that adds no weights to merge (soft prompts).
    """
    _import_peft()
    from peft import PeftModel  # ~5 s to import; config (the CLI, the tests) imports this module

    base = load_base(base_path, MethodOptions())
    with _attach_quietly(base):
        model = PeftModel.from_pretrained(base, folder)
    try:
        merge = model.merge_and_unload
    except AttributeError:
        raise ConfigError(
            f"the adapter in {folder} adds virtual tokens, not weights: it cannot be merged; "
            "export it as peft"
        ) from None
    return merge()
