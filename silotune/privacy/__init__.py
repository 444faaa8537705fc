"""Differential privacy: accounting (per silo, per federation) and client-level DP for updates.

Privacy wraps what leaves a silo; it is never a flag inside an aggregator.
"""

from silotune.privacy.accountant import (
    ACCOUNTANTS,
    LedgerStateError,
    PrivacyLedger,
    compute_noise_multiplier,
)
from silotune.privacy.client_dp import (
    ClientDPConfig,
    ClientNoise,
    SampleDPConfig,
    add_gaussian_noise,
    calibrate_client_noise,
    clip_update,
    global_l2_norm,
    per_client_noise_std,
    privatize_update,
)

__all__ = [
    "ACCOUNTANTS",
    "ClientDPConfig",
    "ClientNoise",
    "LedgerStateError",
    "PrivacyLedger",
    "SampleDPConfig",
    "add_gaussian_noise",
    "calibrate_client_noise",
    "clip_update",
    "compute_noise_multiplier",
    "global_l2_norm",
    "per_client_noise_std",
    "privatize_update",
]
