"""``plan``: the paper's Figure 2 decision tree, from a consortium's answers to a federation config.

The walk follows the paper's guide (section 4, Figure 2):

1. **Privacy and autonomy.** If data must not leave a silo, or clients must
   control their own training and inference, the model must be open and run
   locally: open-source when the licence must be permissive, the training data
   must be open, or the deployment exceeds an open-weight licence's usage limit
   (e.g. Llama's 700M monthly users); otherwise open-weight is acceptable.
2. **Hardware.** Each silo's memory (GPU VRAM, else CPU RAM) bounds what it can
   run: the estimator (:mod:`silotune.silo_memory`) picks, per silo, the most
   precise base that fits at the federation's common LoRA rank, among the choices
   the registered methods offer (:meth:`~silotune.methods.Method.plan_choices`: a
   16-bit LoRA base, an 8-bit base, or a 4-bit NF4 base with QLoRA), with gradient
   checkpointing only when needed. Silos may differ in base precision and still
   aggregate: they exchange the same adapter. The rank is the largest every silo
   can afford, so nobody is excluded (the paper's heterogeneity principle).
3. **Closed models only when nothing runs locally**, and only without strict
   privacy or autonomy needs: gray-box if the provider exposes fine-tuning,
   black-box otherwise, each with the privacy cost stated.
4. **Defenses** (paper Table 4) from the threat answers: differential privacy
   against membership inference and gradient inversion, secure aggregation or
   homomorphic encryption against a curious coordinator, robust aggregation
   against poisoning, and the tension between the last two made explicit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from silotune.config import parse_config
from silotune.errors import ConfigError
from silotune.memory_estimate import MODEL_SHAPES, SHAPES, MemoryEstimate, ModelShape, shape_for_params
from silotune.methods import METHODS, Defense, Method, PlanChoice, Support, get_method
from silotune.openness import (
    BUILTIN_DESCRIPTORS,
    PRIVACY_REASON,
    ModelDescriptor,
    Openness,
    check_licence,
)
from silotune.silo_memory import estimate_method

# Rank is the last thing to spend memory on: with every attention projection adapted, the QLoRA paper
# found rank to matter little, so memory goes to base precision first, then to avoiding recomputation.
LORA_RANKS = (16, 8, 4)
GPU_HEADROOM = 0.90  # of VRAM: the CUDA context and allocator fragmentation take the rest
CPU_HEADROOM = 0.70  # of RAM: the OS, the Python runtime and the silo's own services take the rest


class _Answers(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiloAnswers(_Answers):
    name: str
    vram_gb: float = Field(0.0, ge=0, description="GPU memory of the silo's largest GPU (0: no GPU).")
    ram_gb: float = Field(16.0, ge=0, description="CPU memory available for training.")
    local_compute: bool = Field(
        True, description="Whether the silo may run models on its own machines at all."
    )


class LicenceAnswers(_Answers):
    permissive_only: bool = Field(False, description="Only permissive licences (e.g. Apache-2.0, MIT).")
    open_data_required: bool = Field(False, description="The model's training data must be published.")
    monthly_active_users: float | None = Field(None, ge=0, description="Expected users of the product.")


class PlanAnswers(_Answers):
    """What ``plan`` asks (every field has a command-line option and a YAML key)."""

    name: str = Field("planned-federation", description="Federation id of a written config.")
    privacy: Literal["strict", "moderate", "none"] = Field(
        "strict", description="strict: data never leaves a silo and updates must be protected too."
    )
    autonomy: bool = Field(True, description="Clients must control their own training and inference.")
    silos: list[SiloAnswers] = Field(min_length=1)
    model: str | None = Field(None, description="A model descriptor name to plan for (else chosen by size).")
    model_size_b: float | None = Field(
        None, gt=0, description="Desired model size in billions (else: largest that fits)."
    )
    licence: LicenceAnswers = Field(default_factory=LicenceAnswers)
    objective: Literal["sft", "dpo"] = "sft"
    untrusted_silos: bool = Field(False, description="Some silo may send poisoned updates.")
    curious_coordinator: bool = Field(
        True, description="The coordinator must not see any single silo's update."
    )
    provider_api: Literal["none", "finetune", "chat"] = Field(
        "none", description="Closed access the team already has: a fine-tuning API (gray-box) or a chat API."
    )
    prefer_full_finetuning: bool = Field(
        False, description="Use full fine-tuning where every silo can afford it."
    )
    batch: int = Field(4, ge=1)
    seq: int = Field(512, ge=16)


class SiloPlan(BaseModel):
    name: str
    budget_gb: float
    device: str
    method: str
    options: dict[str, Any] = Field(default_factory=dict, description="The method options it writes.")
    bits: int | None = None
    rank: int | None = None
    gradient_checkpointing: bool = False
    estimate_gb: float | None = None
    reason: str


class Recommendation(BaseModel):
    item: str
    recommended: bool
    reason: str


class Plan(BaseModel):
    openness: Openness
    openness_reason: str
    model: str | None
    model_reason: str
    silos: list[SiloPlan]
    defenses: list[Recommendation]
    warnings: list[str]
    feasible: bool = Field(description="Whether a local federated configuration exists (can be written).")


def load_answers(path: str | Path, **overrides: Any) -> PlanAnswers:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"answers file not found: {path}") from None
    return parse_answers({**raw, **{k: v for k, v in overrides.items() if v is not None}}, source=str(path))


def parse_answers(data: dict[str, Any], *, source: str = "<answers>") -> PlanAnswers:
    try:
        return PlanAnswers.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid plan answers ({source}):"]
        lines += [f"  - {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


# --- the tree -------------------------------------------------------------------------------


def _budget(s: SiloAnswers) -> tuple[float, str]:
    if not s.local_compute:
        return 0.0, "none"
    if s.vram_gb > 0:
        return s.vram_gb * GPU_HEADROOM, f"GPU {s.vram_gb:g} GB"
    return s.ram_gb * CPU_HEADROOM, f"CPU {s.ram_gb:g} GB RAM"


def _shape(d: ModelDescriptor) -> ModelShape:
    if d.name in SHAPES:
        return SHAPES[d.name]
    alias = MODEL_SHAPES.get(d.name)
    if alias:
        return SHAPES[alias]
    return shape_for_params(d.params_b or 1.0)


def _choices(*, gpu: bool, preferred: bool) -> list[tuple[Method, PlanChoice]]:
    """Every registered method's plan choices (``when_preferred`` ones or the others), most precise first."""
    out = [
        (m, c)
        for m in map(get_method, METHODS.names())
        for c in m.plan_choices(gpu=gpu)
        if c.when_preferred == preferred
    ]
    return sorted(out, key=lambda mc: -mc[1].base_bits)


