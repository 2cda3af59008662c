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
        the wrapper for training steps; read and save weights from ``module``. For BatchNorm see
        ``global_batch``.
        """
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        if self.backend == "nccl":
            return DistributedDataParallel(module, device_ids=[self.local_rank], output_device=self.local_rank)
        return DistributedDataParallel(module)

    @contextmanager
    def global_batch(self, module: nn.Module) -> Iterator[nn.Module]:
        """Inside the block, ``module``'s batch-dependent layers act on the global batch.

        Data-parallel training hands each rank a share of the batch. Plain BatchNorm would then
        normalise with the share's mean and variance, and plain Dropout would draw every rank's
        masks from the same RNG state (all ranks are seeded alike): both a different function than
        the one-process run computes. Here every ``BatchNorm1d/2d/3d`` child becomes a
        ``GlobalBatchNorm`` (statistics all-reduced over the ranks) and every ``nn.Dropout`` a
        ``GlobalDropout`` (the mask of the whole global batch drawn, this rank's rows kept). The new
        layers share the originals' parameters and buffers, so optimizers, DDP and ``state_dict``
        see the same tensors, and the originals are put back in ``finally``. PyTorch's own
        ``SyncBatchNorm`` runs on CUDA only; these work under gloo and nccl alike. In a one-process
        world the module is left as is.
        """
        if not self.distributed:
            yield module
            return
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for parent in list(module.modules()):
                for name, child in list(parent.named_children()):
                    replacement: nn.Module | None = None
                    if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
                        replacement = GlobalBatchNorm.sharing(child)
                    elif type(child) is nn.Dropout:
                        replacement = GlobalDropout(child.p, world=self)
                        replacement.train(child.training)
                    if replacement is not None:
                        setattr(parent, name, replacement)
                        swapped.append((parent, name, child))
            yield module
        finally:
            for parent, name, child in reversed(swapped):
                child.train(getattr(parent, name).training)
                setattr(parent, name, child)


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
    except BaseException:
        # Another rank may be gone: no collective here, just leave.
        dist.destroy_process_group()
        raise
    _leave_together()


def _leave_together() -> None:
    """Leave the group after every rank has finished with it.

    A rank that is done (rank 1, once rank 0 has sent it the test result) would otherwise tear its
    connections down while rank 0 still writes the run folder. The barrier makes the ranks leave
    together, and collecting first drops the objects that still hold the group (a DDP reducer,
    work handles) so its threads are joined here, on this thread, rather than during interpreter
    shutdown.
    """
    import gc

    try:
        dist.barrier()
    finally:
        gc.collect()
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


class _AllReduceSum(torch.autograd.Function):
    """The sum of ``tensor`` over the ranks, differentiable: the gradient is summed over the ranks too.

    (``torch.distributed.nn.functional.all_reduce`` does this but is deprecated and warns on every
    call.) Forward and backward are blocking collectives, issued in the same order on every rank
    because every rank runs the same layers.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the batch summed over all ranks.

    Each rank computes its share's per-channel mean and (biased) variance, the ranks all-reduce
    ``count``, ``count * mean`` and ``count * (variance + mean**2)`` in float64 (differentiably:
    the backward pass all-reduces the gradients of those sums, so every rank gets the gradient of
    the global batch's loss), and every rank normalises with the global mean and variance. The
    running statistics follow ``nn.BatchNorm`` (unbiased variance, ``momentum``, or a cumulative
    average when ``momentum`` is ``None``). Eval mode is plain BatchNorm with the running statistics.
    Built by ``World.global_batch``; not meant to be saved as a module (save ``state_dict``s).
    """

    @classmethod
    def sharing(cls, original: nn.modules.batchnorm._BatchNorm) -> GlobalBatchNorm:
        """A ``GlobalBatchNorm`` holding ``original``'s very parameter and buffer tensors."""
        norm = cls(
            original.num_features, eps=original.eps, momentum=original.momentum, affine=original.affine,
            track_running_stats=original.track_running_stats,
        )
        for name, parameter in original.named_parameters(recurse=False):
            setattr(norm, name, parameter)
        for name, buffer in original.named_buffers(recurse=False):
            setattr(norm, name, buffer)
        norm.train(original.training)
        return norm

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        count = input.numel() // channels
        var, mean = torch.var_mean(input.float(), dim=dims, correction=0)
        local = torch.cat([
            torch.full((1,), float(count), dtype=torch.float64, device=input.device),
            mean.double() * count,
            (var.double() + mean.double() ** 2) * count,
        ])
        total = _AllReduceSum.apply(local)
        n = total[0]
        global_mean = total[1 : 1 + channels] / n
        global_var = (total[1 + channels :] / n - global_mean**2).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            assert self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = global_var * (n / (n - 1)) if float(n) > 1 else global_var
                self.running_mean.mul_(1 - factor).add_(global_mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        shape = [1, channels] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(global_var + self.eps).to(input.dtype)
        out = (input - global_mean.to(input.dtype).view(shape)) * scale.view(shape)
        if self.weight is not None and self.bias is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


class GlobalDropout(nn.Module):
    """Dropout whose mask is this rank's rows of the mask a one-process run draws for the whole batch.

    Every rank draws the ``(global batch, ...)`` mask from the global RNG, exactly as
    ``nn.Dropout`` does for a one-process batch (``bernoulli_`` on a float tensor of that shape),
    and keeps the rows of its share (shares are contiguous, in rank order). So the masks, and the
    RNG state afterwards, are those of the one-process run. Eval mode is the identity.
    """

    def __init__(self, p: float, *, world: World) -> None:
        super().__init__()
        self.p = p
        self.world = world

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        counts = [int(c) for c in self.world.all_gather(torch.tensor([input.shape[0]]))]
        start = sum(counts[: self.world.rank])
        if self.p == 1.0:
            return input * 0.0
        mask = torch.empty((sum(counts), *input.shape[1:]), dtype=input.dtype, device=input.device)
        mask.bernoulli_(1.0 - self.p).div_(1.0 - self.p)
        return input * mask[start : start + input.shape[0]]
