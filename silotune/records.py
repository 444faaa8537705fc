"""The records a round exchanges: small, typed, JSON-serialisable; never tensors.

Silos return them (as signed records in their own store prefix, :mod:`silotune.results`), the
coordinator's tasks pass them along, the state file keeps them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

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
    delta_norm: float
    seconds: float


class FederationState(BaseModel):
    """The resume point, stored at ``federations/<fid>/state.json``."""

    federation_id: str
    fingerprint: str
    completed_rounds: int = 0
    global_ref: ObjectRef
    tracking_run_id: str | None = None
    initial_eval: dict[str, Any] | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    silotune_version: str = __version__

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
        if self.history and self.history[-1].get("evaluated") is False:
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