def _lora_shape(rank: int) -> dict[str, Any]:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if rank >= 16 else ["q_proj", "v_proj"]
    return {"r": rank, "alpha": 2 * rank, "target_modules": targets}


def _estimates(
    shape: ModelShape, method: Method, choice: PlanChoice, a: PlanAnswers, lora: dict[str, Any] | None = None
) -> Iterator[tuple[bool, dict[str, Any], MemoryEstimate]]:
    """(checkpointing, the options to write, their estimate) for each checkpointing setting of ``choice``."""
    for ckpt in choice.checkpointing:
        options = {**({"gradient_checkpointing": True} if ckpt else {}), **choice.options}
        est = estimate_method(
            shape, method.name, batch=a.batch, seq=a.seq, options=options, lora=lora, objective=a.objective
        )
        yield ckpt, options, est


def _fit(shape: ModelShape, silo: SiloAnswers, rank: int, a: PlanAnswers) -> SiloPlan | None:
    """The most precise base that fits ``silo`` at LoRA rank ``rank``; None if nothing fits."""
    budget, device = _budget(silo)
    gpu = silo.vram_gb > 0
    for n, (method, choice) in enumerate(_choices(gpu=gpu, preferred=False)):
        for ckpt, options, est in _estimates(shape, method, choice, a, _lora_shape(rank)):
            gb = est.total / 1e9
            if gb <= budget:
                why = (
                    f"{choice.label} at rank {rank} needs ~{gb:.1f} GB (estimate: {est.summary()}) of the "
                    f"{budget:.1f} GB usable on {device}"
                )
                if n > 0:
                    why += "; a more precise base does not fit"
                if ckpt:
                    why += "; gradient checkpointing needed to fit the activations"
                if not gpu:
                    why += "; CPU training is slow (seconds per step for small models)"
                return SiloPlan(
                    name=silo.name,
                    budget_gb=round(budget, 1),
                    device=device,
                    method=method.name,
                    options=options,
                    bits=choice.base_bits if choice.quantised else None,
                    rank=rank,
                    gradient_checkpointing=ckpt,
                    estimate_gb=round(gb, 2),
                    reason=why,
                )
    return None


