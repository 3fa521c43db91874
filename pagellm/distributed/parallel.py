"""Which tensor-parallel shard a process holds, and the collectives its layers call.

    TPGroup(rank, size, device_group, cpu_group)
        .all_reduce(x)            sum over ranks, in place (after row-parallel layers, the embedding)
        .gather_to_driver(x)      concatenate the last dimension on rank 0 (vocab-parallel logits)
        .broadcast_object(obj)    rank 0's Python object on every rank (the step's SchedulerOutput)
        .gather_objects(obj)      every rank's Python object on rank 0 (collective_rpc's results)

A model is built with the TPGroup of its process: no process-wide state, and a TPGroup() of size 1
(the default) makes every collective a no-op, so single-process code never touches
torch.distributed.

    init_tp_group(rank, size, init_method, backend) -> TPGroup      (once per process)

`device_group` carries tensors (gloo on CPU, NCCL on CUDA); `cpu_group` (always gloo) carries the
pickled control messages, so they never cost a device copy.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Any

import torch

# How long a collective may wait for a peer before it fails (a dead or stuck worker becomes an error).
DEFAULT_TIMEOUT_S = 60.0


@dataclass
class CommStats:
    """Wall time this rank spent inside collectives (waiting for peers included), for benchmarks."""

    seconds: float = 0.0
    calls: int = 0


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0  # this process's shard index
    size: int = 1  # tensor_parallel_size
    device_group: Any = None  # torch.distributed group for tensors (None when size 1)
    cpu_group: Any = None  # gloo group for Python objects (None when size 1)
    comm: CommStats = field(default_factory=CommStats, compare=False)  # this group's own counters
    expert_parallel: bool = False  # mixtures of experts split their experts over the ranks (FusedMoE)

    @property
    def is_driver(self) -> bool:
        """Rank 0: samples, and talks to the scheduler."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            start = time.perf_counter()
            torch.distributed.all_reduce(x, group=self.device_group)
            self._count(start)
        return x

    def gather_to_driver(self, x: torch.Tensor) -> torch.Tensor | None:
        """(N, local) on every rank -> (N, size * local) on rank 0, None elsewhere."""
        if self.size == 1:
            return x
        start = time.perf_counter()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
        torch.distributed.gather(x, parts, dst=0, group=self.device_group)
        self._count(start)
        return torch.cat(parts, dim=-1) if self.is_driver else None

    def broadcast_object(self, obj: Any = None) -> Any:
        if self.size == 1:
            return obj
        start = time.perf_counter()
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.cpu_group)
        self._count(start)
        return box[0]

    def gather_objects(self, obj: Any) -> list | None:
        """Every rank's Python object, in rank order, on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.is_driver else None
        torch.distributed.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out

    def _count(self, start: float) -> None:
        self.comm.seconds += time.perf_counter() - start
        self.comm.calls += 1

    def shard(self, total: int) -> tuple[int, int]:
        """(start, size) of this rank's even share of `total` rows (total must divide)."""
        if total % self.size:
            raise ValueError(f"{total} does not split evenly over tensor_parallel_size={self.size}")
        size = total // self.size
        return self.rank * size, size


def init_tp_group(rank: int, size: int, init_method: str, device: str = "cpu",
                  timeout_s: float = DEFAULT_TIMEOUT_S, expert_parallel: bool = False) -> TPGroup:
    """Join the process group of `size` ranks at `init_method` (tcp://host:port) and return this rank's TPGroup."""
    if size == 1:
        return TPGroup()
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return TPGroup(rank, size, dist.group.WORLD, cpu_group, expert_parallel=expert_parallel)
