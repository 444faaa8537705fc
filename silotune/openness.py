"""Model openness, licences, and the paper's Table 1 as a validator.

The position paper behind silotune (Agrawal, Mertel, Mayer, arXiv 2505.23593)
sorts models into four openness classes and argues that openness decides which
post-training methods a federation can use at all (its Table 1):

============================  ==========================  =========================  ===================
method                        open-source / open-weight   gray-box                   black-box
============================  ==========================  =========================  ===================
full fine-tuning              yes                         no                         no
LoRA / adapters (IA3, QLoRA)  yes                         only what the API exposes  no
instruction tuning (SFT)      yes                         where the provider offers  no
RLHF / DPO                    yes                         no                         no
prompt tuning                 yes (soft prompts)          partial                    textual prompts only
============================  ==========================  =========================  ===================

A :class:`ModelDescriptor` records what a model *is* (class, licence and its
usage limits, whether the training data is open, where the weights live);
:func:`check_table1` refuses every method/model pairing the table rules out,
and :func:`check_data_stays_local` refuses any configuration that would ship a
silo's data to a remote inference API, with the paper's privacy reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from silotune.errors import ConfigError
from silotune.methods import METHODS
from silotune.methods.base import Table1Row


class Openness(StrEnum):
    OPEN_SOURCE = "open-source"
    OPEN_WEIGHT = "open-weight"
    GRAY_BOX = "gray-box"
    BLACK_BOX = "black-box"

    @property
    def has_weights(self) -> bool:
        """Whether a client holds the weights and can run any post-training method locally."""
        return self in (Openness.OPEN_SOURCE, Openness.OPEN_WEIGHT)


class WeightsLocation(StrEnum):
    LOCAL = "local"  # a folder or built-in conversion on the silo's own machine
    DOWNLOADABLE = "downloadable"  # published weights a silo can fetch once and run locally
    PROVIDER = "provider"  # weights stay with a provider; only an API (fine-tuning, logits) is exposed
    REMOTE_API = "remote-api"  # text in, text out through a hosted inference API


PRIVACY_REASON = (
    "every training and inference call would send the silo's private data to the model provider, so the "
    "federated-learning guarantee that data never leaves the silo is gone (paper, section 3: with gray- or "
    "black-box models the provider sees the data at training and inference time)"
)


class UsageLimit(BaseModel):
    """A licence clause that limits who may use the model or its derivatives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(description="'monthly_active_users', 'commercial_use', 'region', 'acceptable_use'...")
    value: float | None = Field(None, description="Threshold of the clause, if it has one.")
    text: str = Field(description="What the clause says, in one sentence.")


