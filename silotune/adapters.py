"""LoRA adapters: attach, read, write, diff and save in PEFT format.

An adapter state is a flat ``dict[str, Tensor]`` keyed by PEFT's own state-dict
names (``get_peft_model_state_dict``), so it saves to safetensors and loads back
into any PEFT model of the same base and LoRA shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from silotune.config import LoraSpec, ModelSpec
from silotune.errors import UpdateError

TensorDict = dict[str, torch.Tensor]


def lora_config(spec: LoraSpec) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
    )


@dataclass
class AdapterModel:
    """A base model with one LoRA adapter attached, plus its tokenizer.

    Loading the base model is the expensive part (seconds to minutes); an
    ``AdapterModel`` is kept alive across rounds and only its adapter weights
    are swapped with :meth:`load_state`.
    """

    model: Any  # peft.PeftModel
    tokenizer: Any
    model_path: Path

    @classmethod
    def create(cls, model_spec: ModelSpec, lora_spec: LoraSpec, *, seed: int) -> AdapterModel:
        from peft import get_peft_model

        from silotune.modeling import load_base_model, load_tokenizer, resolve_model_path

        path = resolve_model_path(model_spec.name_or_path)
        tokenizer = load_tokenizer(path)
        base = load_base_model(path)
        # LoRA's A matrices are random at init; seeding here makes the initial global adapter reproducible.
        torch.manual_seed(seed)
        model = get_peft_model(base, lora_config(lora_spec))
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                raise RuntimeError(f"unexpected trainable parameter {name}")
        return cls(model=model, tokenizer=tokenizer, model_path=path)

    def state(self) -> TensorDict:
        """A detached copy of the adapter weights (float tensors only)."""
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.model)
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the adapter weights; keys and shapes must match exactly."""
        from peft import set_peft_model_state_dict

        current = self.state()
        missing = sorted(set(current) - set(state))
        extra = sorted(set(state) - set(current))
        if missing or extra:
            raise UpdateError(
                "global",
                f"adapter keys do not match the model (missing {missing[:3]}, unexpected {extra[:3]})",
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(current[k].shape):
                raise UpdateError("global", f"shape {tuple(v.shape)} != {tuple(current[k].shape)}", tensor=k)
        result = set_peft_model_state_dict(self.model, dict(state))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise UpdateError("global", f"PEFT did not load keys {unexpected[:3]}")

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
        """Write the adapter (``state`` if given) in PEFT format (``PeftModel.from_pretrained`` loads it)."""
        if state is not None:
            self.load_state(state)
        out = Path(folder)
        self.model.save_pretrained(out)
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
