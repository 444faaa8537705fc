"""Post-training methods (paper Table 1) and objectives, by name.

Importing this package registers every built-in method: ``lora``, ``qlora``,
``full``, ``ia3``, ``prompt_tuning``. Objectives (``sft``, ``dpo``) live in
:mod:`silotune.methods.objectives`.
"""

from __future__ import annotations

from silotune.methods import full as _full  # noqa: F401  (registers "full")
from silotune.methods import peft_methods as _peft  # noqa: F401  (lora, qlora, ia3, prompt_tuning)
from silotune.methods.base import (
    METHODS,
    Built,
    Defense,
    DefenseSupport,
    Method,
    MethodOptions,
    Payload,
    PlanChoice,
    Support,
    parse_options,
)


def get_method(name: str) -> Method:
    """The registered method ``name`` (an unknown name lists the known ones)."""
    return METHODS.get(name)()  # type: ignore[no-any-return]


__all__ = [
    "METHODS",
    "Built",
    "Defense",
    "DefenseSupport",
    "Method",
    "MethodOptions",
    "Payload",
    "PlanChoice",
    "Support",
    "get_method",
    "parse_options",
]
