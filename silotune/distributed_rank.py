"""One rank of a silo's multi-process round: ``torchrun ... -m silotune.distributed_rank FOLDER``.

:func:`silotune.distributed.train_distributed` writes the job into FOLDER and launches the ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from silotune.adapters import AdapterModel
from silotune.compute import Placement
from silotune.config import LoraSpec, MethodSpec, ModelSpec, TrainSpec
from silotune.data import Example
from silotune.distributed import JOB_FILE, DataParallel
from silotune.training import train_local


def run_rank(folder: Path) -> None:
    """One rank of a silo's round (``python -m silotune.distributed_rank FOLDER`` under torchrun)."""
    job = json.loads((folder / JOB_FILE).read_text())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    p = job["placement"]
    cuda = p["device"].startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if cuda else 0
    # One GPU per process with NCCL; more processes than GPUs share them over gloo (NCCL refuses
    # two ranks on one device), which still all-reduces CUDA tensors.
    device = f"cuda:{local_rank % gpus}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda and gpus >= world else "gloo")
    try:
        place = Placement(
            device=device,
            precision=p["precision"],
            threads=p["threads"],
            gradient_checkpointing=p["gradient_checkpointing"],
        )
        spec = TrainSpec.model_validate(job["train"])
        lora = LoraSpec.model_validate(job["lora"]) if job["lora"] else LoraSpec()
        adapter = AdapterModel.create(
            ModelSpec(name_or_path=job["model_path"]),
            lora,
            seed=0,
            method=MethodSpec.model_validate(job["method"]),
            placement=place,
        )
        global_state = load_file(str(folder / "global.safetensors"))
        examples = [Example(ids, labels) for ids, labels in job["examples"]]
        parallel = DataParallel(
            rank=dist.get_rank(), world=dist.get_world_size(), kind=spec.parallelism, device=device
        )
        d, result = train_local(
            adapter,
            global_state,
            examples,
            spec,
            seed=job["seed"],
            progress=False,
            frozen=job["frozen"],
            exchanged=job["exchanged"],
            parallel=parallel,
        )
        if parallel.rank == 0:  # exactly one update leaves the silo
            save_file(d, str(folder / "delta.safetensors"))
            (folder / "result.json").write_text(json.dumps(result.as_dict()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
