"""The privacy–utility report: no DP, DP-SGD and client-level DP at each ε, under LoRA and FFA-LoRA.

Control flow only: each cell is a run of the ordinary ``federated-training`` flow (inspectable,
resumable, tracked like any federation); identical local work is computed once across the cells
(:mod:`silotune.reuse`, as in the robustness grid). The centralized and local-only baselines
(:mod:`silotune.baselines`) and the base model join the table. Each finished adapter is scored on the
union holdout and attacked by membership inference; the table, plots and MLflow/Prefect publication
come from the library and one task.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.federated_training import federated_training
from silotune.baselines import centralized_config, local_only_config, pool_training_data
from silotune.config import FederationConfig
from silotune.privacy_utility import (
    EPSILONS,
    METHODS,
    PRIVACY_KINDS,
    cell_configs,
    make_row,
    write_results,
)
from tasks import runtime
from tasks.privacy_utility import choose_dp_recipe, publish_report, score


@flow(name="privacy-utility", flow_run_name="privacy-utility-{config.federation_id}", log_prints=True)
def privacy_utility(
    config: FederationConfig,
    out: str,
    validation: list[str],
    epsilons: list[float] | None = None,
    methods: list[str] | None = None,
    privacies: list[str] | None = None,
    baselines: bool = True,
    local_only: bool = True,
    mia_examples: int = 100,
    max_new_tokens: int = 64,
    notes: list[str] | None = None,
    validation_examples: int = 32,
    recipe_knobs: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run every cell and the baselines from ``config``; write the report under ``out``."""
    logger = get_run_logger()
    grid_id = f"pu-{config.federation_id}"
    title = f"Privacy–utility frontier ({config.model.name_or_path})"
    recipe = choose_dp_recipe(config, validation, validation_examples, recipe_knobs)
    logger.info("DP recipe: %s", "; ".join(recipe.notes))
    cells = cell_configs(
        config,
        recipe,
        grid_id=grid_id,
        epsilons=epsilons or list(EPSILONS),
        methods=methods or list(METHODS),
        privacies=privacies or list(PRIVACY_KINDS),
    )
    holdouts = [s.eval_path for s in config.silos if s.eval_path]
    members = [s.train_path for s in config.silos]
    memo = runtime.work_memo(grid_id)
    assert memo is not None
    rows = []
    try:
        t0 = time.perf_counter()
        base = score(config, "base", None, holdouts, members, mia_examples, max_new_tokens)
        rows.append(make_row("base model", "base", "-", None, base, [], time.perf_counter() - t0))
        runs: list[tuple[str, str, str, float | None, FederationConfig]] = [
            (c.name, c.privacy, c.method, c.epsilon, c.config) for c in cells
        ]
        if baselines:
            pooled = pool_training_data(config, Path(out) / "work" / "pooled" / "train.jsonl")
            for m in methods or list(METHODS):  # each method against its own centralized run
                # lora: FFA-LoRA explicitly off only if the recipe turned it on (else its config as is)
                ffa = True if m == "ffa_lora" else (False if config.ffa_lora else None)
                cen = centralized_config(config, pooled, ffa_lora=ffa)
                name = "centralized" if m == "lora" else f"centralized {m}"
                runs.append((name, "centralized", m, None, cen))
            runs += [
                (f"local-only {s.name}", "local-only", "lora", None, local_only_config(config, s.name))
                for s in (config.silos if local_only else [])
            ]
        for i, (name, privacy, method, eps, cfg) in enumerate(runs, start=1):
            t0 = time.perf_counter()
            res = federated_training(cfg, grid_id)
            scores = score(cfg, name, res["global_key"], holdouts, members, mia_examples, max_new_tokens)
            rows.append(
                make_row(name, privacy, method, eps, scores, res["history"], time.perf_counter() - t0)
            )
            logger.info(
                "cell %d/%d %s: union EM %.3f, ROUGE-L %.3f, MIA AUC %.3f / %.3f (%.0f s)",
                i,
                len(runs),
                name,
                scores.exact_match,
                scores.rouge_l,
                scores.mia_loss_auc,
                scores.mia_ref_auc,
                rows[-1].seconds,
            )
            # The table so far, after every cell: a grid stopped early still leaves what it measured.
            write_results(rows, Path(out), title=f"{title} (partial: {i} of {len(runs)})", recipe=recipe)
    finally:
        runtime.drop_work_memo(grid_id)
    memo_stats = memo.stats()
    all_notes = [
        f"model {config.model.name_or_path}; {config.rounds} round(s) × {config.train.local_steps} local "
        f"steps × batch {config.train.batch_size}, lr {config.train.learning_rate:g} (non-private cells); "
        f"LoRA r={config.lora.r} on {','.join(config.lora.target_modules)}; {len(config.silos)} silos.",
        f"membership inference: {mia_examples} training records (members) vs {mia_examples} holdout records.",
        "identical local work was computed once and reused across cells (silotune.reuse, keyed by the sha256 "
        f"of every input): {memo_stats['hits']} reuses, {memo_stats['misses']} computations.",
        *(notes or []),
    ]
    pub = publish_report(
        rows,
        out,
        title=title,
        recipe=recipe,
        notes=all_notes,
        tracking=config.tracking,
        grid_id=grid_id,
    )
    return {"rows": [r.flat() for r in rows], "recipe": asdict(recipe), "memo": memo_stats, **pub}
