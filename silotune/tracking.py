"""The tracking seam: what a federation reports, independent of the backend.

``MlflowTracker`` uses the stateless ``MlflowClient`` API (no active-run globals),
so any process that knows the run id can log to it: the coordinator, a resumed
coordinator, or a silo registering the final adapter. One parent run per
federation; one nested run per round.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

from silotune.config import FederationConfig, PromotionSpec, TrackingSpec
from silotune.crypto.ckks import ckks_preset
from silotune.links import require_secure
from silotune.promotion import ALIAS_TAG, CHAMPION, REASON_TAG, decide
from silotune.records import Evaluation, RoundSummary


class Tracker(Protocol):
    def start(self, config: FederationConfig, run_id: str | None) -> str | None: ...

    def log_initial(self, run_id: str | None, metrics: Mapping[str, float]) -> None: ...

    def log_round(self, run_id: str | None, round_: int, summary: RoundSummary) -> None: ...

    def log_file(self, run_id: str | None, path: Path, artifact_path: str | None = None) -> None: ...

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None: ...

    def log_folder(self, run_id: str | None, folder: Path, artifact_path: str) -> None: ...

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None: ...

    def run_url(self, run_id: str | None) -> str | None: ...

    def register_adapter(
        self,
        run_id: str | None,
        artifact_path: str,
        name: str,
        tags: Mapping[str, str],
        promotion: PromotionSpec | None = None,
        kind: str = "lora-adapter",
    ) -> str | None: ...


class NullTracker:
    """Tracks nothing (``tracking.kind: none``)."""

    def start(self, config: FederationConfig, run_id: str | None) -> str | None:
        return None

    def log_initial(self, run_id: str | None, metrics: Mapping[str, float]) -> None:
        return None

    def log_round(self, run_id: str | None, round_: int, summary: RoundSummary) -> None:
        return None

    def log_file(self, run_id: str | None, path: Path, artifact_path: str | None = None) -> None:
        return None

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        return None

    def log_folder(self, run_id: str | None, folder: Path, artifact_path: str) -> None:
        return None

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        return None

    def run_url(self, run_id: str | None) -> str | None:
        return None

    def register_adapter(
        self,
        run_id: str | None,
        artifact_path: str,
        name: str,
        tags: Mapping[str, str],
        promotion: PromotionSpec | None = None,
        kind: str = "lora-adapter",
    ) -> str | None:
        return None


def _flatten(prefix: str, d: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            out[f"{prefix}{k}"] = float(v)
    return out


def initial_metrics(initial: Evaluation | None) -> dict[str, float]:
    """The initial global adapter's holdout metrics, logged at step 0 (``global.*``, ``silo.<s>.eval.*``)."""
    if initial is None:
        return {}
    metrics = _flatten("global.", initial.global_eval.as_dict()) if initial.global_eval else {}
    for silo, ev in initial.eval.items():
        metrics.update(_flatten(f"silo.{silo}.eval.", ev.as_dict()))
    return metrics


def round_metrics(summary: RoundSummary) -> dict[str, float]:
    """A round's metrics at its step: global and per-silo holdout, training, privacy, bytes, round counts.

    Non-finite values are left out (MLflow refuses them).
    """
    metrics: dict[str, float] = {}
    if summary.global_eval is not None:
        metrics.update(_flatten("global.", summary.global_eval.as_dict()))
    for silo, tr in summary.train.items():
        metrics.update(_flatten(f"silo.{silo}.train.", tr))
    for silo, ev in summary.eval.items():
        metrics.update(_flatten(f"silo.{silo}.eval.", ev.as_dict()))
    for silo, pv in summary.privacy.items():
        metrics.update(_flatten(f"silo.{silo}.", pv))
    for silo, b in summary.bytes.items():
        metrics.update(_flatten(f"silo.{silo}.bytes_", b.model_dump()))
    if summary.client_dp_epsilon is not None:
        metrics["client_dp.epsilon"] = float(summary.client_dp_epsilon)
    metrics["round.included_silos"] = float(len(summary.included))
    metrics["round.excluded_silos"] = float(len(summary.excluded))
    if summary.delta_norm is not None:
        metrics["round.delta_norm"] = float(summary.delta_norm)
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


