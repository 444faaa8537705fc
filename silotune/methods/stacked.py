"""A stacked (FLoRA) federation's global: one merged dense update per adapted module.

With ``aggregation.lora_merge: stack`` (Wang et al., "FLoRA", NeurIPS 2024; the math is in
:mod:`silotune.aggregation.stacking`) the coordinator merges each round's stacked product
``sum_k p_k s_k B_k A_k`` into the global, so the global is not a LoRA adapter but the sum of every
round's merged updates: per adapted module ``m`` one float32 tensor ``ΔW_m`` of the base weight's
shape (``out × in``), stored under ``<m>.merged_delta.weight``. Its size does not grow with the
rounds or the silos (stacked factors would: rank ``sum_k r_k`` per round); for the default q/v
targets of a 135M model it is about 50 MB.

A silo trains on the base plus ``ΔW`` (:func:`merged_base`: a forward hook adds ``x @ ΔW^T`` to each
adapted module's frozen base layer, so the shared base weights are never modified and a 4-bit QLoRA
base works too) from a fresh LoRA of its own rank (:func:`fresh_lora`: A random, B zero, so it adds
nothing at the start), and uploads its whole factors: with B starting at zero, ``s_k B_k A_k`` is
exactly the change the silo made.

For serving, :func:`merged_to_lora` writes ``ΔW`` as a PEFT LoRA adapter by SVD, module by module,
at the numerical rank of each ``ΔW`` (``rank_pattern``): exact up to float rounding, and loadable,
mergeable and exportable like any other adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from silotune.errors import UpdateError

TensorDict = dict[str, torch.Tensor]

MERGED = ".merged_delta.weight"
_A = ".lora_A.weight"
_B = ".lora_B.weight"
# Singular values below this fraction of a module's largest are float32 rounding of the stored ΔW
# (about 6e-8 relative per entry), not updates: a LoRA export drops them.
SVD_RTOL = 1e-6


def merged_key(module: str) -> str:
    return module + MERGED


def is_merged(state: Mapping[str, Any]) -> bool:
    """True for a stacked federation's global (merged dense updates), False for an adapter state."""
    return bool(state) and all(k.endswith(MERGED) for k in state)


def modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The adapted modules of a merged global (sorted)."""
    return sorted(k.removesuffix(MERGED) for k in state if k.endswith(MERGED))


def _lora_modules(template: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(_A) for k in template if k.endswith(_A))


def base_layer(model: Any, module: str) -> Any:
    """The frozen base layer of the LoRA module ``module`` (a state-key prefix) in a PEFT model."""
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise UpdateError("global", f"the model has no adapted module {module!r}") from None
    return getattr(layer, "base_layer", layer)


def initial_merged(adapter: Any) -> TensorDict:
    """Round 0's global: a zero update for every module the federation's LoRA adapts."""
    # The shape from the LoRA factors (out × in): a 4-bit base stores its weight packed, in another shape.
    template = adapter.state()
    return {
        merged_key(m): torch.zeros(template[m + _B].shape[0], template[m + _A].shape[1], dtype=torch.float32)
        for m in _lora_modules(template)
    }


def check_merged(merged: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor]) -> None:
    """``merged`` must update exactly the modules of the LoRA ``template``, at each module's shape."""
    want, got = _lora_modules(template), modules(merged)
    if not is_merged(merged) or want != got:
        raise UpdateError(
            "global",
            f"not a stacked federation's global for this model (modules {sorted(set(want) ^ set(got))[:3]} "
            "differ, or it holds LoRA factors: a federation started with aggregation.lora_merge 'pad'?)",
        )
    for m in want:
        t = merged[merged_key(m)]
        shape = (template[m + _B].shape[0], template[m + _A].shape[1])
        if tuple(t.shape) != shape or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise UpdateError(
                "global", f"merged update {tuple(t.shape)} is not a finite {shape} float tensor", tensor=m
            )


def fresh_lora(adapter: Any, seed: int) -> TensorDict:
    """A fresh LoRA of the adapter's own rank (A: seeded Kaiming-uniform, B: zeros).

    B must be zero: then the silo's whole trained factors are its update, which stacking relies on.
    """
    state = adapter.initial_state(seed)
    nonzero = sorted(k for k in state if k.endswith(_B) and bool(state[k].any()))
    if nonzero:
        raise UpdateError("global", f"a fresh LoRA must start with B = 0, but {nonzero[:3]} are not")
    return state


