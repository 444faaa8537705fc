"""Differential privacy: accounting, the silo's append-only ledger, keyed noise, client-level DP.

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
from silotune.privacy.ledger import (
    LedgerConflict,
    LedgerEntry,
    LedgerError,
    PrivacyBudgetExhausted,
    SiloLedger,
)
from silotune.privacy.noise import (
    KeyedNoiseDPOptimizer,
    add_gaussian_noise_keyed,
    derive_noise_key,
    gaussian_noise,
)

__all__ = [
    "ACCOUNTANTS",
    "ClientDPConfig",
    "ClientNoise",
    "KeyedNoiseDPOptimizer",
    "LedgerConflict",
    "LedgerEntry",
    "LedgerError",
    "LedgerStateError",
    "PrivacyBudgetExhausted",
    "PrivacyLedger",
    "SampleDPConfig",
    "SiloLedger",
    "add_gaussian_noise",
    "add_gaussian_noise_keyed",
    "calibrate_client_noise",
    "clip_update",
    "compute_noise_multiplier",
    "derive_noise_key",
    "gaussian_noise",
    "global_l2_norm",
    "per_client_noise_std",
    "privatize_update",
]
