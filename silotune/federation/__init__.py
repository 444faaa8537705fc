"""The steps of a federated round as plain functions over the object store, by role.

Prefect tasks in ``tasks/`` are thin wrappers around these; a notebook can call
them directly. Every function takes and returns small records (keys, hashes,
counts, metrics), never tensors, so they can cross process and host boundaries.

Round ``r`` (0-based), pipelined so that each round needs one pass over the silos:

1. ``start_federation`` writes the initial global adapter (or finds the resume point);
2. each silo evaluates the global it receives, ``rounds/r/global`` (round r-1's output; in round 0
   the initial adapter), with ``evaluate_silo``, then trains from it with ``train_silo`` and writes
   ``updates/<silo>/<fid>/r/update.<ext>``;
3. ``aggregate_round`` verifies and combines the updates, writes ``rounds/r+1/global``;
4. ``commit_round`` writes round r's manifest and ``state.json``: only now is round r complete.
   The evaluations of step 2 belong to round r-1 (or to the initial adapter): ``record_evaluation``
   adds them to that round's history entry and to a write-once object next to its manifest.

After the last round the silos evaluate the final global once more (``record_evaluation`` of the
last round). Evaluation is deterministic, so these are the numbers an evaluation right after each
aggregation would give; see ``FederationState.pending_evaluation``.

By role: :mod:`silotune.records` (what a round exchanges, shared with the protection schemes),
:mod:`~silotune.federation.silo` (train, evaluate, pack at a silo),
:mod:`~silotune.federation.coordinator` (screen and aggregate),
:mod:`~silotune.federation.commit` (state, manifests, evaluations). This module re-exports the public
functions for notebooks; the code imports each from its role's module.
"""

from silotune.federation.commit import (
    commit_round,
    load_state,
    record_evaluation,
    save_state,
    start_federation,
    summarize_evals,
)
from silotune.federation.coordinator import (
    aggregate_round,
    close_secagg_upload,
    close_upload,
    open_round,
    screen_uploads,
)
from silotune.federation.silo import evaluate_silo, train_silo
from silotune.methods.peft_methods import initial_lora as initial_adapter
from silotune.protection import exchanged_keys
from silotune.records import (
    AggregateRecord,
    EvalRecord,
    Evaluation,
    FederationState,
    HoldoutMetrics,
    ObjectRef,
    RoundSummary,
    SiloEvalResult,
    SiloFailure,
    SiloRoundResult,
    SiloStepResult,
    UpdateRecord,
)

__all__ = [
    "AggregateRecord",
    "EvalRecord",
    "Evaluation",
    "FederationState",
    "HoldoutMetrics",
    "ObjectRef",
    "RoundSummary",
    "SiloEvalResult",
    "SiloFailure",
    "SiloRoundResult",
    "SiloStepResult",
    "UpdateRecord",
    "aggregate_round",
    "close_secagg_upload",
    "close_upload",
    "commit_round",
    "evaluate_silo",
    "exchanged_keys",
    "initial_adapter",
    "load_state",
    "open_round",
    "record_evaluation",
    "save_state",
    "screen_uploads",
    "start_federation",
    "summarize_evals",
    "train_silo",
]
