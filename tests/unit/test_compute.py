"""Placement: cores from affinity and cgroup quota, threads per co-located silo, device and precision."""

from __future__ import annotations

from pathlib import Path

import pytest

from silotune.compute import (
    colocated_workers,
    default_threads,
    host_slot,
    placement,
    resolve_device,
    resolve_precision,
    serialise_colocated,
    usable_cores,
)
from silotune.config import TrainSpec
from silotune.errors import ConfigError


def _cgroup(tmp_path: Path, *, v2: str | None = None, v1: tuple[int, int] | None = None) -> Path:
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("affinity", "v2", "v1", "expected"),
    [
        (8, None, None, 8),  # no cgroup files: the affinity mask decides
        (8, "max 100000", None, 8),  # cgroup v2 without a quota
        (8, "250000 100000", None, 3),  # 2.5 CPUs of quota: rounded up
        (2, "400000 100000", None, 2),  # the affinity mask is smaller than the quota
        (16, "50000 100000", None, 1),  # half a CPU: still one thread
        (8, None, (200000, 100000), 2),  # cgroup v1 quota
        (8, None, (-1, 100000), 8),  # cgroup v1 without a quota
    ],
)
def test_usable_cores_from_affinity_and_cgroup(tmp_path, affinity, v2, v1, expected) -> None:
    root = _cgroup(tmp_path, v2=v2, v1=v1)
    assert usable_cores(affinity=lambda: set(range(affinity)), cgroup_root=root) == expected


def test_threads_divide_the_cores_among_colocated_workers(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads(cores=16, workers=3) == 5
    assert default_threads(cores=2, workers=3) == 1  # never zero
    assert default_threads(cores=16, workers=3, serialised=True) == 16  # one at a time gets every core
    monkeypatch.setenv("SILOTUNE_COLOCATED_WORKERS", "4")
    assert colocated_workers() == 4 and default_threads(cores=16) == 4
    assert serialise_colocated(None) is True and serialise_colocated(False) is False
    monkeypatch.setenv("SILOTUNE_COLOCATED_WORKERS", "1")
    assert serialise_colocated(None) is False
    monkeypatch.setenv("SILOTUNE_COLOCATED_WORKERS", "many")
    with pytest.raises(ConfigError, match="SILOTUNE_COLOCATED_WORKERS"):
        colocated_workers()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3  # an explicit OMP_NUM_THREADS wins


def test_device_and_precision_resolution() -> None:
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True, cuda_count=2) == "cuda:0"
    assert resolve_device("cuda:1", cuda_available=True, cuda_count=2) == "cuda:1"
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(ConfigError, match="1 CUDA device"):
        resolve_device("cuda:3", cuda_available=True, cuda_count=1)
    with pytest.raises(ConfigError, match=r"train\.device"):
        resolve_device("gpu0")
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda:0", bf16_supported=True) == "bf16"
    assert resolve_precision("auto", "cuda:0", bf16_supported=False) == "fp16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")


def test_placement_overrides(monkeypatch) -> None:
    monkeypatch.delenv("SILOTUNE_DEVICE", raising=False)
    monkeypatch.setenv("SILOTUNE_COLOCATED_WORKERS", "1")
    spec = TrainSpec(device="cpu", precision="bf16", torch_threads=3, gradient_checkpointing=True)
    p = placement(spec)
    assert (p.device, p.precision, p.threads, p.gradient_checkpointing) == ("cpu", "bf16", 3, True)
    monkeypatch.setenv("SILOTUNE_DEVICE", "cuda:7")  # the silo host's own setting wins over the config
    with pytest.raises(ConfigError):
        placement(spec, device="cpu")


def test_host_slot_serialises_processes(tmp_path) -> None:
    import fcntl

    lock = tmp_path / "slot.lock"
    # A second holder (another open file description, as another process has) must wait.
    with host_slot(True, path=lock), open(lock, "a") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after the block
    with host_slot(False, path=tmp_path / "never.lock"):
        assert not (tmp_path / "never.lock").exists()


def test_worker_reports_its_threads_and_device(monkeypatch, capsys) -> None:
    from ops.worker import log_compute_budget

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SILOTUNE_COLOCATED_WORKERS", "3")
    monkeypatch.setenv("SILOTUNE_DEVICE", "cpu")
    log_compute_budget("silo-clinic")
    line = capsys.readouterr().err
    cores = usable_cores()
    assert f"pool silo-clinic: {cores} usable core(s), 3 co-located silo worker(s) taking turns" in line
    assert f"-> {cores} torch thread(s)" in line and "($SILOTUNE_DEVICE=cpu)" in line
