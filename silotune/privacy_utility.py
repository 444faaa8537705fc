"""The privacy–utility report: a grid of real federations, no DP to strong DP, with what each costs.

Pure library code: the DP recipe (chosen on validation data, never on the holdout), the grid's
federation configs, scoring a finished cell (union-holdout utility by free-running generation, and
membership inference), the table, the plots and the headline. ``flows/privacy_utility.py`` runs every
cell through the ordinary ``federated-training`` flow, reusing identical work across cells
(:mod:`silotune.reuse`): the base model's evaluation is computed once for the whole grid, and a
client-DP cell's local training (deterministic; the noise comes after) is shared with the no-DP cell
of the same method while their globals agree.

The cells: no DP; DP-SGD (the privacy unit is one training record of a silo) at each target ε;
client-level DP (the unit is a whole silo) at each target ε; each under LoRA and under FFA-LoRA.

The DP recipe follows the literature on private fine-tuning (Li et al., "Large Language Models Can Be
Strong Differentially Private Learners", ICLR 2022; Yu et al., "Differentially Private Fine-tuning of
Language Models", ICLR 2022; Sun et al., "Improving LoRA in Privacy-preserving Federated Learning"
(FFA-LoRA), ICLR 2024):

- Poisson sampling with large expected batches (``dp_batch_multiplier`` × the non-private batch) and
  fewer steps (``dp_step_fraction`` of them): the noise is added once per step, so fewer, larger
  steps put more signal under the same noise, and a small sampling rate amplifies privacy;
- the per-example clip norm is the median per-example gradient norm of the *base model* (the initial
  adapter) on validation data: large enough to keep the direction of typical gradients, small enough
  that the noise (σ·C) stays small (Andrew et al., NeurIPS 2021, clip at a quantile);
- a higher learning rate (``dp_lr_multiplier`` ×). AdamW normalises each coordinate by its own
  noisy second moment, so with few steps each one moves about ``lr`` whatever the gradient's scale:
  the learning rate sets how far the few noisy steps get. The default multiplier was chosen on the
  demo silos' validation files by ``bench/dp_recipe_search.py`` at ε 8, never on a holdout
  (``results/privacy-utility-smollm2-135m-instruct/recipe-search.md``);
- FFA-LoRA freezes A, so only B carries noise (half the noisy parameters) and sums of updates are
  exact model sums;
- client-level DP clips each silo's update at the norm of an update trained on validation data from
  the initial adapter (the typical size of an honest update, learned without private data).

Nothing is tuned on the holdout; the validation records are disjoint from training and holdout.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from silotune.adapters import AdapterModel, global_norm
from silotune.audit.mia import membership_inference
from silotune.config import FederationConfig, parse_config
from silotune.data import Example, collate, encode_dataset, per_sequence_loss, read_records
from silotune.evaluation import binary_standard_error, evaluate, generate_eval, standard_error
from silotune.records import RoundSummary
from silotune.report import figure_png
from silotune.training import train_local

PRIVACY_KINDS = ("none", "sample_dp", "client_dp")
METHODS = ("lora", "ffa_lora")
EPSILONS = (1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Recipe:
    """The DP settings the report picked, and from what."""

    sample_clip: float
    client_clip: float
    dp_batch_size: int
    dp_local_steps: int
    dp_learning_rate: float
    sample_delta: float
    client_delta: float
    validation_examples: int
    grad_norm_median: float
    grad_norm_p90: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecipeKnobs:
    """How the DP-SGD cells' schedule departs from the non-private one (see the module docstring)."""

    dp_batch_multiplier: int = 4
    dp_step_fraction: float = 0.5
    dp_lr_multiplier: float = 20.0
    validation_examples: int = 32

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.dp_batch_multiplier, int) and self.dp_batch_multiplier >= 1):
            problems.append(f"dp_batch_multiplier={self.dp_batch_multiplier!r} must be an integer >= 1")
        for name in ("dp_step_fraction", "dp_lr_multiplier"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                problems.append(f"{name}={v!r} must be a finite number > 0")
        if not (isinstance(self.validation_examples, int) and self.validation_examples >= 1):
            problems.append(f"validation_examples={self.validation_examples!r} must be an integer >= 1")
        if problems:
            raise ValueError("DP recipe: " + "; ".join(problems))


def per_example_grad_norms(
    adapter: AdapterModel, examples: Sequence[Example], state: Mapping[str, torch.Tensor]
) -> list[float]:
    """The L2 norm of each example's gradient over the adapter's trainable tensors at ``state``."""
    adapter.load_state(state)
    model = adapter.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    pad = adapter.tokenizer.pad_token_id
    norms = []
    for e in examples:
        model.zero_grad(set_to_none=True)
        batch = collate([e], pad)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss, _, _ = per_sequence_loss(out.logits, batch["labels"], with_exact=False)
        loss.sum().backward()
        norms.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None)))
    model.zero_grad(set_to_none=True)
    model.eval()
    return norms


