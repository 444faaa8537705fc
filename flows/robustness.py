"""The robustness grid: every attack × every aggregation rule, each cell a real federation.

Control flow only: each cell is a run of the ordinary ``federated-training``
flow (so a cell can be inspected, resumed and tracked like any federation);
the backdoor cells get a backdoor-success evaluation; the table, plot and
MLflow/Prefect publication come from the library and one task.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.federated_training import federated_training
from silotune.robustness import (
    BACKDOOR_ATTACKS,
    BACKDOOR_TARGET,
    BACKDOOR_TRIGGER,
    MALICIOUS,
    MODEL_POISONING,
    PRESETS,
    GridRow,
    grid_configs,
    row_from_history,
)
from tasks import runtime
from tasks.audit import backdoor_eval
from tasks.robustness import publish_grid


@flow(name="robustness-grid", flow_run_name="robustness-{model}", log_prints=True)
def robustness_grid(
    out: str,
    model: str = "tiny-llama",
    attacks: list[str] | None = None,
    rules: list[str] | None = None,
    rounds: int | None = None,
    local_steps: int | None = None,
) -> dict[str, Any]:
    """Run the grid on 4 demo silos (1 malicious: ``mallory``) and publish the results table and plot."""
    logger = get_run_logger()
    if model not in PRESETS:
        raise ValueError(f"no grid preset for model {model!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[model]
    if rounds is not None or local_steps is not None:
        preset = replace(
            preset, rounds=rounds or preset.rounds, local_steps=local_steps or preset.local_steps
        )
    attacks = list(attacks or preset.attacks)
    rules = list(rules or preset.rules)
    grid_id = f"grid-{model}-r{preset.rounds}-s{preset.local_steps}"
    cells = grid_configs(Path(out), model=model, preset=preset, attacks=attacks, rules=rules, grid_id=grid_id)
    # Identical local work across cells (honest silos' training from the same global, evaluations of the
    # same adapter) runs once: every cell is still a full federation, with its own store objects and run.
    memo = runtime.work_memo(grid_id)
    assert memo is not None
    try:
        rows = _run_cells(cells, attacks, logger, reuse=grid_id)
    finally:
        runtime.drop_work_memo(grid_id)
    memo_stats = memo.stats()
    logger.info("reused local work: %s", memo_stats)
    notes = _notes(model, preset, attacks, memo_stats)
    pub = publish_grid(
        rows,
        out,
        title=f"Robustness grid ({model})",
        notes=notes,
        tracking=cells[0].config.tracking,
        grid_id=grid_id,
    )
    return {"rows": [r.__dict__ for r in rows], "memo": memo_stats, **pub}


def _run_cells(cells: list[Any], attacks: list[str], logger: Any, *, reuse: str) -> list[GridRow]:
    rows: list[GridRow] = []
    for i, cell in enumerate(cells, start=1):
        t0 = time.perf_counter()
        res = federated_training(cell.config, reuse)
        row = row_from_history(cell.attack, cell.rule, res["history"], res["initial_eval"], 0.0)
        if cell.attack in BACKDOOR_ATTACKS or (
            cell.attack == "none" and cell.rule == "fedavg" and set(BACKDOOR_ATTACKS) & set(attacks)
        ):
            bd = backdoor_eval(cell.config, BACKDOOR_TRIGGER, BACKDOOR_TARGET)
            row.backdoor_success = bd["attack_success_rate"]
            row.backdoor_false_trigger = bd["false_trigger_rate"]
            row.backdoor_target_loss = bd["target_loss_triggered"]
        row.seconds = time.perf_counter() - t0
        rows.append(row)
        logger.info(
            "cell %d/%d %s × %s: union loss %.4f, EM %.3f (%.0f s)",
            i,
            len(cells),
            cell.attack,
            cell.rule,
            row.union_loss,
            row.union_exact_match,
            row.seconds,
        )
    return rows


def _notes(model: str, preset: Any, attacks: list[str], memo_stats: dict[str, int]) -> list[str]:
    return [
        f"model {model}; {preset.rounds} round(s) × {preset.local_steps} local steps × "
        f"batch {preset.batch_size}, "
        f"lr {preset.learning_rate}; LoRA r=8 on {','.join(preset.target_modules)}; "
        f"data scale {preset.data_scale}.",
        f"4 silos: clinic, bank, lab (honest, with holdouts) and {MALICIOUS} (other half of the clinic data, "
        "no holdout), which runs the row's attack; 'none' = all honest.",
        "union holdout = clinic + bank + lab holdouts (the honest silos').",
        "multi_krum runs with f=0 and keeps 3 of 4 updates: Krum's guarantee needs n >= 2f+3, so with 4 "
        "silos f=1 is refused by its validation.",
        f"model-poisoning attacks: {', '.join(a for a in attacks if a in MODEL_POISONING)}; "
        f"gaussian std {preset.gaussian_std}; sign_flip scale 4; scale factor 10.",
        "identical local work was computed once and reused across cells (silotune.reuse, keyed by the sha256 "
        f"of every input): {memo_stats['hits']} reuses, {memo_stats['misses']} computations.",
    ]
