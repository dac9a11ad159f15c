"""Data-parallel training with torch.distributed: the process group, DDP around a stage's step,
and the launcher behind `fastad train --nproc N`.

The training loop (fastad.training.loop) uses one `Parallel` for every run; in a single process
it does nothing (no process group, the step runs as is), so there is one code path. Under
`torchrun` (the environment has WORLD_SIZE > 1, RANK, LOCAL_RANK, MASTER_ADDR/PORT) the loop:

- starts the process group ("gloo" on CPU, "nccl" on CUDA, each process on cuda:LOCAL_RANK)
  unless the caller already did;
- splits every step's global batch (the loop's seeded per-epoch shuffle, the same on every rank)
  into `world` equal contiguous parts, one per rank, so N processes with batch B/N each take the
  same optimiser steps as one process with batch B;
- runs the stage's step inside `DistributedDataParallel` (around the parameters the stage's
  optimiser trains): DDP broadcasts rank 0's parameters at the start and averages the gradients
  of the loop's `backward()` across ranks;
- averages the step's loss values across ranks (history, divergence check: every rank sees the
  same numbers and stops together) and gathers batches of cached features and the normal-score
  images computed rank by rank (`map_batches`, `gather_scores`);
- lets rank 0 alone print progress, write checkpoints and the run directory.

BatchNorm: on CUDA the trained modules' BatchNorm layers become SyncBatchNorm (global batch
statistics). SyncBatchNorm has no CPU implementation, so on CPU each rank normalises with its own
part of the batch (and keeps its own running statistics; rank 0's are saved) — the one place
where N CPU processes differ from one process (UTAD's IE-Net; see docs/distributed.md).
"""
from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FastADError

log = logging.getLogger(__name__)


def launched_world_size() -> int:
    """The number of processes torchrun started this one among (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise FastADError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


@dataclass
class Parallel:
    """This process's place in a data-parallel run (rank 0 of 1 without torch.distributed)."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: torch.device) -> "Parallel":
        """Single-process, unless started by torchrun (or inside an initialised process group).
        Each process of a CUDA run uses the GPU cuda:LOCAL_RANK."""
        import torch.distributed as dist

        world = launched_world_size()
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
        if world <= 1:
            return cls(device=device)
        if not dist.is_available():
            raise FastADError("this torch build has no torch.distributed: cannot train with several processes")
        rank = int(os.environ.get("RANK", dist.get_rank() if dist.is_initialized() else 0))
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if device.index not in (None, local):
                raise FastADError(f"with several processes each one trains on cuda:LOCAL_RANK; "
                                  f"pass --device cuda, not {device}")
            if local >= torch.cuda.device_count():
                raise FastADError(f"process {rank} needs cuda:{local} but only {torch.cuda.device_count()} "
                                  "GPU(s) are visible on its machine")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        return cls(rank=rank, world=world, device=device)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, checkpoints and writes the run."""
        return self.rank == 0

    # -- process group -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the process group unless one is running. It lives as long as the process (a
        second `train` in the same processes uses it again: a process group destroyed under
        torchrun cannot be started again), and is destroyed at exit."""
        import atexit

        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            atexit.register(_destroy_group)
            log.info("data-parallel training: rank %d of %d on %s (%s)", self.rank, self.world, self.device,
                     dist.get_backend())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    # -- model -------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """On CUDA with several processes: BatchNorm -> SyncBatchNorm in every module but the
        frozen `model.backbone` (parameters are kept, so optimisers built later see them)."""
        if self.world > 1 and self.device.type == "cuda":
            for name, child in list(model.named_children()):
                if child is not getattr(model, "backbone", None):
                    setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        return model

    def check_batch(self, stage_name: str, batch_size: int) -> None:
        if batch_size % self.world:
            raise FastADError(f"{stage_name}: the batch size ({batch_size}) must be a multiple of the number "
                              f"of processes ({self.world}); each takes an equal part of every batch")

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a step's global batch of sample indices."""
        if self.world == 1:
            return batch
        part = len(batch) // self.world
        return batch[self.rank * part:(self.rank + 1) * part]

    def wrap_step(self, optimizer: torch.optim.Optimizer, step):
        """The stage's `step` as the loop calls it: in DDP (around the optimiser's parameters)
        with several processes, so the loop's backward() averages gradients across ranks."""
        if self.world == 1:
            return step
        from torch.nn.parallel import DistributedDataParallel

        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        return DistributedDataParallel(_StepModule(params, step))  # no buffers: only gradients are synced

    # -- reductions ----------------------------------------------------------------------------
    def mean_values(self, values: dict[str, float]) -> dict[str, float]:
        """Each loss value averaged over the ranks (one all-reduce per step)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def map_batches(self, fn, num_items: int, batch_size: int) -> list:
        """[fn(batch_index, start, stop) for every batch of range(num_items)], in batch order.
        With several processes each rank computes every world-th batch and the results (CPU
        tensors, or lists/tuples of them) are all-gathered, so every rank ends with all of them."""
        starts = list(range(0, num_items, batch_size))
        mine = {b: fn(b, s, min(s + batch_size, num_items)) for b, s in enumerate(starts)
                if b % self.world == self.rank}
        if self.world == 1:
            return [mine[b] for b in range(len(starts))]
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, mine)
        merged = {b: out for part in gathered for b, out in part.items()}
        return [merged[b] for b in range(len(starts))]

    def gather_scores(self, image_scores, num_images: int):
        """`image_scores(indices)` of images 0..num_images-1, each rank scoring every world-th
        image; -> all the scores in image order (on every rank)."""
        import numpy as np

        mine = np.asarray(image_scores(list(range(self.rank, num_images, self.world))), dtype=np.float64)
        if self.world == 1:
            return mine
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, mine)
        out = np.empty(num_images, dtype=np.float64)
        for r, part in enumerate(gathered):
            out[r::self.world] = part
        return out

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class _StepModule(nn.Module):
    """What DDP wraps: the stage's trained parameters (the same Parameter objects the family's
    modules hold) and its step as the forward. DDP syncs the gradients of the backward that
    follows a forward through it; the step may use the parameters through any of the family's
    modules and methods."""

    def __init__(self, params: list[nn.Parameter], step):
        super().__init__()
        self.params = nn.ParameterList(params)
        self.step = step

    def forward(self, idx, generator, step_index):
        return self.step(idx, generator, step_index)


# --------------------------------------------------------------------------------------------
# `fastad train --nproc N`: torchrun on this machine
# --------------------------------------------------------------------------------------------
def launch(cli_argv: list[str], nproc: int, device: str = "auto") -> int:
    """Run `python -m fastad <cli_argv>` (a `train` command) in `nproc` processes on this machine through
    torch.distributed.run (torchrun), its rendezvous on 127.0.0.1 at a free port. -> 0, or a
    FastADError naming the ranks that failed (each printed its own error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if nproc < 1:
        raise FastADError(f"--nproc must be >= 1, got {nproc}")
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_cuda and nproc > torch.cuda.device_count():
        raise FastADError(f"--nproc {nproc} needs {nproc} GPUs; {torch.cuda.device_count()} visible "
                          "(use --device cpu for CPU processes)")
    args = ["--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", uuid.uuid4().hex,
            "--local-addr", "127.0.0.1", "-m", "fastad", *cli_argv]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        torchrun(args)
    except ChildFailedError as e:
        failed = ", ".join(f"rank {rank} (exit {f.exitcode})" for rank, f in sorted(e.failures.items()))
        raise FastADError(f"data-parallel training failed: {failed}") from None
    sys.stdout.flush()
    return 0