def choose_recipe(
    config: FederationConfig,
    adapter: AdapterModel,
    validation: Sequence[str | Path],
    *,
    knobs: RecipeKnobs = RecipeKnobs(),
) -> Recipe:
    """The DP recipe for ``config``'s federation, from base-model statistics on validation data only."""
    _threads(config)
    chats = [c for p in validation for c in read_records(p)]
    # Every validation file contributes: take records round-robin so each task is represented.
    per_file = [read_records(p) for p in validation]
    mixed = [c for group in zip(*per_file, strict=False) for c in group] or chats
    examples = encode_dataset(mixed[: knobs.validation_examples], adapter.tokenizer, config.model.max_seq_len)
    init = adapter.initial_state(config.seed)
    norms = sorted(per_example_grad_norms(adapter, examples, init))
    median = statistics.median(norms)
    p90 = norms[min(len(norms) - 1, int(0.9 * len(norms)))]
    dp_batch = config.train.batch_size * knobs.dp_batch_multiplier
    dp_steps = max(1, round(config.train.local_steps * knobs.dp_step_fraction))
    dp_lr = config.train.learning_rate * knobs.dp_lr_multiplier
    # Client-level clip: the norm of an honest update learned on validation data (the same steps).
    delta, _ = train_local(
        adapter,
        init,
        encode_dataset(chats, adapter.tokenizer, config.model.max_seq_len),
        config.train,
        seed=config.seed,
        desc="client-DP clip from validation",
        progress=False,
    )
    client_clip = global_norm(delta)
    n_min = min(len(read_records(s.train_path)) for s in config.silos)
    return Recipe(
        sample_clip=round(median, 4),
        client_clip=round(client_clip, 4),
        dp_batch_size=dp_batch,
        dp_local_steps=dp_steps,
        dp_learning_rate=dp_lr,
        sample_delta=_delta_below(n_min),
        client_delta=_delta_below(len(config.silos)),
        validation_examples=len(examples),
        grad_norm_median=median,
        grad_norm_p90=p90,
        notes=(
            f"per-example clip C = median base-model gradient norm on {len(examples)} validation records "
            f"({median:.3g}; 90th percentile {p90:.3g})",
            f"DP-SGD: Poisson sampling, expected batch {dp_batch} ({knobs.dp_batch_multiplier}× the "
            f"non-private {config.train.batch_size}), {dp_steps} local steps per round (non-private "
            f"{config.train.local_steps}), learning rate {dp_lr:g} ({knobs.dp_lr_multiplier:g}×)",
            f"client-level DP: clip each silo's update at {client_clip:.3g}, the norm of an update trained "
            "on the validation records from the initial adapter",
        ),
    )


def _threads(config: FederationConfig) -> None:
    if config.train.torch_threads:  # as training does (silotune.training.train_local)
        torch.set_num_threads(config.train.torch_threads)


def _delta_below(n: int) -> float:
    """A δ below 1/n: the largest power of ten under 1/(10 n) (δ ≪ 1/n, the usual choice)."""
    return 10.0 ** math.floor(math.log10(1.0 / (10 * n)))


