"""Scheduled retraining: a cron-triggered deployment that starts a fresh federation from a config file."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger

from flows.federated_training import federated_training
from silotune.config import load_config, parse_config
from tasks.publish import promotion


@flow(name="scheduled-retraining", log_prints=True)
def scheduled_retraining(config_path: str, rounds: int | None = None, fresh: bool = True) -> dict[str, Any]:
    """Run the federation in ``config_path`` (a YAML file on the coordinator).

    ``fresh``: a new federation per run, id ``<federation_id>-<UTC timestamp>``, starting from the base
    model on whatever data the silos hold now; otherwise the configured id is resumed (raise ``rounds``
    to keep training it). Each run registers a new version of one registered model; it becomes the
    champion only if it beats the current one on the holdout (``tracking.promotion``), else the
    challenger. The result has ``promotion``: version, alias and reason.
    """
    cfg = load_config(config_path)
    data = cfg.model_dump(mode="json")
    if fresh:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        data["federation_id"] = f"{cfg.federation_id[: 62 - len(stamp)]}-{stamp}"
        data["tags"] = {**cfg.tags, "silotune.retraining_of": cfg.federation_id}
        # Every retraining becomes a new version of one registered model.
        data["tracking"] = {
            **data["tracking"],
            "registered_model": cfg.tracking.registered_model or f"silotune-{cfg.federation_id}",
        }
    if rounds is not None:
        data["rounds"] = rounds
    cfg = parse_config(data, source=config_path)
    logger = get_run_logger()
    logger.info("retraining: federation %s, %d round(s)", cfg.federation_id, cfg.rounds)
    out = federated_training(cfg)
    # The new version passed the promotion gate (tracking.promotion) or not: say which, and why.
    decision = promotion(cfg, out["tracking_run_id"])
    if decision is not None:
        logger.info(
            "registered version %s: %s (%s)", decision["version"], decision["alias"], decision["reason"]
        )
    return {**out, "promotion": decision}