@contextmanager
def merged_base(adapter: Any, merged: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, every adapted module computes with base weight ``W + ΔW``.

    A forward hook on each module's frozen base layer adds ``x @ ΔW^T`` instead of changing ``W``:
    the base is shared by every silo this process serves, a bf16 or 4-bit base could not hold a
    small update exactly, and removing the hooks restores the base bit for bit. ``ΔW`` gets no
    gradient; the LoRA on top trains as usual.
    """
    handles = []
    device = adapter.device

    def hook_for(delta: torch.Tensor) -> Any:
        cast: dict[torch.dtype, torch.Tensor] = {delta.dtype: delta}

        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if x.dtype not in cast:
                cast[x.dtype] = delta.to(x.dtype)
            return output + F.linear(x, cast[x.dtype])

        return hook

    try:
        for m in modules(merged):
            delta = merged[merged_key(m)].detach().to(device)
            if not bool(delta.any()):
                continue  # round 0: nothing merged yet
            handles.append(base_layer(adapter.model, m).register_forward_hook(hook_for(delta)))
        yield
    finally:
        for h in handles:
            h.remove()


def applied(
    adapter: Any, state: Mapping[str, torch.Tensor]
) -> tuple[TensorDict, AbstractContextManager[None]]:
    """What to load and what to compute inside, to run a global ``state`` on ``adapter``.

    An adapter state is loaded as it is; a merged global runs as a LoRA that adds nothing (B = 0)
    inside :func:`merged_base`. Code that also needs the bare base (a reference policy) computes it
    outside the returned context.
    """
    if not is_merged(state):
        return dict(state), nullcontext()
    fresh = fresh_lora(adapter, 0)
    check_merged(state, fresh)
    return fresh, merged_base(adapter, state)


def lora_factors(delta: torch.Tensor, *, rtol: float = SVD_RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A = delta`` at ``delta``'s numerical rank (SVD in float64); rank >= 1."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    keep = int((s > s[0] * rtol).sum()) if s.numel() and float(s[0]) > 0 else 0
    keep = max(keep, 1)  # PEFT needs rank >= 1; an all-zero module gets a zero rank-1 factor
    root = s[:keep].sqrt()
    b = u[:, :keep] * root[None, :]
    a = root[:, None] * vh[:keep]
    return b.to(torch.float32), a.to(torch.float32)


def merged_to_lora(merged: Mapping[str, torch.Tensor], lora: Any) -> tuple[TensorDict, Any]:
    """A PEFT LoRA adapter (state, ``LoraConfig``) equal to the merged global.

    Each module gets its own rank (``rank_pattern``) and ``alpha = rank`` (scaling 1, so
    ``B @ A = ΔW``). ``lora`` is the federation's :class:`~silotune.config.LoraSpec`, for the targets.
    """
    from silotune.methods.peft_methods import lora_config

    state: TensorDict = {}
    ranks: dict[str, int] = {}
    for m in modules(merged):
        b, a = lora_factors(merged[merged_key(m)])
        state[m + _A], state[m + _B] = a.contiguous(), b.contiguous()
        ranks[m] = a.shape[0]
    if not ranks:
        raise UpdateError("global", "the merged global updates no module")
    top = max(ranks.values())
    config = lora_config(lora.model_copy(update={"r": top, "alpha": float(top), "dropout": 0.0}))
    # Patterns match module names inside the base model (PEFT's state keys add "base_model.model.").
    config.rank_pattern = {m.removeprefix("base_model.model."): r for m, r in ranks.items()}
    config.alpha_pattern = {m.removeprefix("base_model.model."): float(r) for m, r in ranks.items()}
    return state, config


def write_lora_folder(merged: Mapping[str, torch.Tensor], lora: Any, base_model: str, folder: Path) -> Path:
    """Write the merged global as a PEFT adapter folder (``PeftModel.from_pretrained`` loads it)."""
    from safetensors.torch import save_file

    state, config = merged_to_lora(merged, lora)
    config.base_model_name_or_path = base_model
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(state, str(folder / "adapter_model.safetensors"))
    return folder
