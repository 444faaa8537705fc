"""Full fine-tuning: every weight trains and every weight is exchanged.

The costliest method in memory (weights + gradients + two AdamW moments per
parameter, ~16 bytes/param in fp32) and in bandwidth (each update is the size
of the model), and the only one that needs no adapter library. The federation's
first global is the base model itself; the DPO reference is a frozen copy of
the base, loaded on first use.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from silotune.compute import Placement
from silotune.memory_estimate import Footprint, ModelShape
from silotune.methods.base import (
    METHODS,
    Built,
    Defense,
    DefenseSupport,
    MethodOptions,
    Payload,
    PlanChoice,
    Support,
    Table1Row,
    TensorDict,
    base_storage,
    load_base,
    wants_checkpointing,
)


class FullOptions(MethodOptions):
    train_embeddings: bool = Field(
        True, description="Also train (and exchange) the token embeddings (tied to the LM head in SmolLM2)."
    )


@METHODS.register("full")
class FullFineTuning:
    """Full fine-tuning (FFT)."""

    name: ClassVar[str] = "full"
    title: ClassVar[str] = "full fine-tuning"
    payload: ClassVar[Payload] = Payload.FULL_WEIGHTS
    requires_weights: ClassVar[bool] = True
    options_model: ClassVar[type[MethodOptions]] = FullOptions
    trains: ClassVar[str] = "every weight of the model (optionally all but the embeddings)"
    defenses: ClassVar[Mapping[Defense, DefenseSupport]] = {
        Defense.DIFFERENTIAL_PRIVACY: DefenseSupport(
            Support.FULL,
            "paper Table 4; noise scales with the update's dimension, so FFT needs more data per unit of ε",
        ),
        Defense.SECURE_AGGREGATION: DefenseSupport(Support.FULL, "paper Table 4; masks are the model's size"),
        Defense.HOMOMORPHIC_ENCRYPTION: DefenseSupport(
            Support.LIMITED,
            "paper Table 4 allows it, but CKKS ciphertexts are ~8-20× the fp32 update (docs/facts), i.e. "
            "gigabytes per silo per round for a 135M model",
        ),
        Defense.ROBUST_AGGREGATION: DefenseSupport(Support.FULL, "paper Table 4"),
    }
    table1: ClassVar[Table1Row] = Table1Row(row="full fine-tuning", gray_box="impossible")
    ffa_lora: ClassVar[bool] = False  # full weights sum exactly; there is no B·A product
    uses_lora_section: ClassVar[bool] = False
    requires_packages: ClassVar[tuple[str, ...]] = ()
    plan_learning_rate: ClassVar[float] = 1e-5  # every weight moves: far below an adapter's rate

    def build(
        self, path: Path, options: MethodOptions, lora: Any, *, seed: int, placement: Placement | None = None
    ) -> Built:
        assert isinstance(options, FullOptions)
        model = load_base(path, options, placement)
        if wants_checkpointing(options, placement):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in model.parameters():
            p.requires_grad_(True)
        if not options.train_embeddings:
            for p in model.get_input_embeddings().parameters():
                p.requires_grad_(False)
            out = model.get_output_embeddings()
            if out is not None:
                for p in out.parameters():
                    p.requires_grad_(False)
        return Built(model=model, extras={"path": path, "options": options, "placement": placement})

    def state(self, built: Built) -> TensorDict:
        # named_parameters() lists a tied weight once, so the LM head is not exchanged twice.
        return {
            n: _full(p.detach()).to("cpu", copy=True).contiguous()
            for n, p in built.model.named_parameters()
            if p.requires_grad
        }

    def load_state(self, built: Built, state: Mapping[str, torch.Tensor]) -> None:
        params = dict(built.model.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def initial_state(self, built: Built, template: Mapping[str, torch.Tensor], seed: int) -> TensorDict:
        # The base model is the starting point; nothing is random, so the seed is unused.
        base = dict(load_base(built.extras["path"], built.extras["options"]).named_parameters())  # on the CPU
        return {k: base[k].detach().clone().contiguous() for k in sorted(template)}

    def reference_logits(self, built: Built, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        ref = built.extras.get("reference")
        if ref is None:
            ref = load_base(
                built.extras["path"], built.extras["options"], built.extras.get("placement")
            ).eval()
            ref.requires_grad_(False)
            built.extras["reference"] = ref
        with torch.no_grad():
            return ref(input_ids=input_ids, attention_mask=attention_mask).logits

    def save(self, built: Built, folder: Path) -> None:
        built.model.save_pretrained(folder)

    def load_artifact(self, folder: Path, base_path: Path, options: MethodOptions) -> Any:
        return load_base(folder, options)

    def exchange_signature(self, options: MethodOptions, lora: Any) -> tuple[Any, ...]:
        assert isinstance(options, FullOptions)
        return ("full", options.train_embeddings)

    def footprint(self, shape: ModelShape, options: MethodOptions, lora: Any) -> Footprint:
        """Activations per token and layer: 9h + 2kv + 4i.

        The norms keep their input and their normalised and scaled outputs (their weights
        train), q, k, v and the attention output stay for SDPA, o_proj keeps its input, and
        the MLP keeps gate, SiLU, up and their product. Gradients and AdamW moments are at the
        weights' precision, and DPO's reference is a frozen copy of the base.
        """
        assert isinstance(options, FullOptions)
        h, kv, i = shape.hidden_size, shape.kv_dim, shape.intermediate_size
        emb = shape.vocab_size * h * (1 if shape.tie_embeddings else 2)
        return Footprint(
            method=self.name,
            trainable_params=shape.num_params() - (0 if options.train_embeddings else emb),
            activations_per_token=9 * h + 2 * kv + 4 * i,
            trains_base=True,
            final_norm_outputs=3,
            reference_copy=True,
            **base_storage(options),
        )

    def plan_choices(self, *, gpu: bool) -> tuple[PlanChoice, ...]:
        # Only when the answers prefer it (and every silo can afford it), always with checkpointing.
        return (
            PlanChoice(
                "full fine-tuning",
                {"base_dtype": "bfloat16"} if gpu else {},
                base_bits=16 if gpu else 32,
                checkpointing=(True,),
                when_preferred=True,
            ),
        )


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor shard (FSDP, a silo on several processes) is gathered from every rank."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t