def _preferred_fits(shape: ModelShape, silo: SiloAnswers, a: PlanAnswers) -> SiloPlan | None:
    """The method the answers prefer (full fine-tuning), if it fits ``silo``; else None."""
    budget, device = _budget(silo)
    for method, choice in _choices(gpu=silo.vram_gb > 0, preferred=True):
        for ckpt, options, est in _estimates(shape, method, choice, a):
            gb = est.total / 1e9
            if gb <= budget:
                return SiloPlan(
                    name=silo.name,
                    budget_gb=round(budget, 1),
                    device=device,
                    method=method.name,
                    options=options,
                    gradient_checkpointing=ckpt,
                    estimate_gb=round(gb, 2),
                    reason=(
                        f"{choice.label} needs ~{gb:.1f} GB (estimate: {est.summary()}) of {budget:.1f} GB "
                        f"on {device}"
                    ),
                )
    return None


def _candidates(a: PlanAnswers, need_open_source: bool) -> list[ModelDescriptor]:
    if a.model is not None:
        if a.model not in BUILTIN_DESCRIPTORS:
            raise ConfigError(f"unknown model {a.model!r}; known: {', '.join(sorted(BUILTIN_DESCRIPTORS))}")
        return [BUILTIN_DESCRIPTORS[a.model]]
    out = [
        d
        for d in BUILTIN_DESCRIPTORS.values()
        if d.openness.has_weights
        and d.params_b
        and d.name != "tiny-llama"
        and (d.openness is Openness.OPEN_SOURCE or not need_open_source)
    ]
    if a.model_size_b is not None:
        return sorted(
            out,
            key=lambda d: (abs(math.log((d.params_b or 1) / a.model_size_b)), d.openness != "open-source"),
        )
    return sorted(out, key=lambda d: -(d.params_b or 0))


def _openness_need(a: PlanAnswers) -> tuple[bool, list[str]]:
    reasons = []
    if a.licence.permissive_only:
        reasons.append("a permissive licence is required")
    if a.licence.open_data_required:
        reasons.append("the training data must be open")
    if a.licence.monthly_active_users is not None and a.licence.monthly_active_users > 700e6:
        reasons.append("the product exceeds open-weight licences' 700M monthly-user limit")
    return bool(reasons), reasons


def make_plan(a: PlanAnswers) -> Plan:
    """Walk Figure 2 for ``a``."""
    warnings: list[str] = []
    must_be_local = a.privacy != "none" or a.autonomy
    local = [s for s in a.silos if _budget(s)[0] > 0]
    need_os, os_reasons = _openness_need(a)

    if not local:
        if must_be_local:
            why = (
                "strict privacy"
                if a.privacy == "strict"
                else ("privacy" if a.privacy != "none" else "autonomy")
            )
            return Plan(
                openness=Openness.OPEN_SOURCE,
                openness_reason=(
                    f"{why} requires an open model trained locally, but no silo can run a model locally; no "
                    "configuration satisfies the requirements: give silos local compute (even a CPU with "
                    "8 GB trains SmolLM2-135M with QLoRA) or relax the requirement"
                ),
                model=None,
                model_reason="no local compute",
                silos=[
                    SiloPlan(
                        name=s.name, budget_gb=0, device="none", method="none", reason="no local compute"
                    )
                    for s in a.silos
                ],
                defenses=[],
                warnings=[f"a closed model would violate the requirement: {PRIVACY_REASON}"],
                feasible=False,
            )
        gray = a.provider_api == "finetune"
        cls = Openness.GRAY_BOX if gray else Openness.BLACK_BOX
        method = "provider-hosted LoRA/SFT" if gray else "textual prompt engineering only"
        return Plan(
            openness=cls,
            openness_reason=(
                "no silo can run a model locally and neither privacy nor autonomy is required, so only a "
                "closed model remains (paper Figure 2); "
                + ("the provider exposes fine-tuning" if gray else "only a chat API is available")
            ),
            model="hosted-finetune-api" if gray else "chat-api",
            model_reason="the team's existing provider access",
            silos=[
                SiloPlan(
                    name=s.name,
                    budget_gb=0,
                    device="none",
                    method=method,
                    reason=f"paper Table 1: a {cls.value} model allows {method}",
                )
                for s in a.silos
            ],
            defenses=[
                Recommendation(
                    item=d,
                    recommended=False,
                    reason="the provider, not the client, controls training and "
                    "aggregation, so the client cannot apply it (paper section 3, Table 4)",
                )
                for d in (
                    "differential_privacy",
                    "secure_aggregation",
                    "homomorphic_encryption",
                    "robust_aggregation",
                )
            ],
            warnings=[
                f"privacy: {PRIVACY_REASON}",
                "autonomy: the provider can change or withdraw the model; clients cannot serve it themselves",
                "federated learning adds little here: no client trains or holds model weights "
                "(paper open question 1)",
            ],
            feasible=False,
        )

    # 1. openness: local training on an open model
    candidates = _candidates(a, need_os)
    if not candidates:
        raise ConfigError("no built-in model satisfies the licence answers")
    # 2. model: the preferred candidate that every local silo can train (nobody excluded), else the smallest
    chosen: ModelDescriptor | None = None
    silo_plans: list[SiloPlan] = []
    for d in candidates:
        plans = _plan_silos(_shape(d), local, a)
        if plans is not None:
            chosen, silo_plans = d, plans
            break
    if chosen is None:
        d = min(candidates, key=lambda d: d.params_b or 0)
        chosen = d
        silo_plans = _plan_silos(_shape(d), local, a, allow_exclusion=True) or []
    for s in a.silos:
        if s not in local:
            silo_plans.append(
                SiloPlan(
                    name=s.name,
                    budget_gb=0,
                    device="none",
                    method="none",
                    reason="no local compute: this silo cannot train locally and is left out",
                )
            )
            warnings.append(f"silo {s.name} has no local compute and is excluded (paper: heterogeneity)")
    excluded = [p.name for p in silo_plans if p.method == "none"]

    cls = chosen.openness
    reasons = []
    if a.privacy != "none":
        reasons.append(
            f"{a.privacy} privacy: data must stay in the silo, so training and inference run locally"
        )
    if a.autonomy:
        reasons.append("autonomy: each client controls and serves its own model")
    if need_os:
        reasons += os_reasons
    if not reasons:
        reasons.append("local compute is available, so an open model keeps every method and defense possible")
    openness_reason = f"{cls.value}: " + "; ".join(reasons) + " (paper Figure 2)"
    model_reason = (
        f"{chosen.name} ({chosen.params_b:g}B, {chosen.licence}"
        + (", open training data" if chosen.open_training_data else "")
        + "): "
        + (
            "the model asked for"
            if a.model
            else ("closest to the requested size that " if a.model_size_b else "the largest that ")
            + ("every silo can train" if not excluded else "the most silos can train")
        )
    )
    warnings += check_licence(
        chosen,
        monthly_active_users=a.licence.monthly_active_users,
        permissive_only=a.licence.permissive_only,
        open_data_required=a.licence.open_data_required,
    )
    for lim in chosen.usage_limits:
        warnings.append(f"licence: {lim.text}")
    return Plan(
        openness=cls,
        openness_reason=openness_reason,
        model=chosen.name,
        model_reason=model_reason,
        silos=silo_plans,
        defenses=_defenses(a, silo_plans),
        warnings=warnings,
        feasible=any(p.method != "none" for p in silo_plans),
    )


