"""Where a silo computes: device, precision, CPU threads, and the host-wide slot co-located silos share.

A silo's placement comes from ``train.device``/``train.precision`` (the federation's, or the silo's own
``silos[].device``, or its policy's ``device``), resolved against the machine it runs on:

- ``auto`` is the first CUDA device when torch sees one, else the CPU;
- precision ``auto`` is bf16 autocast on a GPU that supports bf16, fp16 on an older GPU, fp32 on CPUs
  (bf16 matmuls are 15-20x slower on CPUs without bf16 units).

CPU threads: every torch process starts one OpenMP thread per core. Three silo workers on one host
then run three times as many spinning threads as there are cores, and each step slows down ~10x.
:func:`default_threads` divides the cores this process may use (its CPU affinity, capped by its
cgroup's CPU quota) by the number of silo workers on the host, which ``silotune stack up`` passes in
``$SILOTUNE_COLOCATED_WORKERS``. When co-located silos are serialised (:func:`host_slot`), one trains at
a time and it gets every core.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from silotune.errors import ConfigError
from silotune.modeling import cache_root

COLOCATED_ENV = "SILOTUNE_COLOCATED_WORKERS"  # silo workers sharing this host (set by `stack up`)
DEVICE_ENV = "SILOTUNE_DEVICE"  # a silo host's device override (`silo join --device`)
LOCK_DIR_ENV = "SILOTUNE_LOCK_DIR"  # where the host-wide training slot's lock file lives
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_device(value: str, field: str = "train.device") -> str:
    """``value`` if it names a device silotune places models on; else a ConfigError naming ``field``."""
    if not DEVICE_PATTERN.match(value):
        raise ConfigError(f"{field}: {value!r} is not a device; use auto, cpu, cuda or cuda:N")
    return value


# --- CPU threads ---------------------------------------------------------------------------------


def _cgroup_cpus(root: Path) -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 ``cpu.max``, else v1 ``cfs_quota_us``); None: no quota."""
    v2 = root / "cpu.max"
    with contextlib.suppress(OSError, ValueError):
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def usable_cores(
    *,
    affinity: Callable[[], set[int]] | None = None,
    cgroup_root: Path = Path("/sys/fs/cgroup"),
) -> int:
    """Cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota (rounded up)."""
    if affinity is None:
        affinity = (lambda: os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = len(affinity()) if affinity is not None else (os.cpu_count() or 1)
    quota = _cgroup_cpus(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def colocated_workers(env: dict[str, str] | None = None) -> int:
    """Silo workers sharing this host (``$SILOTUNE_COLOCATED_WORKERS``; 1 when unset)."""
    raw = (os.environ if env is None else env).get(COLOCATED_ENV, "1")
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"${COLOCATED_ENV}={raw!r} is not a number of silo workers") from None
    if n < 1:
        raise ConfigError(f"${COLOCATED_ENV}={raw!r}: at least 1")
    return n


def default_threads(*, cores: int | None = None, workers: int | None = None, serialised: bool = False) -> int:
    """torch threads for one silo: usable cores ÷ co-located workers (all of them when serialised).

    An explicit ``$OMP_NUM_THREADS`` wins: whoever set it knows the host.
    """
    if cores is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = usable_cores() if cores is None else cores
    workers = colocated_workers() if workers is None else workers
    return cores if serialised else max(1, cores // workers)


def serialise_colocated(setting: bool | None, workers: int | None = None) -> bool:
    """Whether silo runs on this host take turns: ``setting``; None: when several workers share it."""
    workers = colocated_workers() if workers is None else workers
    return workers > 1 if setting is None else setting


def lock_dir() -> Path:
    """The host-local folder of the training slot's lock: ``$SILOTUNE_LOCK_DIR``, else the model cache's."""
    return Path(os.environ.get(LOCK_DIR_ENV) or cache_root() / "locks")


@contextlib.contextmanager
def host_slot(enabled: bool, *, path: Path | None = None) -> Iterator[None]:
    """Hold the host-wide training slot (an ``flock`` on a host-local file) when ``enabled``."""
    if not enabled:
        yield
        return
    path = path or lock_dir() / "silo-compute.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- device and precision ------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """A silo's resolved compute placement: a concrete device, a precision and its CPU threads."""

    device: str = "cpu"  # "cpu" or "cuda:N"
    precision: str = "fp32"  # fp32 | bf16 | fp16: the autocast dtype (fp32: no autocast)
    threads: int | None = None  # torch intra-op threads (None: leave torch's setting alone)
    gradient_checkpointing: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def dtype_name(self) -> str:
        return TORCH_DTYPES[self.precision]

    def describe(self) -> str:
        threads = f", {self.threads} CPU threads" if self.threads else ""
        return f"{self.device} {self.precision}{threads}"


def resolve_device(value: str, *, cuda_available: bool | None = None, cuda_count: int | None = None) -> str:
    """A concrete device for ``value`` (auto|cpu|cuda|cuda:N); ConfigError if CUDA is asked and absent."""
    import torch  # seconds to import; config validation and the CLI import this module

    check_device(value)
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if value == "cpu":
        return "cpu"
    if value == "auto":
        return "cuda:0" if available else "cpu"
    if not available:
        raise ConfigError(f"train.device: {value!r} but torch sees no CUDA device on this host")
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    index = int(value.split(":")[1]) if ":" in value else 0
    if index >= count:
        raise ConfigError(f"train.device: {value!r} but this host has {count} CUDA device(s)")
    return f"cuda:{index}"


def resolve_precision(value: str, device: str, *, bf16_supported: bool | None = None) -> str:
    """fp32, bf16 or fp16 for ``value`` on ``device`` (auto: bf16 on bf16 GPUs, else fp16; fp32 on CPUs)."""
    import torch  # seconds to import; config validation and the CLI import this module

    if value not in PRECISIONS:
        raise ConfigError(f"train.precision: {value!r}; use one of {', '.join(PRECISIONS)}")
    cuda = device.startswith("cuda")
    if value == "fp16" and not cuda:
        raise ConfigError("train.precision: fp16 needs a CUDA device (CPUs have no fp16 matmul units)")
    if value != "auto":
        return value
    if not cuda:
        return "fp32"
    if bf16_supported is None:
        with torch.cuda.device(device):
            bf16_supported = torch.cuda.is_bf16_supported()
    return "bf16" if bf16_supported else "fp16"


def placement(train: Any, *, device: str | None = None) -> Placement:
    """Resolve a :class:`~silotune.config.TrainSpec` (and a silo's ``device`` override) on this host.

    ``$SILOTUNE_DEVICE`` (a silo host's own setting, ``silo join --device``) overrides both.
    """
    wanted = os.environ.get(DEVICE_ENV) or device or train.device
    dev = resolve_device(check_device(wanted, "device"))
    precision = resolve_precision(train.precision, dev)
    serialised = serialise_colocated(train.serialise_colocated)
    threads = train.torch_threads or default_threads(serialised=serialised)
    return Placement(
        device=dev,
        precision=precision,
        threads=threads,
        gradient_checkpointing=train.gradient_checkpointing,
    )


def autocast(p: Placement | None) -> contextlib.AbstractContextManager[Any]:
    """torch autocast to the placement's precision on its device; nothing for fp32."""
    import torch  # seconds to import; config validation and the CLI import this module

    if p is None or p.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=p.device.split(":")[0], dtype=getattr(torch, p.dtype_name))


def apply_threads(p: Placement) -> None:
    """Set torch's intra-op threads to the placement's (if it names any)."""
    import torch  # seconds to import; config validation and the CLI import this module

    if p.threads and torch.get_num_threads() != p.threads:
        torch.set_num_threads(p.threads)
