"""Which shard of the model a process holds, and the collectives its layers call.

    TPGroup(rank, size, device_group, cpu_group, pp=PipelineStage(...))
        .all_reduce(x)            sum over the stage's tensor-parallel ranks, in place (row-parallel layers)
        .gather_to_driver(x)      concatenate the last dimension on the stage's tp rank 0 (vocab-parallel logits)
        .post_object(obj) / .recv_object()   global rank 0's commands to every other rank, in order
        .broadcast_object(obj)    global rank 0's Python object on every rank, in lockstep (a draft model's tokens)
        .gather_objects(obj)      every rank's Python object on global rank 0 (collective_rpc's results)
        .send_output(obj) / .recv_output()   the last stage's step result to global rank 0
        .send_hidden(x) / .recv_hidden(...)  the hidden states at a stage boundary, between the same tp ranks
    PipelineStage(rank, size)
        .layers(num_layers)       the decoder layers this stage holds (vLLM's split: the remainder to the
                                  stages before the last, which also holds the LM head)

Global ranks: rank g is tp rank g % tp of pipeline stage g // tp (vLLM's layout); tensor_parallel_size x
pipeline_parallel_size processes in all. A model is built with the TPGroup of its process: no process-wide state,
and a TPGroup() of size 1 (the default) makes every collective a no-op, so single-process code never touches
torch.distributed.

    init_tp_group(rank, size, init_method, device, pp_size=...) -> TPGroup      (once per process)

`device_group` carries the stage's tensors (gloo on CPU, NCCL on CUDA); the hidden states between stages go
point to point over the default group; `cpu_group` (always gloo, every rank) carries the pickled control
messages, so they never cost a device copy.

Everything sent downstream (commands, hidden states, step results) goes without waiting for the receiver: a
gloo send returns only once its peer has posted the matching receive, so a rank that waited there would stall
behind a busy peer, and pipeline stages could not work on different micro-batches at once. Sends are
queued (`_Outbox`) and a rank waits only where it needs what it receives; each kind of message has its own
tag, so each arrives in the order it was sent.
"""

from __future__ import annotations

import datetime
import logging
import pickle
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

# How long a collective may wait for a peer before it fails (a dead or stuck worker becomes an error).
DEFAULT_TIMEOUT_S = 60.0


# point-to-point tags: each stream of messages keeps its own order
TAG_HIDDEN, TAG_COMMAND, TAG_OUTPUT = 0, 1, 2