def _plan_silos(
    shape: ModelShape, silos: list[SiloAnswers], a: PlanAnswers, *, allow_exclusion: bool = False
) -> list[SiloPlan] | None:
    if a.prefer_full_finetuning:
        full = [_preferred_fits(shape, s, a) for s in silos]
        if all(full):
            return [p for p in full if p is not None]
    for rank in LORA_RANKS:
        fits = [_fit(shape, s, rank, a) for s in silos]
        if all(fits):
            return [f for f in fits if f is not None]
    if not allow_exclusion:
        return None
    fits = [_fit(shape, s, LORA_RANKS[-1], a) for s in silos]
    return [
        f
        if f is not None
        else SiloPlan(
            name=s.name,
            budget_gb=round(_budget(s)[0], 1),
            device=_budget(s)[1],
            method="none",
            reason=f"even QLoRA 4-bit at rank {LORA_RANKS[-1]} with checkpointing does not fit "
            f"{_budget(s)[0]:.1f} GB for {shape.name}; this silo is left out",
        )
        for f, s in zip(fits, silos, strict=True)
    ]


def _defenses(a: PlanAnswers, plans: list[SiloPlan]) -> list[Recommendation]:
    methods = {p.method for p in plans if p.method != "none"}
    out: list[Recommendation] = []
    encrypted = a.curious_coordinator and a.privacy != "none"
    dp = a.privacy == "strict"
    out.append(
        Recommendation(
            item="differential_privacy",
            recommended=dp,
            reason=(
                "strict privacy: bound what updates reveal against membership inference and gradient "
                "inversion "
                "(paper Table 4); per-silo accountant, ε over all rounds (e.g. ε ≤ 8, δ = 1e-5)"
            )
            if dp
            else "not required by the answers; clip updates anyway so one silo's influence is bounded",
        )
    )
    out.append(
        Recommendation(
            item="secure_aggregation",
            recommended=encrypted,
            reason=(
                "the coordinator must not see any single silo's update: pairwise masks cancel in the sum "
                "(paper Table 4)"
            )
            if encrypted
            else "the coordinator may see individual updates",
        )
    )
    out.append(
        Recommendation(
            item="homomorphic_encryption",
            recommended=False,
            reason=(
                "an alternative to secure aggregation when silos drop out often: CKKS sums ciphertexts, "
                "at ~8-20× the update's size"
            )
            if encrypted
            else "not needed without a curious coordinator",
        )
    )
    robust = a.untrusted_silos and not encrypted
    if a.untrusted_silos and encrypted:
        reason = (
            "poisoning is a concern, but robust statistics (median, trimmed mean, Krum) need plaintext "
            "updates, which secure aggregation hides: bound every update's norm at the silo (client-side "
            "clipping) and rely on DP noise; the tension is inherent (design: threat model)"
        )
    elif robust:
        reason = (
            "untrusted silos may poison updates: a coordinate-wise trimmed mean bounds their influence "
            "(paper Table 4)"
        )
    else:
        reason = "all silos are trusted"
    out.append(Recommendation(item="robust_aggregation", recommended=robust, reason=reason))
    for m in sorted(methods):
        if m not in METHODS:
            continue
        for d, support in get_method(m).defenses.items():
            if support.level is not Support.FULL:
                out.append(
                    Recommendation(
                        item=f"{Defense(d).value} with {m}",
                        recommended=False,
                        reason=f"{support.level.value}: {support.reason}",
                    )
                )
    if a.objective == "dpo":
        out.append(
            Recommendation(
                item="dpo_reference_model",
                recommended=True,
                reason=(
                    "DPO's only auxiliary model is the frozen base (adapter disabled); it never leaves the "
                    "silo, so the paper's open question on protecting RLHF's reward/policy models does not "
                    "arise and "
                    "secure aggregation/encryption protect DPO updates fully"
                ),
            )
        )
    return out