class ModelDescriptor(BaseModel):
    """What a base model is, in the paper's terms."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    openness: Openness
    licence: str = Field(description="SPDX id or the licence's name.")
    permissive: bool = Field(
        description="Whether the licence allows use and redistribution without conditions."
    )
    usage_limits: tuple[UsageLimit, ...] = ()
    open_training_data: bool = Field(False, description="Whether the training data/recipe is published.")
    weights: WeightsLocation
    params_b: float | None = Field(None, description="Parameter count in billions, for memory planning.")
    provider_methods: tuple[str, ...] = Field(
        (), description="Gray-box only: the post-training methods the provider's API exposes."
    )
    notes: str = ""

    def limit(self, kind: str) -> UsageLimit | None:
        return next((u for u in self.usage_limits if u.kind == kind), None)


_MAU_700M = UsageLimit(
    kind="monthly_active_users",
    value=700e6,
    text=(
        "products with more than 700 million monthly active users need a separate licence from the "
        "model's owner (Llama community licence, section 2)"
    ),
)

BUILTIN_DESCRIPTORS: dict[str, ModelDescriptor] = {
    d.name: d
    for d in (
        ModelDescriptor(
            name="smollm2-135m-instruct",
            openness=Openness.OPEN_SOURCE,
            licence="Apache-2.0",
            permissive=True,
            open_training_data=True,
            weights=WeightsLocation.LOCAL,
            params_b=0.135,
            notes="Hugging Face SmolLM2; weights, code and training data (SmolLM corpus) are published.",
        ),
        ModelDescriptor(
            name="tiny-llama",
            openness=Openness.OPEN_SOURCE,
            licence="Apache-2.0",
            permissive=True,
            open_training_data=True,
            weights=WeightsLocation.LOCAL,
            params_b=0.0066,
            notes="A random 2-layer Llama built locally for tests (SmolLM2's tokenizer).",
        ),
        ModelDescriptor(
            name="tinyllama-1.1b",
            openness=Openness.OPEN_SOURCE,
            licence="Apache-2.0",
            permissive=True,
            open_training_data=True,
            weights=WeightsLocation.DOWNLOADABLE,
            params_b=1.1,
            notes="TinyLlama: Llama-2 architecture, trained on the open SlimPajama and StarCoder data.",
        ),
        ModelDescriptor(
            name="llama-3.2-1b",
            openness=Openness.OPEN_WEIGHT,
            licence="Llama 3.2 Community License",
            permissive=False,
            usage_limits=(_MAU_700M,),
            open_training_data=False,
            weights=WeightsLocation.DOWNLOADABLE,
            params_b=1.24,
        ),
        ModelDescriptor(
            name="mistral-7b",
            openness=Openness.OPEN_SOURCE,
            licence="Apache-2.0",
            permissive=True,
            open_training_data=False,
            weights=WeightsLocation.DOWNLOADABLE,
            params_b=7.24,
            notes="Open weights under Apache-2.0; the paper counts it as open-source (permissive licence).",
        ),
        ModelDescriptor(
            name="llama-3.1-8b",
            openness=Openness.OPEN_WEIGHT,
            licence="Llama 3.1 Community License",
            permissive=False,
            usage_limits=(
                _MAU_700M,
                UsageLimit(
                    kind="acceptable_use",
                    text="use must follow Meta's acceptable use policy; derivatives must carry the licence",
                ),
            ),
            open_training_data=False,
            weights=WeightsLocation.DOWNLOADABLE,
            params_b=8.03,
        ),
        ModelDescriptor(
            name="llama-2-7b",
            openness=Openness.OPEN_WEIGHT,
            licence="Llama 2 Community License",
            permissive=False,
            usage_limits=(_MAU_700M,),
            open_training_data=False,
            weights=WeightsLocation.DOWNLOADABLE,
            params_b=6.74,
        ),
        ModelDescriptor(
            name="hosted-finetune-api",
            openness=Openness.GRAY_BOX,
            licence="provider terms of service",
            permissive=False,
            weights=WeightsLocation.PROVIDER,
            provider_methods=("lora", "sft"),
            notes="A hosted fine-tuning service (Together.AI-style): upload data, get a LoRA trained there.",
        ),
        ModelDescriptor(
            name="chat-api",
            openness=Openness.BLACK_BOX,
            licence="provider terms of service",
            permissive=False,
            weights=WeightsLocation.REMOTE_API,
            notes="Text in, text out (GPT-4- or Claude-style API).",
        ),
    )
}


def _looks_remote(name_or_path: str) -> bool:
    return "://" in name_or_path and not name_or_path.startswith("file://")


def resolve_descriptor(name_or_path: str, descriptor: str | Mapping[str, Any] | None) -> ModelDescriptor:
    """The descriptor a config declares, else the built-in one for ``name_or_path``.

    A local folder without a declared descriptor is taken as open-weight with an
    unknown licence: the weights are on the silo's disk, but nothing is known of
    its terms, so ``plan`` and the validator treat it conservatively.
    """
    if isinstance(descriptor, str):
        if descriptor not in BUILTIN_DESCRIPTORS:
            raise ConfigError(
                f"unknown model descriptor {descriptor!r}; known: {', '.join(sorted(BUILTIN_DESCRIPTORS))}"
            )
        return BUILTIN_DESCRIPTORS[descriptor]
    if descriptor is not None:
        try:
            return ModelDescriptor.model_validate({"name": name_or_path, **descriptor})
        except Exception as exc:
            raise ConfigError(f"invalid model descriptor: {exc}") from None
    if name_or_path in BUILTIN_DESCRIPTORS:
        return BUILTIN_DESCRIPTORS[name_or_path]
    if _looks_remote(name_or_path):
        return ModelDescriptor(
            name=name_or_path,
            openness=Openness.BLACK_BOX,
            licence="unknown (remote API)",
            permissive=False,
            weights=WeightsLocation.REMOTE_API,
        )
    return ModelDescriptor(
        name=name_or_path,
        openness=Openness.OPEN_WEIGHT,
        licence="unknown",
        permissive=False,
        weights=WeightsLocation.LOCAL,
        notes="a local model folder with no declared descriptor",
    )


OBJECTIVE_ROWS = {
    "sft": Table1Row(row="instruction tuning", gray_box="partial"),
    "dpo": Table1Row(row="RLHF (preference alignment)", gray_box="impossible"),
}


def table1_row(name: str) -> Table1Row:
    """The Table 1 row of a method or objective (an unknown name: its own row, partial on gray-box)."""
    if name in OBJECTIVE_ROWS:
        return OBJECTIVE_ROWS[name]
    if name in METHODS:
        return METHODS.get(name).table1  # type: ignore[no-any-return]
    return Table1Row(row=name, gray_box="partial")


def check_table1(descriptor: ModelDescriptor, method: str, objective: str) -> list[str]:
    """Every reason why ``method`` with ``objective`` cannot post-train ``descriptor`` (empty: allowed)."""
    problems: list[str] = []
    cls = descriptor.openness
    if cls.has_weights:
        return problems
    for name in (method, objective):
        t1 = table1_row(name)
        if cls is Openness.BLACK_BOX:
            extra = f" ({t1.black_box_note})" if t1.black_box_note else ""
            problems.append(
                f"{t1.row} ({name}) needs the model's weights, which a black-box model ({descriptor.name}) "
                f"does not expose (paper Table 1){extra}"
            )
        elif t1.gray_box == "impossible":
            problems.append(
                f"{t1.row} ({name}) is impossible on a gray-box model ({descriptor.name}): the weights stay "
                "with the provider (paper Table 1)"
            )
        elif name not in descriptor.provider_methods:
            problems.append(
                f"{t1.row} ({name}) is only partially available on a gray-box model, and {descriptor.name}'s "
                f"API exposes only {list(descriptor.provider_methods) or 'nothing'} (paper Table 1)"
            )
    return problems


def check_data_stays_local(name_or_path: str, descriptor: ModelDescriptor) -> list[str]:
    """Refuse any model whose training or inference would run at a provider, with the privacy reason."""
    if descriptor.weights in (WeightsLocation.PROVIDER, WeightsLocation.REMOTE_API) or _looks_remote(
        name_or_path
    ):
        where = name_or_path if _looks_remote(name_or_path) else f"{descriptor.name} ({descriptor.weights})"
        return [f"refusing to use the remote model {where}: {PRIVACY_REASON}"]
    return []


def check_licence(
    descriptor: ModelDescriptor,
    *,
    monthly_active_users: float | None = None,
    permissive_only: bool = False,
    open_data_required: bool = False,
) -> list[str]:
    """Licence problems of using ``descriptor`` under the given constraints (empty: none known)."""
    problems = []
    mau = descriptor.limit("monthly_active_users")
    if (
        mau is not None
        and mau.value is not None
        and monthly_active_users is not None
        and monthly_active_users > mau.value
    ):
        problems.append(f"{descriptor.name} ({descriptor.licence}): {mau.text}")
    if permissive_only and not descriptor.permissive:
        problems.append(f"{descriptor.name}: licence {descriptor.licence!r} is not permissive")
    if open_data_required and not descriptor.open_training_data:
        problems.append(f"{descriptor.name}: its training data is not published")
    return problems