@dataclass(frozen=True)
class Cell:
    privacy: str  # none | sample_dp | client_dp
    method: str  # lora | ffa_lora
    epsilon: float | None
    config: FederationConfig

    @property
    def name(self) -> str:
        eps = "" if self.epsilon is None else f"-eps{self.epsilon:g}"
        return f"{self.privacy}{eps}-{self.method}".replace("_", "-")


def cell_configs(
    base: FederationConfig,
    recipe: Recipe,
    *,
    grid_id: str,
    epsilons: Sequence[float] = EPSILONS,
    methods: Sequence[str] = METHODS,
    privacies: Sequence[str] = PRIVACY_KINDS,
) -> list[Cell]:
    """One federation config per (privacy, ε, method), all from ``base`` (same seed, data, rounds)."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    for p in privacies:
        if p not in PRIVACY_KINDS:
            raise ValueError(f"unknown privacy setting {p!r}; known: {', '.join(PRIVACY_KINDS)}")
    cells = []
    for privacy in privacies:
        for eps in [None] if privacy == "none" else list(epsilons):
            for method in methods:
                data = base.model_dump(mode="json")
                train = dict(data["train"])
                priv: dict[str, Any] = {"sample_dp": None, "client_dp": None}
                if privacy == "sample_dp":
                    priv["sample_dp"] = {
                        "target_epsilon": eps,
                        "max_grad_norm": recipe.sample_clip,
                        "delta": recipe.sample_delta,
                    }
                    # The speed levers need the model's own forward on packed or trimmed rows, which
                    # Opacus cannot take; they change no loss, only speed.
                    train.update(
                        batch_size=recipe.dp_batch_size,
                        local_steps=recipe.dp_local_steps,
                        learning_rate=recipe.dp_learning_rate,
                        packing=False,
                        response_logits_only=False,
                    )
                elif privacy == "client_dp":
                    priv["client_dp"] = {
                        "target_epsilon": eps,
                        "clip_norm": recipe.client_clip,
                        "delta": recipe.client_delta,
                    }
                cell = Cell(privacy=privacy, method=method, epsilon=eps, config=base)
                data.update(
                    federation_id=f"{grid_id}-{cell.name}",
                    train=train,
                    privacy={**data["privacy"], **priv},
                    security={**data["security"], "ffa_lora": method == "ffa_lora"},
                    aggregation=_client_dp_aggregation(data["aggregation"])
                    if privacy == "client_dp"
                    else data["aggregation"],
                    tags={
                        **base.tags,
                        "silotune.kind": "privacy-utility",
                        "silotune.grid": grid_id,
                        "silotune.privacy": privacy,
                        "silotune.method": method,
                        "silotune.target_epsilon": "" if eps is None else f"{eps:g}",
                    },
                )
                cells.append(Cell(privacy=privacy, method=method, epsilon=eps, config=parse_config(data)))
    return cells


def _client_dp_aggregation(agg: dict[str, Any]) -> dict[str, Any]:
    """Client-level DP bounds each silo's share of an unweighted sum: FedAvg without example weights,
    a quorum of at least two silos."""
    options = {**agg["options"], "weighted": False} if agg["name"] == "fedavg" else agg["options"]
    return {**agg, "options": options, "min_silos": max(2, agg["min_silos"])}


@dataclass
class Scores:
    """A finished adapter on the union holdout, and the membership attacks against it."""

    loss: float
    exact_match: float
    gen_exact_match: float
    rouge_l: float
    chrf: float
    mia_loss_auc: float
    mia_loss_tpr: float
    mia_ref_auc: float
    mia_ref_tpr: float
    num_holdout: int
    num_members: int
    # Standard errors of the union means (reports written before they existed load with None).
    exact_match_se: float | None = None
    rouge_l_se: float | None = None


def score_adapter(
    config: FederationConfig,
    adapter: AdapterModel,
    state: Mapping[str, torch.Tensor],
    *,
    holdouts: Sequence[str | Path],
    members: Sequence[str | Path],
    mia_examples: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
) -> Scores:
    """Union-holdout utility (teacher-forced and free-running) and membership inference against the
    training records in ``members`` (holdout records as non-members), ``mia_examples`` each."""
    _threads(config)
    msl = config.model.max_seq_len
    held = encode_dataset([c for p in holdouts for c in read_records(p)], adapter.tokenizer, msl)
    tf = evaluate(adapter, held, batch_size=batch_size, state=state)
    gen = generate_eval(adapter, held, max_new_tokens=max_new_tokens, batch_size=batch_size)
    pool = [c for p in members for c in read_records(p)]
    member_chats = random.Random(seed).sample(pool, min(mia_examples, len(pool)))
    nonmembers = random.Random(seed + 1).sample(held, min(mia_examples, len(held)))
    mia = membership_inference(
        adapter,
        state,
        encode_dataset(member_chats, adapter.tokenizer, msl),
        nonmembers,
        batch_size=batch_size,
    )
    return Scores(
        loss=tf.loss,
        exact_match=tf.exact_match,
        gen_exact_match=gen.exact_match,
        rouge_l=gen.rouge_l,
        chrf=gen.chrf,
        mia_loss_auc=mia["loss"].auc,
        mia_loss_tpr=mia["loss"].tpr_at_1pct_fpr,
        mia_ref_auc=mia["reference"].auc,
        mia_ref_tpr=mia["reference"].tpr_at_1pct_fpr,
        num_holdout=len(held),
        num_members=len(member_chats),
        exact_match_se=binary_standard_error(tf.exact_match, len(held)),
        rouge_l_se=standard_error(gen.per_example_rouge_l),
    )


@dataclass
class Row:
    """One cell (or baseline) of the report."""

    name: str
    privacy: str
    method: str
    target_epsilon: float | None
    scores: Scores
    epsilon_spent: float | None = None
    seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    tokens: int = 0
    rounds: int = 0
    per_round: dict[str, list[float]] = field(default_factory=dict)

    def flat(self, *, exact: bool = False) -> dict[str, Any]:
        """The row as one flat record, rounded for the CSV; ``exact`` keeps every value as it is (the
        JSON, so a table re-rendered from it matches the first one)."""

        def rnd(v: float, digits: int) -> float:
            return v if exact else round(v, digits)

        s = asdict(self.scores)
        return {
            "name": self.name,
            "privacy": self.privacy,
            "method": self.method,
            "target_epsilon": "" if self.target_epsilon is None else self.target_epsilon,
            "epsilon_spent": "" if self.epsilon_spent is None else rnd(self.epsilon_spent, 3),
            **{k: rnd(v, 4) if isinstance(v, float) else v for k, v in s.items()},
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "tokens": self.tokens,
            "rounds": self.rounds,
            "seconds": rnd(self.seconds, 1),
        }


def round_costs(history: Sequence[RoundSummary]) -> dict[str, list[float]]:
    """Per round: ε spent so far (the largest over silos; DP-SGD or client-level), bytes up and down
    (all silos), and training seconds (the slowest silo and the sum)."""
    out: dict[str, list[float]] = {"epsilon": [], "bytes_up": [], "bytes_down": [], "train_seconds": []}
    for h in history:
        eps = [pv["dp.epsilon"] for pv in h.privacy.values() if "dp.epsilon" in pv]
        if h.client_dp_epsilon is not None:
            eps.append(h.client_dp_epsilon)
        out["epsilon"].append(max(eps) if eps else math.nan)
        out["bytes_up"].append(float(sum(b.up for b in h.bytes.values())))
        out["bytes_down"].append(float(sum(b.down for b in h.bytes.values())))
        # Under DP or protection a silo's release policy withholds its training metrics (seconds
        # included) by default: NaN, not 0.
        secs = [t["seconds"] for t in h.train.values() if "seconds" in t]
        out["train_seconds"].append(float(sum(secs)) if secs else math.nan)
    return out


def make_row(
    name: str,
    privacy: str,
    method: str,
    target_epsilon: float | None,
    scores: Scores,
    history: Sequence[RoundSummary],
    seconds: float,
) -> Row:
    costs = round_costs(history)
    spent = [e for e in costs["epsilon"] if not math.isnan(e)]
    return Row(
        name=name,
        privacy=privacy,
        method=method,
        target_epsilon=target_epsilon,
        scores=scores,
        epsilon_spent=spent[-1] if spent else None,
        seconds=seconds,
        bytes_up=int(sum(costs["bytes_up"])),
        bytes_down=int(sum(costs["bytes_down"])),
        tokens=sum(int(t.get("tokens", 0)) for h in history for t in h.train.values()),
        rounds=len(history),
        per_round=costs,
    )


# --- targets, table, plots -------------------------------------------------------------------------


def _get(
    rows: Sequence[Row], privacy: str, method: str | None = None, eps: float | None = None
) -> Row | None:
    for r in rows:
        if r.privacy == privacy and (method is None or r.method == method) and r.target_epsilon == eps:
            return r
    return None


def kept_gain(row: Row, nodp: Row, base: Row, metric: str) -> float | None:
    """The share of the non-private gain over the base model that ``row`` keeps on ``metric``."""
    gain = getattr(nodp.scores, metric) - getattr(base.scores, metric)
    if gain <= 0:
        return None
    return (getattr(row.scores, metric) - getattr(base.scores, metric)) / gain


def kept_gain_se(row: Row, nodp: Row, base: Row, metric: str) -> float | None:
    """Standard error of :func:`kept_gain` (first-order, the three rows' errors independent); None when
    a row has no standard error for ``metric`` or there is no gain."""
    k = kept_gain(row, nodp, base, metric)
    ses = [getattr(r.scores, f"{metric}_se", None) for r in (row, nodp, base)]
    if k is None or any(se is None for se in ses):
        return None
    gain = getattr(nodp.scores, metric) - getattr(base.scores, metric)
    s_row, s_nodp, s_base = ses
    return math.sqrt(s_row**2 + (k * s_nodp) ** 2 + ((1 - k) * s_base) ** 2) / gain


def targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was reached."""
    out: list[dict[str, Any]] = []
    base = _get(rows, "base")
    locals_ = [r for r in rows if r.privacy == "local-only"]
    for method in METHODS:
        fed = _get(rows, "none", method)
        if fed is None:
            continue
        # The method's own centralized run; reports written before there was one per method have one
        # plain-LoRA row.
        cen = _get(rows, "centralized", method) or _get(rows, "centralized")
        if cen is not None:
            for metric in ("exact_match", "rouge_l"):
                c = getattr(cen.scores, metric)
                v = getattr(fed.scores, metric) / c if c else math.nan
                out.append(
                    {
                        "target": f"federated ({method}) ≥ 95% of centralized ({cen.method}), union {metric}",
                        "value": v,
                        "reached": v >= 0.95,
                    }
                )
        if locals_:
            best = max(locals_, key=lambda r: r.scores.exact_match)
            out.append(
                {
                    "target": f"federated ({method}) above every local-only model (union exact match)",
                    "value": fed.scores.exact_match - best.scores.exact_match,
                    "reached": fed.scores.exact_match > best.scores.exact_match,
                }
            )
        dp8 = _get(rows, "sample_dp", method, 8.0)
        if dp8 is not None and base is not None:
            for metric in ("exact_match", "rouge_l"):
                k = kept_gain(dp8, fed, base, metric)
                out.append(
                    {
                        "target": f"DP-SGD ε=8 ({method}) keeps ≥ 90% of the non-private gain, {metric}",
                        "value": math.nan if k is None else k,
                        "se": kept_gain_se(dp8, fed, base, metric),
                        "reached": k is not None and k >= 0.9,
                    }
                )
            auc = dp8.scores.mia_ref_auc
            out.append(
                {
                    "target": f"DP-SGD ε=8 ({method}): MIA AUC ≤ 0.55 (reference attack)",
                    "value": auc,
                    "reached": auc <= 0.55,
                }
            )
    return out


CSV_FIELDS = (
    "name",
    "privacy",
    "method",
    "target_epsilon",
    "epsilon_spent",
    "loss",
    "exact_match",
    "exact_match_se",
    "gen_exact_match",
    "rouge_l",
    "rouge_l_se",
    "chrf",
    "mia_loss_auc",
    "mia_loss_tpr",
    "mia_ref_auc",
    "mia_ref_tpr",
    "num_holdout",
    "num_members",
    "bytes_up",
    "bytes_down",
    "tokens",
    "rounds",
    "seconds",
)


def to_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    w.writeheader()
    w.writerows(r.flat() for r in rows)
    return buf.getvalue()


def _train_seconds(row: Row) -> str:
    if not row.per_round.get("train_seconds"):  # the base model: nothing trained
        return ""
    secs = [v for v in row.per_round["train_seconds"] if not math.isnan(v)]
    if not secs:
        return "withheld"
    return f"{sum(secs):.0f}"


def _pm(value: float, se: float | None) -> str:
    return f"{value:.3f}" if se is None else f"{value:.3f} ± {se:.3f}"


def to_markdown(rows: Sequence[Row], *, title: str, recipe: Recipe | None, notes: Sequence[str] = ()) -> str:
    lines = [
        f"# {title}",
        "",
        "Union holdout (unseen entities and phrasings). EM: teacher-forced exact match; gen EM, ROUGE-L, "
        "chrF: free-running greedy generation with the chat template. MIA: membership inference "
        "(loss attack; reference attack = base model as reference), ROC AUC and TPR at 1% FPR. "
        "± is one standard error of the mean over the holdout records: two rows whose difference is "
        "under about twice the larger ± are within the holdout's sampling noise. train s: the silos' "
        "training seconds summed over rounds (from the federation's history, so a resumed cell keeps its "
        "own; 'withheld' where the silos' release policies keep training metrics in under DP); "
        "wall s: this invocation's seconds for the cell, evaluation and audit included.",
        "",
        "| cell | ε target | ε spent | loss | EM | gen EM | ROUGE-L | chrF | MIA loss AUC / TPR | "
        "MIA ref AUC / TPR | MB up / down | train s / wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.scores
        lines.append(
            f"| {r.name} | {'' if r.target_epsilon is None else f'{r.target_epsilon:g}'} "
            f"| {'' if r.epsilon_spent is None else f'{r.epsilon_spent:.2f}'} | {s.loss:.3f} "
            f"| {_pm(s.exact_match, s.exact_match_se)} | {s.gen_exact_match:.3f} "
            f"| {_pm(s.rouge_l, s.rouge_l_se)} | {s.chrf:.1f} "
            f"| {s.mia_loss_auc:.3f} / {s.mia_loss_tpr:.3f} | {s.mia_ref_auc:.3f} / {s.mia_ref_tpr:.3f} "
            f"| {r.bytes_up / 1e6:.2f} / {r.bytes_down / 1e6:.2f} "
            f"| {_train_seconds(r)} / {r.seconds:.0f} |"
        )
    lines += [
        "",
        "Membership inference: members are training records, non-members holdout records. The holdout "
        "uses entities and phrasings no training record has, so the loss attack also separates the two "
        "by that shift (the base model's row shows how much, with no training at all); the reference "
        "attack subtracts the base model's loss per record, which calibrates the shift away, and is the "
        "one the target reads.",
    ]
    tg = targets(rows)
    if tg:
        lines += ["", "## Targets", "", "| target | measured | reached |", "|---|---|---|"]
        for t in tg:
            v = t["value"]
            lines.append(
                f"| {t['target']} | {_pm(v, t.get('se'))} | {'yes' if t['reached'] else '**no**'} |"
            )
    if recipe is not None:
        lines += ["", "## DP recipe (chosen on validation data only)", ""]
        lines += [f"- {n}" for n in recipe.notes]
        lines += [
            f"- δ: {recipe.sample_delta:g} per record (DP-SGD), {recipe.client_delta:g} per silo (client DP)"
        ]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_frontier(rows: Sequence[Row], *, title: str) -> bytes:
    """Utility against ε (one line per privacy kind and method) beside the MIA AUC against ε; PNG."""
    import matplotlib  # ~0.4 s to import: only the tasks and commands that plot pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), so no display backend is needed

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("exact_match", "union exact match"), ("rouge_l", "union ROUGE-L (generated)"))
    for ax, (metric, label) in zip(axes[:2], panels, strict=False):
        for privacy in ("sample_dp", "client_dp"):
            for method in METHODS:
                cell = sorted(
                    (
                        r
                        for r in rows
                        if r.privacy == privacy and r.method == method and r.target_epsilon is not None
                    ),
                    key=lambda r: r.target_epsilon or 0.0,
                )
                if cell:  # ± one standard error where the report has them (older reports: none)
                    ses = [getattr(r.scores, f"{metric}_se") for r in cell]
                    ax.errorbar(
                        [r.target_epsilon for r in cell],
                        [getattr(r.scores, metric) for r in cell],
                        yerr=None if None in ses else ses,
                        marker="o",
                        capsize=3,
                        label=f"{privacy} {method}",
                    )
        for ref, style in (("none", "-"), ("centralized", "--"), ("base", ":")):
            for r in rows:
                if r.privacy == ref:
                    value, se = getattr(r.scores, metric), getattr(r.scores, f"{metric}_se")
                    line = ax.axhline(
                        value,
                        linestyle=style,
                        linewidth=1,
                        color="black" if ref != "none" else None,
                        label=f"{r.name}",
                    )
                    if se and ref != "base":
                        ax.axhspan(value - se, value + se, color=line.get_color(), alpha=0.08)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("target ε")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    ax = axes[2]
    for privacy in ("sample_dp", "client_dp"):
        for method in METHODS:
            pts = sorted(
                (r.target_epsilon, r.scores.mia_ref_auc)
                for r in rows
                if r.privacy == privacy and r.method == method and r.target_epsilon is not None
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{privacy} {method}")
    for r in rows:
        if r.privacy == "none":
            ax.axhline(r.scores.mia_ref_auc, linewidth=1, label=r.name)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("target ε")
    ax.set_ylabel("MIA AUC (reference attack)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    eps = sorted({r.target_epsilon for r in rows if r.target_epsilon is not None})
    for ax in axes:
        if eps:
            ax.set_xticks(eps)
            ax.set_xticklabels([f"{e:g}" for e in eps])
            ax.minorticks_off()
    return figure_png(fig, plt, title=title)


def plot_round_costs(rows: Sequence[Row], *, title: str) -> bytes:
    """ε spent, bytes up/down and training seconds per round, one line per cell; PNG."""
    import matplotlib  # ~0.4 s to import: only the tasks and commands that plot pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), so no display backend is needed

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in rows:
        pr = r.per_round
        if not pr or not pr.get("bytes_up"):  # the base model: no rounds
            continue
        xs = list(range(1, len(pr["epsilon"]) + 1))
        if any(not math.isnan(e) for e in pr["epsilon"]):
            axes[0].plot(xs, pr["epsilon"], marker="o", label=r.name)
        axes[1].plot(xs, [b / 1e6 for b in pr["bytes_up"]], marker="o", label=f"{r.name} up")
        if any(not math.isnan(t) for t in pr["train_seconds"]):  # not withheld by the silos' policies
            axes[2].plot(xs, pr["train_seconds"], marker="o", label=r.name)
    for ax, label in zip(
        axes, ("ε spent so far", "MB uploaded (all silos)", "training s (all silos)"), strict=True
    ):
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5)
    return figure_png(fig, plt, title=title)


def write_results(
    rows: Sequence[Row], out: Path, *, title: str, recipe: Recipe | None, notes: Sequence[str] = ()
) -> dict[str, Path]:
    """``privacy_utility.{csv,md,json}``, ``frontier.png`` and ``round_costs.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out / "privacy_utility.csv",
        "markdown": out / "privacy_utility.md",
        "json": out / "privacy_utility.json",
        "frontier": out / "frontier.png",
        "round_costs": out / "round_costs.png",
    }
    paths["csv"].write_text(to_csv(rows))
    paths["markdown"].write_text(to_markdown(rows, title=title, recipe=recipe, notes=notes))
    paths["json"].write_text(
        json.dumps(
            _strict(
                {
                    "title": title,
                    "rows": [{**r.flat(exact=True), "per_round": r.per_round} for r in rows],
                    "targets": targets(rows),
                    "recipe": asdict(recipe) if recipe else None,
                    "notes": list(notes),
                }
            ),
            indent=2,
            default=str,
            allow_nan=False,
        )
    )
    paths["frontier"].write_bytes(plot_frontier(rows, title=title))
    paths["round_costs"].write_bytes(plot_round_costs(rows, title=title))
    return paths


def _strict(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None: strict JSON (RFC 8259) has no NaN, and a
    value that is not there (ε of a round without DP, seconds the silos withheld) reads as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _number(value: Any) -> float:
    """A number of a written report; null (strict JSON's "not there") reads back as NaN."""
    return math.nan if value is None else float(value)


def rows_from_json(path: str | Path) -> tuple[list[Row], Recipe | None, list[str], str]:
    """The rows, recipe, notes and title of a written ``privacy_utility.json`` (to re-render the table
    and plots without rerunning the grid)."""
    data = json.loads(Path(path).read_text())
    rows = []
    for r in data["rows"]:
        scores = Scores(
            **{
                f: _number(r[f]) if r[f] is None and not f.endswith("_se") else r[f]  # an s.e. may be absent
                for f in Scores.__dataclass_fields__
                if f in r
            }
        )
        if "exact_match_se" not in r:  # written before there were standard errors: 0/1, so derivable
            scores.exact_match_se = binary_standard_error(scores.exact_match, scores.num_holdout)
        rows.append(
            Row(
                name=r["name"],
                privacy=r["privacy"],
                method=r["method"],
                target_epsilon=None if r["target_epsilon"] == "" else float(r["target_epsilon"]),
                scores=scores,
                epsilon_spent=None if r["epsilon_spent"] == "" else float(r["epsilon_spent"]),
                seconds=_number(r["seconds"]),
                bytes_up=int(r["bytes_up"]),
                bytes_down=int(r["bytes_down"]),
                tokens=int(r["tokens"]),
                rounds=int(r["rounds"]),
                per_round={k: [_number(v) for v in vs] for k, vs in r.get("per_round", {}).items()},
            )
        )
    rec = data.get("recipe")
    recipe = Recipe(**{**rec, "notes": tuple(rec.get("notes", ()))}) if rec else None
    return rows, recipe, list(data.get("notes", [])), data["title"]


def dp_cost_line(model: str, *search: Path) -> str:
    """One line on what DP costs, from a privacy–utility report if one exists (``results/`` or the
    given folders), else how to produce one."""
    candidates = [
        Path("results") / f"privacy-utility-{model}",
        *(Path(p) / "privacy-utility" for p in search),
    ]
    for folder in candidates:
        p = folder / "privacy_utility.json"
        if not p.is_file():
            continue
        data = json.loads(p.read_text())
        rows = {(r["privacy"], r["method"], str(r["target_epsilon"])): r for r in data["rows"]}
        nodp = rows.get(("none", "ffa_lora", "")) or rows.get(("none", "lora", ""))
        dps = sorted(
            (r for r in data["rows"] if r["privacy"] == "sample_dp"),
            key=lambda r: (-float(r["target_epsilon"]), r["method"] != "ffa_lora"),
        )
        if nodp and dps:
            d = {k: _number(v) if v is None else v for k, v in dps[0].items()}
            nodp = {k: _number(v) if v is None else v for k, v in nodp.items()}
            return (
                f"what DP would cost (from {p}): DP-SGD at ε={float(d['target_epsilon']):g} ({d['method']}) "
                f"gives union exact match {d['exact_match']:.3f} vs {nodp['exact_match']:.3f} without DP, "
                f"ROUGE-L {d['rouge_l']:.3f} vs {nodp['rouge_l']:.3f}; MIA AUC {d['mia_ref_auc']:.3f}"
            )
    return (
        "what DP would cost: run `silotune report privacy-utility CONFIG` (DP-SGD and client-level DP at "
        "ε 1-8, LoRA and FFA-LoRA, with membership inference) on this federation's config"
    )
