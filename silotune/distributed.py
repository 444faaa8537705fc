"""One silo, several processes: data-parallel local training through ``torchrun``.

With ``train.processes > 1`` a silo's round runs in that many processes on its host
(``torchrun --standalone``): gloo on CPUs, NCCL on GPUs (one GPU per process, ``LOCAL_RANK``; gloo when
there are more processes than GPUs).
Every rank draws the same global batches from the round's seed and trains on its own slice of
each (``batch[rank::world]``); each rank back-propagates its slice's share of the global batch
loss, so the averaged gradient is exactly the single-process gradient of the same global batch.

``parallelism: ddp`` replicates the model (``DistributedDataParallel``); ``fsdp`` shards it
(FSDP2 ``fully_shard``, one unit per decoder layer) for full fine-tuning of models that do not fit
one device; the full weights are gathered at the end (``DTensor.full_tensor``). Only rank 0 writes the
delta: the silo uploads exactly one update, as with one process. The calling process keeps its
loaded model and loads the trained state into it afterwards.

Not supported with several processes (a clear error): DP-SGD (Opacus' per-example clipping
would need its own distributed optimizer and the silo's keyed noise drawn once) and DPO.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from silotune.adapters import AdapterModel, TensorDict, apply_delta
from silotune.config import TrainSpec
from silotune.data import Example
from silotune.errors import ConfigError
from silotune.methods import Payload

JOB_FILE = "job.json"  # what silotune.distributed_rank reads in each process


@dataclass
class DataParallel:
    """This process's part in a silo's data-parallel round (what the training loop asks of it)."""

    rank: int
    world: int
    kind: str = "ddp"  # ddp | fsdp
    device: str = "cpu"
    _wrapped: Any = None

    def shard(self, batch: Sequence[Example]) -> list[Example]:
        return list(batch[self.rank :: self.world])

    def loss_scale(self, mine: int, total: int) -> float:
        """Gradients are averaged over ranks: scale this rank's mean loss to its share of the batch."""
        return mine * self.world / total

    def global_mean(self, loss: float, mine: int, total: int) -> float:
        t = torch.tensor([loss * mine], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / total

    def total(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
        if self.kind == "fsdp":
            # FSDP2 (fully_shard): one unit per decoder layer, then the rest; it runs on gloo and CPUs
            # too (FSDP1 needs an accelerator). Parameters become DTensor shards.
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.split(":")[0], (self.world,))
            model = getattr(module, "model", module)
            names = _no_split(model)
            for m in list(model.modules()):
                if type(m).__name__ in names:
                    fully_shard(m, mesh=mesh)
            self._wrapped = fully_shard(module, mesh=mesh)
        else:
            self._wrapped = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return self._wrapped

    def trainable(self, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """The parameters the optimizer steps once wrapped (FSDP's: this rank's DTensor shards)."""
        if self.kind != "fsdp":
            return params
        return [p for p in self._wrapped.parameters() if p.requires_grad]

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> None:
        """Clip by the norm of the whole gradient (DTensor shards: torch reduces across ranks)."""
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def _no_split(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or ())


def check_supported(spec: TrainSpec, *, dp: Any, objective: Any, method: Any) -> None:
    """ConfigError for what several processes per silo do not run."""
    if dp is not None:
        raise ConfigError("train.processes > 1 with DP-SGD is not supported; use one process per silo")
    if objective is not None:
        raise ConfigError("train.processes > 1 runs SFT only; DPO trains in one process")
    if spec.processes > spec.batch_size:
        raise ConfigError(
            f"train.processes={spec.processes} > train.batch_size={spec.batch_size}: every process needs "
            "at least one example of each batch"
        )
    if spec.parallelism == "fsdp" and spec.proximal_mu > 0:
        raise ConfigError("train.parallelism fsdp with train.proximal_mu > 0 is not supported; use ddp")
    if spec.parallelism == "fsdp" and method.payload is not Payload.FULL_WEIGHTS:
        raise ConfigError(
            f"train.parallelism fsdp shards full fine-tuning; method {method.name!r} trains an adapter, "
            "use ddp"
        )


def train_distributed(
    adapter: AdapterModel,
    global_state: TensorDict,
    examples: Sequence[Example],
    spec: TrainSpec,
    *,
    seed: int,
    dp: Any = None,
    frozen: Sequence[str] = (),
    exchanged: Sequence[str] | None = None,
    objective: Any = None,
    timeout: float | None = None,
) -> tuple[TensorDict, dict[str, Any]]:
    """Run the round in ``spec.processes`` processes (torchrun); rank 0's delta and report come back.

    The job (model folder, method, global, examples) goes through a private temporary folder;
    the calling process ends with the trained state loaded, as after a one-process round.
    """
    check_supported(spec, dp=dp, objective=objective, method=adapter.method)
    place = adapter.placement
    with tempfile.TemporaryDirectory(prefix="silotune-ddp-") as tmp:
        folder = Path(tmp)
        save_file(global_state, str(folder / "global.safetensors"))
        job = {
            "model_path": str(adapter.model_path),
            "lora": adapter.lora_spec.model_dump(mode="json") if adapter.lora_spec else None,
            "method": adapter.method_spec.model_dump(mode="json"),
            "train": spec.model_dump(mode="json"),
            "placement": {
                "device": place.device,
                "precision": place.precision,
                "threads": max(1, (place.threads or torch.get_num_threads()) // spec.processes),
                "gradient_checkpointing": place.gradient_checkpointing,
            },
            "seed": seed,
            "frozen": list(frozen),
            "exchanged": None if exchanged is None else list(exchanged),
            "examples": [[e.input_ids, e.labels] for e in examples],
        }
        (folder / JOB_FILE).write_text(json.dumps(job))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={spec.processes}",
            "-m",
            "silotune.distributed_rank",
            str(folder),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(job["placement"]["threads"])}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0 or not (folder / "result.json").is_file():
            raise RuntimeError(
                f"the silo's {spec.processes}-process round failed (exit {proc.returncode}):\n"
                + proc.stderr[-4000:]
            )
        d = load_file(str(folder / "delta.safetensors"))
        result = json.loads((folder / "result.json").read_text())
    adapter.load_state(apply_delta(global_state, d))
    return d, result
