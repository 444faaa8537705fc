"""Client sampling: which silos train in a round.

With ``aggregation.silos_per_round`` set (a count, or a fraction of the configured silos), each
round trains ``m`` of the ``n`` silos. The draw is a pure function of the federation's config
(its id, its seed) and the round number, so every silo recomputes it from its own copy of the
config: a coordinator cannot pick a round's cohort (for secure aggregation: the roster whose
masks must cancel) without every silo noticing, and an audit can redo it from the manifest.

The draw ranks the silos by ``SHA-256(domain, federation_id, seed, round, silo)`` and keeps the
``m`` smallest: fully specified, independent of Python's ``random`` implementation and of the
order in which silos are listed.

Sampling and client-level DP: the accountants analyse Poisson sampling at rate ``q``; a round here
samples exactly ``m`` silos, accounted at ``q = m / n`` (see ``silotune.privacy.filters``).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config module imports this package: no import at run time
    from silotune.config import FederationConfig

_DOMAIN = "silotune/sampling/v1"


def sample_size(config: FederationConfig) -> int:
    """How many silos train each round (all of them when ``silos_per_round`` is unset)."""
    return config.aggregation.round_size(len(config.silos))


def sample_rate(config: FederationConfig) -> float:
    """The fraction of silos drawn each round, ``m / n`` (1.0 without sampling)."""
    return sample_size(config) / len(config.silos)


def silos_of_round(config: FederationConfig, round_: int) -> list[str]:
    """The silos drawn for round ``round_`` (0-based), sorted by name; without sampling, every silo in
    the config's order (the order rounds always used: aggregation sums in it)."""
    m = sample_size(config)
    if m >= len(config.silos):
        return [s.name for s in config.silos]
    names = sorted(s.name for s in config.silos)

    def rank(silo: str) -> bytes:
        material = json.dumps([_DOMAIN, config.federation_id, config.seed, round_, silo]).encode()
        return hashlib.sha256(material).digest()

    return sorted(sorted(names, key=rank)[:m])
