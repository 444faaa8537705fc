"""What every post-training method declares and does.

A method turns a base model into a trainable model, says which tensors a silo
exchanges each round (an adapter, a soft prompt, or the full weights) and how
the federation's first global of those tensors is drawn. The training loop, the
aggregators and the filters (DP, encryption, masking, robust aggregation) only
ever see a flat ``dict[str, Tensor]``.

A method also owns every fact the rest of silotune needs about it, so adding one
is one file plus its registration and nothing else names methods:

- what it trains and exchanges (``trains``, ``payload``, :meth:`Method.exchange_signature`);
- its memory footprint for :mod:`silotune.memory_estimate` (:meth:`Method.footprint`);
- its row of the paper's Table 1 (``table1``) and which defenses apply (``defenses``, Table 4);
- whether FFA-LoRA applies (``ffa_lora``) and whether it takes the ``lora`` section's shape;
- whether and on which hardware ``plan`` may recommend it (:meth:`Method.plan_choices`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypedDict, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field

from silotune.compute import Placement
from silotune.memory_estimate import Footprint, ModelShape
from silotune.modeling import load_base_model
from silotune.registry import Registry

TensorDict = dict[str, torch.Tensor]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Table1Row:
    """A post-training method's or objective's row of the paper's Table 1.

    Open models allow every row; a black-box model none (they all need the weights).
    Each method declares its row (``Method.table1``); objectives' rows are in :mod:`silotune.openness`.
    """

    row: str  # the row's name in Table 1
    # 'partial': only where the provider's API exposes it; 'impossible': it needs the weights,
    # which stay with the provider.
    gray_box: Literal["partial", "impossible"]
    black_box_note: str = ""  # what remains on a black-box model, if anything


class Payload(StrEnum):
    """What leaves a silo each round."""

    ADAPTER = "adapter"  # LoRA/QLoRA/IA3 tensors: MBs
    SOFT_PROMPT = "soft_prompt"  # a few virtual-token embeddings: KBs
    FULL_WEIGHTS = "full_weights"  # every trainable weight of the model: the model's size


class Defense(StrEnum):
    DIFFERENTIAL_PRIVACY = "differential_privacy"
    SECURE_AGGREGATION = "secure_aggregation"
    HOMOMORPHIC_ENCRYPTION = "homomorphic_encryption"
    ROBUST_AGGREGATION = "robust_aggregation"


class Support(StrEnum):
    FULL = "full"
    LIMITED = "limited"  # allowed; the reason says what is weaker or costlier
    NONE = "none"  # refused by config validation


@dataclass(frozen=True)
class DefenseSupport:
    level: Support
    reason: str


ALL_DEFENSES_FULL = {
    d: DefenseSupport(Support.FULL, "paper Table 4: all four defense categories apply") for d in Defense
}


@dataclass(frozen=True)
class PlanChoice:
    """One way ``plan`` (the paper's Figure 2) may run a method on a silo.

    ``plan`` tries the choices of every method, the most precise base first
    (``base_bits``), each without and then with gradient checkpointing, and gives
    a silo the first that fits its memory. Choices that are not ``when_preferred``
    share the federation's LoRA shape (``plan`` picks the rank), so silos may mix
    them; a ``when_preferred`` choice is tried only when the answers prefer it and
    must fit every silo.
    """

    label: str  # what the silo runs, for the plan's reason ("QLoRA, 4-bit base")
    options: Mapping[str, Any]  # the method options it writes into the config
    base_bits: int  # precision of the base's linear layers: plan prefers the most precise that fits
    quantised: bool = False  # the base is quantised to base_bits (the plan reports the bits)
    checkpointing: tuple[bool, ...] = (False, True)  # gradient checkpointing settings to try, in order
    when_preferred: bool = False  # only when the answers prefer this method (prefer_full_finetuning)


class MethodOptions(BaseModel):
    """Options every method accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30 % more compute."
    )
    base_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description=(
            "Storage and compute dtype of the (unquantised) base. float32 on CPUs; bfloat16 halves the "
            "weights on GPUs. PEFT keeps adapters in float32 either way."
        ),
    )


