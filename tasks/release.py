"""What leaves a silo, one task per filter: clip and noise → protect → sign → upload.

Each task reads and writes files in the silo's private folder and passes their paths, never tensors;
each has its own state, timing and retry policy in the UI. They run on the silo's own worker.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from silotune.config import FederationConfig
from silotune.federation.silo import (
    TrainedDelta,
    clip_and_noise_step,
    protect_step,
    sign_step,
    upload_step,
)
from silotune.records import UpdateRecord
from tasks import runtime
from tasks.runtime import store_for

_QUIET = {"persist_result": False, "cache_policy": NO_CACHE}


@task(name="clip-and-noise", task_run_name="clip-and-noise-{trained.silo}-r{trained.round}", **_QUIET)
def clip_and_noise(config: FederationConfig, trained: TrainedDelta) -> TrainedDelta:
    """Client-level DP: clip the delta, add the silo's noise share (a no-op without client DP)."""
    return clip_and_noise_step(config, trained, lifetime_epsilon=runtime.lifetime_epsilon(trained.silo))


# Deterministic errors (a value out of the scheme's range, a missing key) are not retried.
@task(name="protect", task_run_name="protect-{trained.silo}-r{trained.round}", **_QUIET)
def protect(config: FederationConfig, trained: TrainedDelta) -> str:
    """Encrypt (CKKS) or mask (secure aggregation) the delta; plaintext under protection 'none'."""
    return protect_step(config, trained, store_for(config))


@task(name="sign", task_run_name="sign-{silo}-r{round_}", **_QUIET)
def sign(config: FederationConfig, silo: str, round_: int, payload: str) -> str | None:
    """The silo's Ed25519 signature of what it uploads."""
    return sign_step(config, silo, round_, payload)


# Idempotent (the same bytes under the same key): a retry after a store hiccup is safe.
@task(
    name="upload",
    retries=2,
    retry_condition_fn=runtime.transient,
    retry_delay_seconds=2,
    task_run_name="upload-{trained.silo}-r{trained.round}",
    **_QUIET,
)
def upload(
    config: FederationConfig, trained: TrainedDelta, payload: str, signature: str | None
) -> UpdateRecord:
    """Put the payload and signature into the silo's own update slot."""
    return upload_step(config, trained, payload, signature, store_for(config))
