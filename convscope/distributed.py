"""The one place that knows ``torch.distributed``.

Under ``torchrun`` every process gets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment (and ``MASTER_ADDR``/``MASTER_PORT`` for the rendezvous). ``init_from_env`` reads them,
joins the process group (gloo on CPU, nccl on CUDA) and leaves it in ``finally``; without them it
yields a one-process ``World`` whose collectives return their input, so callers write one code path.

What the rest of convscope needs from it: which slice of the data a rank owns (``shard_range``),
whether this rank writes files (``World.is_rank0``), gathering tensors and small Python objects
from every rank (``all_gather``, ``all_gather_object``), summing counters over the ranks
(``all_reduce_sum``), a ``barrier``, and a model wrapped for data-parallel training
(``World.data_parallel``: ``DistributedDataParallel``, which averages gradients over the ranks).
Merging what was gathered (a top-k, metrics) belongs to the caller, which knows what the tensors
mean.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from convscope.errors import BadArgument


@dataclass(frozen=True)
class World:
    """This process's place among the ranks.

    Attributes:
        rank: global rank, 0..size-1.
        size: number of processes (1 without torchrun).
        local_rank: rank on this machine (picks the CUDA device).
        backend: ``"gloo"``, ``"nccl"``, or ``None`` when there is no process group.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1 and self.backend is not None

    @property
    def device(self) -> torch.device:
        """Where collective tensors must live: the rank's GPU for nccl, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order, on the
        caller's device."""
        if not self.distributed:
            return [tensor]
        local = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local)
        return [part.to(tensor.device) for part in parts]

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's picklable ``value``, in rank order (for small things: counts, file lists)."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor on the caller's device; the input is
        left alone)."""
        if not self.distributed:
            return tensor.clone()
        total = tensor.detach().to(self.device).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(tensor.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def data_parallel(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in ``DistributedDataParallel`` (the module itself in a one-process world).

        The wrapper shares ``module``'s parameters, broadcasts rank 0's weights and buffers when it
        is built and at every forward, and averages gradients over the ranks in ``backward``. Call
        the wrapper for training steps; read and save weights from ``module``.

        BatchNorm: on nccl (CUDA) every BatchNorm becomes a ``SyncBatchNorm``, so that batch
        statistics are those of the global batch, as in a one-process run. PyTorch has no
        ``SyncBatchNorm`` for CPU tensors, so under gloo each rank normalises with the statistics
        of its own shard (the running statistics kept are rank 0's).
        """
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        if self.backend == "nccl":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            return DistributedDataParallel(module, device_ids=[self.local_rank], output_device=self.local_rank)
        return DistributedDataParallel(module)


def env_world() -> World:
    """The rank and world size torchrun put in the environment (a one-process world without it).

    Raises:
        BadArgument: the variables are present but malformed or inconsistent.
    """
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise BadArgument("RANK/WORLD_SIZE/LOCAL_RANK", f"not integers: {exc}") from exc
    if size < 1 or not 0 <= rank < size:
        raise BadArgument("RANK/WORLD_SIZE", f"rank {rank} does not fit a world of {size}")
    return World(rank=rank, size=size, local_rank=local_rank)


def current_world() -> World:
    """The world of an already initialised process group (one process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        world = env_world()
        return World(
            rank=dist.get_rank(), size=dist.get_world_size(), local_rank=world.local_rank,
            backend=str(dist.get_backend()),
        )
    return World()


def pick_backend(device: torch.device | str | None = None) -> str:
    """nccl when the work runs on CUDA and nccl is built in, otherwise gloo."""
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return "nccl" if on_cuda and dist.is_nccl_available() else "gloo"


@contextmanager
def init_from_env(device: torch.device | str | None = None, *, backend: str | None = None) -> Iterator[World]:
    """Join the torchrun process group for the duration of the block.

    Without torchrun (``WORLD_SIZE`` unset or 1) nothing is initialised and a one-process
    ``World`` is yielded. A group that already exists (set up by the caller) is used as is and
    left alone on exit; one created here is destroyed in ``finally``.

    Args:
        device: the device the work runs on; picks nccl for CUDA, gloo otherwise.
        backend: force a backend.
    """
    if dist.is_available() and dist.is_initialized():
        yield current_world()
        return
    world = env_world()
    if world.size == 1:
        yield world
        return
    if not dist.is_available():
        raise BadArgument("torchrun", "this PyTorch build has no torch.distributed")
    chosen = backend or pick_backend(device)
    if chosen == "nccl":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend=chosen, rank=world.rank, world_size=world.size)
    try:
        yield World(rank=world.rank, size=world.size, local_rank=world.local_rank, backend=chosen)
    finally:
        dist.destroy_process_group()


def shard_range(count: int, rank: int, size: int) -> range:
    """The contiguous slice of ``range(count)`` owned by ``rank`` of ``size``.

    Sizes differ by at most one (the first ``count % size`` ranks take one more), and the slices
    follow rank order, so concatenating them in rank order gives back ``range(count)``.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} does not fit a world of {size}")
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