class MlflowTracker:
    def __init__(self, spec: TrackingSpec) -> None:
        # mlflow takes ~1 s to import; every worker imports this module, most with no tracking server
        from mlflow.tracking import MlflowClient

        self.spec = spec
        if spec.uri.startswith("sqlite:///"):
            Path(spec.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if spec.uri.startswith(("http://", "https://")):
            require_secure(spec.uri, "tracking.uri")  # across hosts only HTTPS
        self.client = MlflowClient(tracking_uri=spec.uri)

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.spec.experiment)
        if exp is not None:
            return str(exp.experiment_id)
        location = None
        if not self.spec.uri.startswith(("http://", "https://")):
            root = Path(self.spec.artifact_root).resolve()
            root.mkdir(parents=True, exist_ok=True)
            location = root.as_uri()
        return str(self.client.create_experiment(self.spec.experiment, artifact_location=location))

    def start(self, config: FederationConfig, run_id: str | None) -> str | None:
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {
            "silotune.federation_id": config.federation_id,
            "silotune.fingerprint": config.fingerprint(),
            "mlflow.runName": config.federation_id,
            **config.tags,
        }
        run = self.client.create_run(self._experiment_id(), tags=tags)
        rid = run.info.run_id
        params = {
            "rounds": config.rounds,
            "seed": config.seed,
            "model": config.model.name_or_path,
            "lora.r": config.lora.r,
            "lora.alpha": config.lora.alpha,
            "lora.targets": ",".join(config.lora.target_modules),
            "method": config.method.name,
            "objective": config.objective.name,
            "silo_methods": ",".join(f"{s.name}={config.method_for(s.name).name}" for s in config.silos),
            "train.local_steps": config.train.local_steps,
            "train.batch_size": config.train.batch_size,
            "train.learning_rate": config.train.learning_rate,
            "aggregator": config.aggregation.name,
            "server_optimizer": config.aggregation.server_optimizer,
            "min_silos": config.aggregation.min_silos,
            "silos": ",".join(s.name for s in config.silos),
            "security.protection": config.security.protection,
            "security.signing": config.security.signing,
            "security.ffa_lora": config.ffa_lora,
            "privacy.sample_dp": config.privacy.sample_dp.model_dump_json()
            if config.privacy.sample_dp
            else "off",
            "privacy.client_dp": config.privacy.client_dp.model_dump_json()
            if config.privacy.client_dp
            else "off",
        }
        if config.security.protection == "ckks":
            params["security.ckks_preset"] = config.security.ckks_preset
            params["security.ckks_params"] = ckks_preset(config.security.ckks_preset).model_dump_json()
        from mlflow.entities import Param

        # One request, not one per parameter: against a tracking server each call is a round trip (about
        # 1 s each on a loaded host with authentication, 20 s for these).
        self.client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "federation.yaml"

            p.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
            self.client.log_artifact(rid, str(p))
        return str(rid)

    def log_initial(self, run_id: str | None, metrics: Mapping[str, float]) -> None:
        self.log_metrics(run_id, metrics, step=0)

    def log_round(self, run_id: str | None, round_: int, summary: RoundSummary) -> None:
        if run_id is None:
            return
        parent = self.client.get_run(run_id)
        child = self.client.create_run(
            parent.info.experiment_id,
            tags={
                "mlflow.parentRunId": run_id,
                "mlflow.runName": f"round-{round_}",
                "silotune.round": str(round_),
            },
        )
        cid = child.info.run_id
        from mlflow.entities import Metric  # ~1 s to import: only MlflowTracker pays for it

        # One request per run, not one per metric: against a tracking server each call is a round trip.
        now = int(time.time() * 1000)
        batch = [
            Metric(key=k, value=v, timestamp=now, step=round_) for k, v in round_metrics(summary).items()
        ]
        self.client.log_batch(cid, metrics=batch)
        self.client.log_batch(run_id, metrics=batch)
        if summary.excluded:
            self.client.set_tag(
                cid,
                "silotune.excluded",
                "; ".join(f"{k}: {v}" for k, v in summary.excluded.items())[:5000],
            )
        self.client.set_terminated(cid)

    def log_file(self, run_id: str | None, path: Path, artifact_path: str | None = None) -> None:
        if run_id is not None:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        if run_id is None or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # one request for all of them, as in log_round
        batch = [Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=batch)

    def log_folder(self, run_id: str | None, folder: Path, artifact_path: str) -> None:
        if run_id is not None:
            self.client.log_artifacts(run_id, str(folder), artifact_path)

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id is not None:
            self.client.set_terminated(run_id, status=status)

    def run_url(self, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        if self.spec.uri.startswith(("http://", "https://")):
            exp = self.client.get_run(run_id).info.experiment_id
            return f"{self.spec.uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
        return f"{self.spec.uri} run {run_id} (view: mlflow ui --backend-store-uri {self.spec.uri})"

    def register_adapter(
        self,
        run_id: str | None,
        artifact_path: str,
        name: str,
        tags: Mapping[str, str],
        promotion: PromotionSpec | None = None,
        kind: str = "lora-adapter",
    ) -> str | None:
        """Register the run's adapter folder as a new version of model ``name``; returns the version.

        The version gets the alias 'champion' if it passes the ``promotion`` gate against the current
        champion (:func:`silotune.promotion.decide`, on the holdout metrics in ``tags``), else
        'challenger'; the decision and its reason go to the version's tags. ``promotion`` None: the
        default gate (holdout loss, any improvement). ``kind``: what the folder holds (an adapter, or
        a merged model from :mod:`silotune.export`).
        """
        if run_id is None:
            return None
        from mlflow.exceptions import MlflowException  # ~1 s to import: only MlflowTracker pays for it

        try:
            self.client.create_registered_model(name, tags={"silotune.kind": kind})
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        run = self.client.get_run(run_id)
        mv = self.client.create_model_version(
            name,
            source=f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}",
            run_id=run_id,
            tags=dict(tags),
            description=(
                "Final global LoRA adapter (PEFT format) of a silotune federation."
                if kind == "lora-adapter"
                else f"Final global model of a silotune federation ({kind})."
            ),
        )
        try:
            champion = self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:  # no champion yet
            champion = None
        decision = decide(
            promotion or PromotionSpec(),
            dict(tags),
            dict(champion.tags) if champion is not None else None,
            champion_version=str(champion.version) if champion is not None else None,
        )
        self.client.set_model_version_tag(name, mv.version, ALIAS_TAG, decision.alias)
        self.client.set_model_version_tag(name, mv.version, REASON_TAG, decision.reason)
        # MLflow reserves 'latest' (it always resolves to the newest version); 'champion' marks ours.
        self.client.set_registered_model_alias(name, decision.alias, mv.version)
        return str(mv.version)

    def promotion_of(self, name: str, run_id: str) -> dict[str, str] | None:
        """The registered version of ``name`` made from run ``run_id``: its version, alias and reason."""
        for mv in self.client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            return {
                "version": str(mv.version),
                "alias": mv.tags.get(ALIAS_TAG, ""),
                "reason": mv.tags.get(REASON_TAG, ""),
            }
        return None


def open_tracker(spec: TrackingSpec) -> Tracker:
    if spec.kind == "none":
        return NullTracker()
    return MlflowTracker(spec)
