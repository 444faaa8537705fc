"""Exception hierarchy. Every error names what is wrong and where."""

from __future__ import annotations


class SilotuneError(Exception):
    """Base class for all silotune errors."""


class ConfigError(SilotuneError):
    """A federation config (or part of one) is invalid."""


class DataError(SilotuneError):
    """A silo's dataset cannot be read or has malformed records."""


class UpdateError(SilotuneError):
    """A silo's update is malformed (bad dtype, shape, key set, NaN/Inf, checksum)."""

    def __init__(self, silo: str, message: str, *, tensor: str | None = None) -> None:
        self.silo = silo
        self.tensor = tensor
        where = f"silo {silo!r}" + (f", tensor {tensor!r}" if tensor else "")
        super().__init__(f"{where}: {message}")


class StoreError(SilotuneError):
    """An object could not be read or written, or failed its integrity check."""


class StoreUnavailable(StoreError):
    """The store could not be reached, or answered with a server error: the same call may succeed later.

    Every other :class:`StoreError` (a missing, corrupted, oversized or forbidden object, a certificate
    that does not verify) fails the same way on every try.
    """


class QuorumError(SilotuneError):
    """Fewer silos contributed to a round than the configured quorum."""


class RegistryError(SilotuneError, KeyError):
    """An unknown name was looked up in a registry."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""