# --- output ---------------------------------------------------------------------------------


def to_config(a: PlanAnswers, plan: Plan, *, data_root: str = "data") -> dict[str, Any]:
    """A federation config (mapping) implementing ``plan``; ConfigError if nothing can train locally."""
    if not plan.feasible or plan.model is None:
        raise ConfigError(f"no federation config can implement this plan: {plan.openness_reason}")
    training = [p for p in plan.silos if p.method != "none"]
    first = training[0]
    first_method = get_method(first.method)
    method = _method_of(first)
    lora = _lora_shape(first.rank or 8) if first_method.uses_lora_section else {}
    silos = []
    for p in training:
        entry: dict[str, Any] = {
            "name": p.name,
            "train_path": f"{data_root}/{p.name}/train.jsonl",
            "eval_path": f"{data_root}/{p.name}/eval.jsonl",
        }
        m = _method_of(p)
        if m != method:
            entry["method"] = m
        # A GPU silo trains on its GPU in bf16 (train.precision auto), a CPU silo on its cores in fp32.
        entry["device"] = "cuda" if p.device.startswith("GPU") else "cpu"
        silos.append(entry)
    kinds = {"differential_privacy", "secure_aggregation", "homomorphic_encryption", "robust_aggregation"}
    defenses = [d.item for d in plan.defenses if d.recommended and d.item in kinds]
    robust = any(d.item == "robust_aggregation" and d.recommended for d in plan.defenses)
    name_or_path = (
        plan.model if plan.model in ("smollm2-135m-instruct", "tiny-llama") else f"models/{plan.model}"
    )
    cfg: dict[str, Any] = {
        "federation_id": a.name,
        "rounds": 10,
        "model": {"name_or_path": name_or_path, "max_seq_len": a.seq, "descriptor": plan.model},
        **({"lora": lora} if lora else {}),
        "method": method,
        "objective": {"name": a.objective},
        "train": {
            "local_steps": 20,
            "batch_size": a.batch,
            "learning_rate": first_method.plan_learning_rate,
        },
        "silos": silos,
        "aggregation": {
            "name": "trimmed_mean",
            "options": {"trim_ratio": 0.2},
            "min_silos": max(1, len(silos) // 2 + 1),
        }
        if robust
        else {"name": "fedavg", "min_silos": max(1, len(silos) // 2 + 1)},
        "tags": {"silotune.plan.openness": plan.openness.value, "silotune.plan.defenses": ",".join(defenses)},
    }
    parse_config(cfg, source="plan")  # the written config must pass the same validation as any other
    return cfg


def _method_of(p: SiloPlan) -> dict[str, Any]:
    return {"name": p.method, "options": dict(p.options)}


def write_config(a: PlanAnswers, plan: Plan, path: str | Path) -> dict[str, Any]:
    cfg = to_config(a, plan, data_root="data")
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg
