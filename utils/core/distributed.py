"""Process-group setup from torchrun's environment, plus the few collectives the stages need."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from config.config import torchrun_launch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (RANK, LOCAL_RANK, WORLD_SIZE); a plain run is one process.

    NCCL on GPUs (one per local rank), gloo on CPU.
    """
    launch = torchrun_launch()
    rank, local_rank, world_size = launch.rank, launch.local_rank, launch.world_size
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world_size, device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op for one process) and return the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy BatchNorm running statistics from ``src`` so every rank holds identical weights when saving."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src)
    return holder[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous rows ``[start, stop)`` of ``n`` for one rank; shards differ in size by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
