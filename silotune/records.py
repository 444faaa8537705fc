"""The records a round exchanges: small, typed, JSON-serialisable; never tensors.

Silos return them (as signed records in their own store prefix, :mod:`silotune.results`), the
coordinator's tasks pass them along, the state file keeps them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from silotune import __version__


class ObjectRef(BaseModel):
    """An object in the store and the sha256 it must have."""

    key: str
    sha256: str


class AggregateRecord(BaseModel):
    """What one round's aggregation produced (the next global and who went in)."""

    round: int
    included: list[str]
    excluded: dict[str, str]
    next_global: ObjectRef
    server_state: ObjectRef | None = None
    control: ObjectRef | None = None  # SCAFFOLD: the server control variate after this round
    delta_norm: float
    seconds: float
    masking: dict[str, str | int] | None = None  # secure aggregation: the round's masking graph (its record)


class HoldoutMetrics(BaseModel):
    """One holdout evaluation: a silo's, or the example-weighted mean over silos.

    The record form of :class:`silotune.evaluation.EvalResult` (which needs torch to compute); the
    preference metrics are set on preference silos only and left out of the JSON when unset.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_examples: int
    loss: float
    exact_match: float
    dpo_loss: float | None = None
    pref_margin: float | None = None
    pref_accuracy: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    gen_exact_match: float | None = None  # free-running generation (silotune.evaluation.generate_eval)
    rouge_l: float | None = None
    chrf: float | None = None

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}

    def as_dict(self) -> dict[str, float | int]:
        """The metrics by name (what ``EvalResult.as_dict`` gives, and the evaluation files hold)."""
        return self.model_dump()


class SiloBytes(BaseModel):
    """What one silo moved in a round: its upload and the global adapter it downloaded."""

    model_config = ConfigDict(extra="forbid")

    up: int
    down: int


class Evaluation(BaseModel):
    """The silos' holdout evaluation of one global adapter.

    ``global_eval`` is the example-weighted mean over the silos that evaluated (None: no silo did, or
    the evaluation has not arrived yet); ``eval_failures`` names the silos whose evaluation failed, and why.
    """

    model_config = ConfigDict(extra="forbid")

    eval: dict[str, HoldoutMetrics] = Field(default_factory=dict)
    global_eval: HoldoutMetrics | None = None
    eval_failures: dict[str, str] = Field(default_factory=dict)
    eval_seconds: dict[str, float] = Field(
        default_factory=dict, description="silo → wall seconds of its evaluation (for the cost plots)"
    )

    @field_validator("global_eval", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == {} else value

    @model_serializer(mode="wrap")
    def _as_stored(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return _stored_form(handler(self))

    def evaluation_file(self, *, federation_id: str, round_: int, global_ref: ObjectRef) -> dict[str, Any]:
        """The write-once ``evaluation.json`` of round ``round_``'s output (``-1``: the initial global),
        for auditors: unlike the state file it always has every key."""
        return {
            "federation_id": federation_id,
            "round": round_ + 1,  # 0: the initial global adapter
            "global": global_ref.model_dump(),
            "eval": {silo: m.as_dict() for silo, m in self.eval.items()},
            "global_eval": self.global_eval.as_dict() if self.global_eval else {},
            "eval_failures": dict(self.eval_failures),
            "silotune_version": __version__,
        }


def _stored_form(out: dict[str, Any]) -> dict[str, Any]:
    """The JSON form the state files have always had: ``{}`` for a missing global evaluation, and the
    optional keys left out rather than null (so files stay readable by earlier versions)."""
    if "global_eval" in out and out["global_eval"] is None:
        out["global_eval"] = {}
    if not out.get("eval_failures", True):
        del out["eval_failures"]
    if not out.get("eval_seconds", True):
        del out["eval_seconds"]
    for key in ("client_dp_noise_multiplier", "client_dp_epsilon", "committed_at"):
        if key in out and out[key] is None:
            del out[key]
    return out


_LATER_FIELDS = ("round_seconds", "aggregate_seconds", "sampled", "masking")


class RoundSummary(Evaluation):
    """One committed round of the history in ``state.json``: who went in, what it cost, how it scored.

    The training side (``included`` … ``client_dp_epsilon``) is fixed when the round is committed and
    is what the round's manifest holds; the evaluation (:class:`Evaluation`'s fields) of the round's
    output arrives with the next round's silo runs, and ``evaluated`` says whether it has.
    """

    round: int = Field(description="1-based: round r's output is the global adapter rounds/r/")
    included: list[str] = Field(description="the silos whose update went into the aggregate, in order")
    excluded: dict[str, str] = Field(
        description="silo → why it is not in the aggregate: screening (``non-finite …``) or a failed "
        "stage (``train: DataError: …``)"
    )
    train: dict[str, dict[str, float | int]] = Field(
        description="silo → its training metrics (loss, steps, tokens per second, update norm, …); empty "
        "when the silo's release policy withholds them"
    )
    delta_norm: float | None = Field(description="norm of the global step; None when unknown (encrypted)")
    protection: str = Field(description="the protection scheme of the uploads")
    privacy: dict[str, dict[str, float]] = Field(
        description="silo → what its privacy filters report (``dp.epsilon``, ``client_dp.noise_std``, …)"
    )
    bytes: dict[str, SiloBytes]  # silo → what it uploaded and downloaded
    client_dp_noise_multiplier: float | None = Field(
        default=None, description="client-level DP: the noise multiplier z this round used"
    )
    client_dp_epsilon: float | None = Field(
        default=None, description="client-level DP: ε over every round so far, with the z each one used"
    )
    round_seconds: float | None = Field(
        default=None, description="wall time of the round at the coordinator: silo runs to aggregation"
    )
    aggregate_seconds: float | None = Field(
        default=None, description="of which the coordinator's aggregation (screening, combining, writing)"
    )
    sampled: list[str] | None = Field(
        default=None,
        description="client sampling: the silos drawn for the round (None: every silo was asked)",
    )
    masking: dict[str, str | int] | None = Field(
        default=None,
        description="secure aggregation: the round's masking graph (kind complete or harary, degree k, "
        "seed, complete_up_to, digest), which anyone holding the config can redo",
    )
    committed_at: float | None = Field(
        default=None, description="unix time of the round's commit (for the cost plots; not in the manifest)"
    )
    evaluated: bool = Field(
        default=True,
        description="whether the round's evaluation has arrived (entries written before evaluation was "
        "pipelined have no such key, and were evaluated)",
    )

    @model_serializer(mode="wrap")
    def _as_stored(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        # Fields added later stay out of state.json and manifests while unset (files stay byte-identical).
        out = _stored_form(handler(self))
        for key in _LATER_FIELDS:
            if out.get(key) is None:
                out.pop(key, None)
        return out

    def manifest_fields(self) -> dict[str, Any]:
        """The round's training side, as its manifest holds it (no evaluation fields)."""
        return self.model_dump(
            mode="json",
            exclude={"eval", "global_eval", "eval_failures", "eval_seconds", "evaluated", "committed_at"},
        )