@dataclass
class Built:
    """A base model made trainable by a method."""

    model: Any
    # Anything the method keeps for itself (e.g. full fine-tuning's frozen reference weights).
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Method(Protocol):
    """A post-training method. Implementations are stateless; per-model state lives in :class:`Built`."""

    name: ClassVar[str]
    title: ClassVar[str]
    payload: ClassVar[Payload]
    requires_weights: ClassVar[bool]
    options_model: ClassVar[type[MethodOptions]]
    defenses: ClassVar[Mapping[Defense, DefenseSupport]]
    trains: ClassVar[str]
    table1: ClassVar[Table1Row]
    # Trains LoRA's A/B factors, so FFA-LoRA (freeze A, exchange only B) applies.
    ffa_lora: ClassVar[bool]
    # Takes its adapter shape (rank, alpha, target modules) from the config's ``lora`` section.
    uses_lora_section: ClassVar[bool]
    # Python packages the method needs beyond silotune's own (config validation names them).
    requires_packages: ClassVar[tuple[str, ...]]
    # The local learning rate ``plan`` writes for it.
    plan_learning_rate: ClassVar[float]

    def exchange_signature(self, options: MethodOptions, lora: Any) -> tuple[Any, ...]:
        """What the method exchanges, up to values: two silos aggregate iff their signatures are equal."""
        ...

    def footprint(self, shape: ModelShape, options: MethodOptions, lora: Any) -> Footprint:
        """What the method puts in memory on ``shape`` (``lora``: the silo's LoRA shape)."""
        ...

    def plan_choices(self, *, gpu: bool) -> tuple[PlanChoice, ...]:
        """The ways ``plan`` may run the method on a silo with (or without) a GPU; () if never."""
        ...

    def build(
        self, path: Path, options: MethodOptions, lora: Any, *, seed: int, placement: Placement | None = None
    ) -> Built:
        """Load the base model from ``path`` (onto ``placement``'s device, default the CPU) and make the
        method's parameters (and only those) trainable."""
        ...

    def state(self, built: Built) -> TensorDict:
        """A detached copy of the exchanged tensors."""
        ...

    def load_state(self, built: Built, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the exchanged tensors (keys and shapes already checked)."""
        ...

    def initial_state(self, built: Built, template: Mapping[str, torch.Tensor], seed: int) -> TensorDict:
        """The federation's first global, drawn from ``seed`` alone (independent of any global RNG)."""
        ...

    def reference_logits(self, built: Built, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """Logits of the frozen reference policy (for DPO), computed without gradients."""
        ...

    def load_artifact(self, folder: Path, base_path: Path, options: MethodOptions) -> Any:
        """The published artifact in ``folder`` on a fresh base, ready for inference."""
        ...

    def save(self, built: Built, folder: Path) -> None:
        """Write the trained artifact in its native format (PEFT folder or a full model folder)."""
        ...


METHODS: Registry[type[Any]] = Registry("post-training method")


def parse_options(method: Method, options: Mapping[str, Any]) -> MethodOptions:
    return method.options_model.model_validate(dict(options))


class Storage(TypedDict):
    """Bytes per base weight, per non-linear weight of a quantised base, and per activation."""

    weight_bytes: int
    other_bytes: int
    compute_bytes: int


def base_storage(options: MethodOptions) -> Storage:
    """An unquantised base at ``options.base_dtype``: weights and activations alike."""
    b = DTYPE_BYTES[options.base_dtype]
    return {"weight_bytes": b, "other_bytes": b, "compute_bytes": b}


def load_base(path: Path, options: MethodOptions, placement: Placement | None = None) -> Any:
    """The base model at ``options.base_dtype`` on the placement's device (default: the CPU)."""
    return load_base_model(path, dtype=options.base_dtype, device=placement.device if placement else "cpu")


def wants_checkpointing(options: MethodOptions, placement: Placement | None) -> bool:
    """Gradient checkpointing: the method's option or ``train.gradient_checkpointing``."""
    return options.gradient_checkpointing or bool(placement and placement.gradient_checkpointing)


def trainable_names(model: torch.nn.Module) -> Iterator[str]:
    return (n for n, p in model.named_parameters() if p.requires_grad)
