"""Aggregators (one algorithm per module) and server optimizers, by name.

Importing this package registers every built-in aggregator.
"""

from silotune.aggregation import fedavg as _fedavg  # noqa: F401  (registers "fedavg")
from silotune.aggregation import fltrust as _fltrust  # noqa: F401  (registers "fltrust")
from silotune.aggregation import krum as _krum  # noqa: F401  (registers "krum", "multi_krum")
from silotune.aggregation import median as _median  # noqa: F401  (registers "median")
from silotune.aggregation import norm_bounded as _norm_bounded  # noqa: F401  (registers "norm_bounded")
from silotune.aggregation import server_adaptive as _server_adaptive  # noqa: F401  (fedavgm, fedadam, fedyogi)
from silotune.aggregation import trimmed_mean as _trimmed_mean  # noqa: F401  (registers "trimmed_mean")
from silotune.aggregation.base import (
    AGGREGATORS,
    Aggregator,
    ClientUpdate,
    TensorDict,
    aggregate,
    build_aggregator,
    check_update,
    check_updates,
    example_weights,
    plaintext_requirement,
)
from silotune.aggregation.server_opt import SERVER_OPTIMIZERS, ServerOptimizer, build_server_optimizer

__all__ = [
    "AGGREGATORS",
    "SERVER_OPTIMIZERS",
    "Aggregator",
    "ClientUpdate",
    "ServerOptimizer",
    "TensorDict",
    "aggregate",
    "build_aggregator",
    "build_server_optimizer",
    "check_update",
    "check_updates",
    "example_weights",
    "plaintext_requirement",
]