class _Outbox:
    """Sends in flight, each with the tensors it reads, kept alive until its peer has taken it. A gloo send's work
    reports completion only once waited on, so a daemon thread waits on each in turn (wait releases the GIL)."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def add(self, works: list, keep: tuple) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._reap, name="pagellm-outbox", daemon=True)
            self._thread.start()
        for w in works:
            self._queue.put((w, keep))

    def _reap(self) -> None:
        while True:
            work, _keep = self._queue.get()
            try:
                work.wait()
            except Exception as e:  # noqa: BLE001 - a peer gone: the rank waiting on it reports the failure
                logger.debug("a send was not taken: %s", e)
            finally:
                self._queue.task_done()

    def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every send to be taken; False if some were not (a peer gone)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True


def _pack(obj: Any) -> tuple[torch.Tensor, torch.Tensor]:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return torch.tensor([len(data)], dtype=torch.int64), torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclass
class CommStats:
    """Wall time this rank spent inside collectives (waiting for peers included), for benchmarks."""

    seconds: float = 0.0
    calls: int = 0


def pp_layer_range(num_layers: int, rank: int, size: int) -> range:
    """Stage `rank`'s decoder layers out of `num_layers` split over `size` stages: even shares, one more each for
    the stages before the last while a remainder lasts (the last stage also runs the LM head)."""
    if num_layers < size:
        raise ValueError(f"{num_layers} decoder layers do not split over pipeline_parallel_size={size}")
    parts = [num_layers // size] * size
    for i in range(2, num_layers % size + 2):
        parts[-i] += 1
    start = sum(parts[:rank])
    return range(start, start + parts[rank])


@dataclass(frozen=True)
class PipelineStage:
    """This process's pipeline stage: which layers it holds and its neighbours at the stage boundaries."""

    rank: int = 0  # stage index
    size: int = 1  # pipeline_parallel_size

    @property
    def is_first(self) -> bool:
        """Embeds the tokens."""
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        """Holds the final norm and the LM head, and samples."""
        return self.rank == self.size - 1

    def layers(self, num_layers: int) -> range:
        return pp_layer_range(num_layers, self.rank, self.size)


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0  # this process's shard index inside its pipeline stage
    size: int = 1  # tensor_parallel_size
    device_group: Any = None  # torch.distributed group for the stage's tensors (None when size 1)
    cpu_group: Any = None  # gloo group of every rank, for Python objects (None in one process)
    comm: CommStats = field(default_factory=CommStats, compare=False)  # this group's own counters
    expert_parallel: bool = False  # mixtures of experts split their experts over the ranks (FusedMoE)
    pp: PipelineStage = field(default_factory=PipelineStage)  # this process's pipeline stage
    outbox: _Outbox = field(default_factory=_Outbox, compare=False)  # sends not yet taken by their peers

    @property
    def is_driver(self) -> bool:
        """Tensor-parallel rank 0 of the stage: the vocabulary-parallel logits are gathered here."""
        return self.rank == 0

    @property
    def samples(self) -> bool:
        """Samples (and pools, and runs the logits processors): tp rank 0 of the last stage."""
        return self.rank == 0 and self.pp.is_last

    @property
    def world_size(self) -> int:
        return self.size * self.pp.size

    @property
    def global_rank(self) -> int:
        return self.pp.rank * self.size + self.rank

    @property
    def sampler_rank(self) -> int:
        """The global rank that samples."""
        return (self.pp.size - 1) * self.size

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
        torch.distributed.gather(x, parts, dst=self.pp.rank * self.size, group=self.device_group)
        self._count(start)
        return torch.cat(parts, dim=-1) if self.is_driver else None

    def broadcast_object(self, obj: Any = None) -> Any:
        """Global rank 0's Python object on every rank, all of them waiting for it (inside a step)."""
        if self.world_size == 1:
            return obj
        start = time.perf_counter()
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.cpu_group)
        self._count(start)
        return box[0]

    def post_object(self, obj: Any) -> None:
        """Global rank 0: `obj` to every other rank (which takes it with recv_object), without waiting for them."""
        if self.world_size == 1:
            return
        start = time.perf_counter()
        size, data = _pack(obj)
        self._isend_object(size, data, range(1, self.world_size), TAG_COMMAND)
        self._count(start)

    def recv_object(self) -> Any:
        """The next object global rank 0 posted."""
        return self._recv_object(0, TAG_COMMAND)

    def _isend_object(self, size: torch.Tensor, data: torch.Tensor, dsts, tag: int) -> None:
        works = []
        for dst in dsts:
            works.append(torch.distributed.isend(size, dst, group=self.cpu_group, tag=tag))
            works.append(torch.distributed.isend(data, dst, group=self.cpu_group, tag=tag))
        self.outbox.add(works, (size, data))

    def _recv_object(self, src: int, tag: int) -> Any:
        size = torch.empty(1, dtype=torch.int64)
        torch.distributed.recv(size, src, group=self.cpu_group, tag=tag)
        data = torch.empty(int(size), dtype=torch.uint8)
        torch.distributed.recv(data, src, group=self.cpu_group, tag=tag)
        return pickle.loads(data.numpy().tobytes())

    def gather_objects(self, obj: Any) -> list | None:
        """Every rank's Python object, in global rank order, on global rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.global_rank == 0 else None
        torch.distributed.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out

    def send_hidden(self, x: torch.Tensor) -> None:
        """The hidden states leaving this pipeline stage, to the same tp rank of the next stage (not waiting for it)."""
        x = x.contiguous()
        work = torch.distributed.isend(x, self.global_rank + self.size, tag=TAG_HIDDEN)
        if not x.is_cuda:  # (NCCL keeps the tensor until the send is done; waiting would stall this rank's stream)
            self.outbox.add([work], (x,))

    def recv_hidden(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The hidden states entering this pipeline stage, from the same tp rank of the stage before."""
        x = torch.empty(shape, dtype=dtype, device=device)
        torch.distributed.recv(x, src=self.global_rank - self.size, tag=TAG_HIDDEN)
        return x

    def send_output(self, obj: Any) -> None:
        """The sampling rank's step result to global rank 0 (pipeline parallelism: the driver is on stage 0)."""
        size, data = _pack(obj)
        self._isend_object(size, data, (0,), TAG_OUTPUT)

    def recv_output(self) -> Any:
        """The oldest step result the sampling rank sent that rank 0 has not taken yet."""
        return self._recv_object(self.sampler_rank, TAG_OUTPUT)

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
                  timeout_s: float = DEFAULT_TIMEOUT_S, expert_parallel: bool = False, pp_size: int = 1) -> TPGroup:
    """Join the process group of `size` x `pp_size` ranks at `init_method` (tcp://host:port) as global rank `rank`
    and return its TPGroup (its stage's tensor-parallel group, its pipeline stage)."""
    world = size * pp_size
    if world == 1:
        return TPGroup()
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device == "cuda" and torch.cuda.device_count() > 1:
        # one GPU per local rank ("cuda" means the current device); a Ray actor sees only its own GPU
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    device_group = dist.group.WORLD
    if pp_size > 1:  # one group per stage (every rank creates every group, in the same order)
        device_group = None
        for stage in range(pp_size):
            group = dist.new_group(list(range(stage * size, (stage + 1) * size)), timeout=timeout,
                                   backend=backend) if size > 1 else None
            if stage == rank // size:
                device_group = group
    return TPGroup(rank % size, size, device_group, cpu_group, expert_parallel=expert_parallel,
                   pp=PipelineStage(rank // size, pp_size))