class FederationState(BaseModel):
    """The resume point, stored at ``federations/<fid>/state.json``.

    Unknown keys are refused, here and in the history (:func:`~silotune.federation.commit.load_state`
    names each): a file this version half-understands would lose what it does not know on the next save.
    """

    model_config = ConfigDict(extra="forbid")

    federation_id: str
    fingerprint: str
    completed_rounds: int = 0
    global_ref: ObjectRef
    tracking_run_id: str | None = None
    initial_eval: Evaluation | None = None  # of the initial global adapter, once it has arrived
    history: list[RoundSummary] = Field(default_factory=list)
    started_at: float | None = None  # unix time the federation was created (for the cost plots)
    silotune_version: str = __version__

    @model_serializer(mode="wrap")
    def _without_unset_start(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        out = handler(self)
        if "started_at" in out and out["started_at"] is None:  # files from before it stay byte-identical
            del out["started_at"]
        return out

    @property
    def pending_evaluation(self) -> int | None:
        """The round whose output still awaits its holdout evaluation (``-1``: the initial global), or None.

        Only the global adapter the silos receive next (``global_ref``) can be pending: the
        evaluation of round r arrives with round r+1's silo runs (or the final evaluation pass)
        and is recorded no later than round r+1's commit. History entries written before
        evaluation was pipelined carry no ``evaluated`` key and count as evaluated.
        """
        if self.completed_rounds == 0:
            return -1 if self.initial_eval is None else None
        if self.history and not self.history[-1].evaluated:
            return self.completed_rounds - 1
        return None


class UpdateRecord(BaseModel):
    silo: str
    round: int
    update: ObjectRef
    num_examples: int
    train: dict[str, float | int]
    protection: str = "none"
    signature: ObjectRef | None = None
    privacy: dict[str, float] = Field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0


class SiloFailure(BaseModel):
    silo: str
    round: int
    stage: str
    error: str


class EvalRecord(BaseModel):
    silo: str
    round: int
    result: dict[str, float | int]
    seconds: float | None = None  # wall time of the evaluation at the silo


class SiloRoundResult(BaseModel):
    """What a silo's round run returns: its evaluation of the global it received, and its update.

    ``evaluation`` belongs to round ``round - 1`` (the initial global in round 0); ``update`` is None
    when training failed (``train_error`` says why: the evaluation still counts), ``evaluation`` is None
    when the silo has no holdout, was not asked to evaluate, or its evaluation failed (``eval_error``).
    """

    silo: str
    round: int
    update: UpdateRecord | None = None
    evaluation: EvalRecord | None = None
    train_error: str | None = None
    eval_error: str | None = None
    run_id: str | None = None  # the flow run that wrote it: a record left by an earlier run is not read


class SiloEvalResult(BaseModel):
    """What a silo's evaluate-only run returns (``evaluation`` None: the silo has no holdout)."""

    silo: str
    round: int
    evaluation: EvalRecord | None = None
    run_id: str | None = None


class SiloStepResult(BaseModel):
    """What a silo's protocol step returns: the keys of the messages it wrote."""

    silo: str
    round: int
    stage: str
    objects: list[str] = Field(default_factory=list)  # not `keys`: Prefect reads that as a mapping
    run_id: str | None = None
