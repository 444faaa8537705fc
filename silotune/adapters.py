"""Trainable models: a base model made trainable by a post-training method.

An adapter state is a flat ``dict[str, Tensor]`` of the tensors a method
exchanges: PEFT's own state-dict names (``get_peft_model_state_dict``) for
LoRA, QLoRA, IA3 and prompt tuning, so it saves to safetensors and loads back
into any PEFT model of the same base and shape; the model's parameter names for
full fine-tuning. Which method is which lives in :mod:`silotune.methods`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from silotune.compute import Placement, autocast
from silotune.config import LoraSpec, MethodSpec, ModelSpec
from silotune.errors import UpdateError
from silotune.methods import get_method, parse_options
from silotune.methods.base import Built
from silotune.methods.peft_methods import lora_config
from silotune.modeling import load_tokenizer, resolve_model_path

TensorDict = dict[str, torch.Tensor]

__all__ = [
    "AdapterModel",
    "TensorDict",
    "apply_delta",
    "delta",
    "global_norm",
    "lora_b_keys",
    "lora_config",
    "tensor_bytes",
]


@dataclass
class AdapterModel:
    """A base model made trainable by one post-training method (LoRA by default), plus its tokenizer.

    Loading the base model is the expensive part (seconds to minutes); an
    ``AdapterModel`` is kept alive across rounds and only its exchanged weights
    are swapped with :meth:`load_state`.
    """

    model: Any  # peft.PeftModel, or a transformers model for full fine-tuning
    tokenizer: Any
    model_path: Path
    method_spec: MethodSpec = field(default_factory=MethodSpec)
    built: Built | None = None
    placement: Placement = field(default_factory=Placement)  # where it computes (default: CPU, fp32)
    lora_spec: LoraSpec | None = None
    _shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls,
        model_spec: ModelSpec,
        lora_spec: LoraSpec,
        *,
        seed: int,
        method: MethodSpec | None = None,
        placement: Placement | None = None,
    ) -> AdapterModel:
        spec = method or MethodSpec()
        impl = get_method(spec.name)
        path = resolve_model_path(model_spec.name_or_path)
        tokenizer = load_tokenizer(path)
        place = placement or Placement()
        built = impl.build(path, parse_options(impl, spec.options), lora_spec, seed=seed, placement=place)
        out = cls(
            model=built.model,
            tokenizer=tokenizer,
            model_path=path,
            method_spec=spec,
            built=built,
            placement=place,
            lora_spec=lora_spec,
        )
        out._shapes = {k: tuple(v.shape) for k, v in out.state().items()}
        return out

    @property
    def device(self) -> torch.device:
        """Where the model's (first) parameters live: batches go there."""
        return next(self.model.parameters()).device

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` on the model's device (no copy on the CPU)."""
        device = self.device
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def autocast(self) -> AbstractContextManager[Any]:
        """Autocast to the placement's precision (nothing for fp32)."""
        return autocast(self.placement)

    @property
    def method(self) -> Any:
        return get_method(self.method_spec.name)

    def _built(self) -> Built:
        return self.built if self.built is not None else Built(model=self.model)

    def state(self) -> TensorDict:
        """A detached copy of the exchanged weights (float tensors only)."""
        return self.method.state(self._built())

    def initial_state(self, seed: int) -> TensorDict:
        """The federation's first global for this method, drawn from ``seed`` alone."""
        return self.method.initial_state(self._built(), self.state(), seed)

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the exchanged weights; keys and shapes must match exactly."""
        current = self._shapes or {k: tuple(v.shape) for k, v in self.state().items()}
        missing = sorted(set(current) - set(state))
        extra = sorted(set(state) - set(current))
        if missing or extra:
            raise UpdateError(
                "global",
                f"adapter keys do not match the model (missing {missing[:3]}, unexpected {extra[:3]})",
            )
        for k, v in state.items():
            if tuple(v.shape) != current[k]:
                raise UpdateError("global", f"shape {tuple(v.shape)} != {current[k]}", tensor=k)
        self.method.load_state(self._built(), state)

    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of the frozen reference policy (the base model), for preference optimisation."""
        return self.method.reference_logits(self._built(), input_ids, attention_mask)  # type: ignore[no-any-return]

    @contextmanager
    def frozen(self, keys: Sequence[str]) -> Iterator[None]:
        """Within the block, the adapter tensors named by ``keys`` (state keys) get no gradient."""
        if not keys:
            yield
            return
        by_key = {name.replace(".default.", "."): p for name, p in self.model.named_parameters()}
        missing = sorted(set(keys) - set(by_key))
        if missing:
            raise KeyError(f"cannot freeze unknown adapter tensors {missing[:3]}")
        params = [by_key[k] for k in keys if by_key[k].requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def save_pretrained(self, folder: str | Path, state: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write the artifact (``state`` if given): a PEFT folder, or a full model folder for FFT."""
        if state is not None:
            self.load_state(state)
        out = Path(folder)
        self.method.save(self._built(), out)
        self.tokenizer.save_pretrained(out)
        return out


def lora_b_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The LoRA B tensors: what FFA-LoRA trains and exchanges (A stays at its seeded init)."""
    return sorted(k for k in state if "lora_B" in k or "lora_embedding_B" in k)


def delta(local: Mapping[str, torch.Tensor], global_: Mapping[str, torch.Tensor]) -> TensorDict:
    """``local - global`` key by key."""
    if set(local) != set(global_):
        raise ValueError("adapter key sets differ")
    return {k: (local[k] - global_[k]).contiguous() for k in global_}


def apply_delta(global_: Mapping[str, torch.Tensor], d: Mapping[str, torch.Tensor]) -> TensorDict:
    """``global + delta`` key by key (the inverse of :func:`delta`); ``d`` may cover a subset of keys."""
    extra = set(d) - set(global_)
    if extra:
        raise ValueError(f"delta has tensors the adapter lacks: {sorted(extra)[:3]}")
    return {k: (global_[k] + d[k]).contiguous() if k in d else global_[k] for k in global_}


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))  # type: ignore[arg-type]
