"""The tensor- and pipeline-parallel step protocol: rank 0 drives, ranks 1..N-1 follow.

    rank 0 (the engine's process)                 ranks 1..N-1 (worker processes or Ray actors)
    ---------------------------------             ---------------------------------------------
    init_tp_group(0)           <-- rendezvous -->  init_tp_group(r)
    ModelRunner(config, tp)                        ModelRunner(config, tp)     (each loads its shard)
    post(NumBlocks())          ------------------> the blocks its own layers fit
    gather -> the smallest     <------------------
    post(InitKVCache(n))       ------------------> allocate n blocks
    post(Execute(sched))       ------------------> execute_model(sched)         (every rank, in order: the
    execute_model(sched) -> ModelRunnerOutput      (results dropped)            collectives pair up)
    (pipeline stages: stage s receives the hidden states from stage s - 1 and sends its own to s + 1;
     the last stage's tp rank 0 samples and sends the ModelRunnerOutput to rank 0)
    post(AddLoRA(lora))        ------------------> load this rank's shard of the adapter
    post(CollectiveRPC)        ------------------> call the method on this rank's Worker
    gather(results) <-----------------------------  its result, or its error                (collective_rpc)
    post(Shutdown())           ------------------> return

Commands are small dataclasses dispatched by type, pickled and sent point to point on a gloo group
(`TPGroup.post_object`): rank 0 does not wait for the others to take them, so with pipeline stages it can
launch the next micro-batch (`execute_model_async`) while the later stages still work on earlier ones; the
step's result comes back from the last stage when the engine asks for it, oldest first. Per step what crosses
is the SchedulerOutput (new sequences in full, running ones as diffs: a few hundred bytes per sequence) one way,
and nothing back but the sampler's result: only one rank samples (rank 0, or the last stage's first), and the
others learn the sampled tokens from the next SchedulerOutput.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagellm.distributed.parallel import TPGroup, init_tp_group
from pagellm.executor.base import DoneStep

logger = logging.getLogger(__name__)


@dataclass
class InitKVCache:
    num_blocks: int


@dataclass
class Execute:
    sched: SchedulerOutput


@dataclass
class Shutdown:
    pass


@dataclass
class NumBlocks:
    """Each rank's count of KV blocks its own layers fit in its own memory."""


@dataclass
class AddLoRA:
    lora: object  # a LoRARequest: every rank loads its shard of the adapter


@dataclass
class RemoveLoRA:
    lora_int_id: int


@dataclass
class CollectiveRPC:
    method: object  # a Worker method's name, or a function taking the worker first (cloudpickled: bytes)
    args: tuple
    kwargs: dict


@dataclass
class RPCError:
    """A rank's failed collective_rpc call, as it crosses back to rank 0."""

    rank: int
    kind: str  # the exception's type name
    message: str


def run_rpc(worker, rank: int, cmd: CollectiveRPC):
    """One rank's part of collective_rpc: its result, or an RPCError (the ranks stay in step either way)."""
    from pagellm.worker.worker import call_worker

    try:
        method = cmd.method
        if isinstance(method, bytes):
            import cloudpickle

            method = cloudpickle.loads(method)
        return call_worker(worker, method, cmd.args, cmd.kwargs)
    except Exception as e:  # noqa: BLE001 - reported to the caller on rank 0
        logger.debug("collective_rpc on rank %d failed", rank, exc_info=e)
        return RPCError(rank, type(e).__name__, str(e))


def raise_rpc_errors(results: list) -> list:
    """Rank 0's results, or the first rank's error raised (a ValueError stays one)."""
    for r in results:
        if isinstance(r, RPCError):
            msg = r.message if r.rank == 0 else f"rank {r.rank}: {r.message}"
            raise (ValueError if r.kind == "ValueError" else RuntimeError)(
                msg if r.kind in ("ValueError", "RuntimeError") else f"{r.kind}: {msg}")
    return results


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_worker(config: EngineConfig, rank: int, init_method: str) -> None:
    """Body of ranks 1..N-1: join the group, load this shard, follow rank 0's commands until Shutdown."""
    from pagellm.executor.base import set_process_threads
    from pagellm.worker.model_runner import ModelRunner
    from pagellm.worker.worker import make_worker

    set_process_threads(config)
    p = config.parallel
    tp = init_tp_group(rank, p.tensor_parallel_size, init_method, config.device.device, p.distributed_timeout_s,
                       p.enable_expert_parallel, p.pipeline_parallel_size)
    runner = ModelRunner(config, tp)
    worker = make_worker(runner, rank, p.worker_extension_cls)
    sends_output = tp.pp.size > 1 and tp.samples  # the last stage's sampler, rank 0 being on the first stage
    while True:
        cmd = tp.recv_object()
        if isinstance(cmd, Execute):
            out = runner.execute_model(cmd.sched)
            if sends_output and not cmd.sched.is_empty:
                tp.send_output(out)
        elif isinstance(cmd, NumBlocks):
            tp.gather_objects(runner.determine_num_blocks())
        elif isinstance(cmd, CollectiveRPC):
            tp.gather_objects(run_rpc(worker, rank, cmd))
        elif isinstance(cmd, InitKVCache):
            runner.init_kv_cache(cmd.num_blocks)
        elif isinstance(cmd, AddLoRA):
            runner.add_lora(cmd.lora)
        elif isinstance(cmd, RemoveLoRA):
            runner.remove_lora(cmd.lora_int_id)
        elif isinstance(cmd, Shutdown):
            break
        else:
            raise TypeError(f"unknown worker command {type(cmd).__name__}")
    import torch.distributed as dist

    tp.outbox.drain(SHUTDOWN_DRAIN_S)
    dist.destroy_process_group()


SHUTDOWN_DRAIN_S = 5.0  # at shutdown, how long a rank waits for its last sends to be taken


class _FromLastStage:
    """A step whose result the last stage's sampler sends (pipeline stages): result() waits for it. The results
    come in the order the steps were launched, and the engine takes them in that order."""

    __slots__ = ("driver", "out")

    def __init__(self, driver: DriverRank) -> None:
        self.driver = driver
        self.out: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self.out is None:
            self.out = self.driver.tp.recv_output()
            self.driver.unreceived -= 1
        return self.out


class DriverRank:
    """Rank 0's side of the protocol: the model runner of this process plus the commands to the others."""

    def __init__(self, config: EngineConfig, init_method: str) -> None:
        from pagellm.executor.base import set_process_threads
        from pagellm.worker.model_runner import ModelRunner
        from pagellm.worker.worker import make_worker

        set_process_threads(config)
        p = config.parallel
        self.tp: TPGroup = init_tp_group(0, p.tensor_parallel_size, init_method, config.device.device,
                                         p.distributed_timeout_s, p.enable_expert_parallel, p.pipeline_parallel_size)
        self.runner = ModelRunner(config, self.tp)
        self.worker = make_worker(self.runner, 0, p.worker_extension_cls)
        self.unreceived = 0  # launched steps whose result the last stage has not handed over yet

    def determine_num_blocks(self) -> int:
        """The fewest blocks any rank fits (pipeline stages hold different layers, GPUs differ in free memory);
        every rank allocates that many."""
        self.tp.post_object(NumBlocks())
        return min(self.tp.gather_objects(self.runner.determine_num_blocks()))

    def collective_rpc(self, method, args: tuple, kwargs: dict) -> list:
        sent = method
        if not isinstance(method, str):  # by value: lambdas and closures too, as vLLM sends them
            import cloudpickle

            sent = cloudpickle.dumps(method)
        self.tp.post_object(CollectiveRPC(sent, args, kwargs))
        return self.tp.gather_objects(run_rpc(self.worker, 0, CollectiveRPC(method, args, kwargs)))

    def init_kv_cache(self, num_blocks: int) -> None:
        self.tp.post_object(InitKVCache(num_blocks))
        self.runner.init_kv_cache(num_blocks)

    def execute_model_async(self, sched: SchedulerOutput) -> DoneStep | _FromLastStage:
        """Run rank 0's part of the step (with stages: the first stage's layers, whose output goes on without
        waiting) and return a handle to its result."""
        self.tp.post_object(Execute(sched))
        out = self.runner.execute_model(sched)
        if self.tp.samples or sched.is_empty:
            return DoneStep(out)
        self.unreceived += 1
        return _FromLastStage(self)

    def add_lora(self, lora) -> bool:
        """Rank 0 loads (or refuses: a ValueError, nothing sent) first, then the others load their shards."""
        loaded = self.runner.add_lora(lora)
        if loaded:
            self.tp.post_object(AddLoRA(lora))
        return loaded

    def remove_lora(self, lora_int_id: int) -> bool:
        removed = self.runner.remove_lora(lora_int_id)
        if removed:
            self.tp.post_object(RemoveLoRA(lora_int_id))
        return removed

    def shutdown(self) -> None:
        """Take the results of steps still in flight (so the last stage's sends complete), then stop the ranks."""
        while self.unreceived:
            self.tp.recv_output()
            self.unreceived -= 1
        self.tp.post_object(Shutdown())
        self.tp.outbox.drain(SHUTDOWN_DRAIN_S)

    def close(self) -> None:
        """Leave the process group (torch.distributed holds one per process: the next engine makes its own)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()



class TPExecutorBase:
    """What the tensor-parallel executors share: rank 0 in this process, health checks, and the rule that a
    failed step leaves the ranks out of step, so the executor is dead from then on. Subclasses start the
    workers, tell which one is gone (`_gone`), and reap them (`_reap`)."""

    def __init__(self, config: EngineConfig, init_method: str) -> None:
        self.dead: str | None = None
        self.timeout_s = config.parallel.distributed_timeout_s
        try:
            self.driver = DriverRank(config, init_method)
        except BaseException:
            self._reap(kill=True)
            raise

    def _gone(self) -> str | None:
        raise NotImplementedError

    def _reap(self, kill: bool = False) -> None:
        raise NotImplementedError

    def check_health(self) -> None:
        from pagellm.executor.base import ExecutorDeadError

        if self.dead is None:
            self.dead = self._gone()
        if self.dead is not None:
            raise ExecutorDeadError(self.dead)

    def _run(self, fn, *args):
        from pagellm.executor.base import ExecutorDeadError

        self.check_health()
        try:
            return fn(*args)
        except Exception as e:
            self.dead = self._gone_after_failure() or self._failure(e)
            raise ExecutorDeadError(self.dead) from e

    def _failure(self, e: Exception) -> str:
        """Why a call to the ranks failed with every worker still alive: a hung rank times out (in a collective,
        or in a send it never took: gloo then closes the pair, and the other calls fail with that)."""
        what = f"{type(e).__name__}: {e}"
        if any(w in what.lower() for w in ("timed out", "timeout")):
            return f"a rank did not answer within the distributed timeout ({self.timeout_s:g} s; {what})"
        return f"a tensor-parallel step failed ({what})"

    def _gone_after_failure(self, wait_s: float = 2.0) -> str | None:
        """Which worker is gone, after a step failed. A collective fails as soon as a dead peer's sockets close,
        a moment before its exit can be seen: look again for up to `wait_s` so the error names the rank."""
        deadline = time.monotonic() + wait_s
        while True:
            gone = self._gone()
            if gone is not None or time.monotonic() >= deadline:
                return gone
            time.sleep(0.05)

    def determine_num_blocks(self) -> int:
        return self._run(self.driver.determine_num_blocks)

    def init_kv_cache(self, num_blocks: int) -> None:
        self._run(self.driver.init_kv_cache, num_blocks)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(sched).result()

    def execute_model_async(self, sched: SchedulerOutput) -> _Checked:
        """Launch a step; the handle's result() waits for it. With pipeline stages the engine keeps one step in
        flight per stage (disjoint sequences), each stage working on a different one."""
        return _Checked(self, self._run(self.driver.execute_model_async, sched))

    def add_lora(self, lora) -> bool:
        self.check_health()
        return self.driver.add_lora(lora)  # a refused adapter is a ValueError before any rank is told

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._run(self.driver.remove_lora, lora_int_id)

    def collective_rpc(self, method, args: tuple = (), kwargs: dict | None = None) -> list:
        """The method on every rank's worker; the results in rank order. A method's error is raised here and leaves
        the executor alive (every rank answered); a lost rank makes it dead."""
        return raise_rpc_errors(self._run(self.driver.collective_rpc, method, args, kwargs or {}))

    def shutdown(self) -> None:
        if self.dead is None:
            try:
                self.driver.shutdown()
            except Exception as e:  # noqa: BLE001 - reaping below is what matters
                logger.warning("tensor-parallel shutdown: %s", e)
        self.dead = self.dead or "shut down"
        self._reap(kill=self.dead != "shut down")
        self.driver.close()


class _Checked:
    """A launched step whose wait, like every call to the ranks, turns a lost rank into ExecutorDeadError."""

    __slots__ = ("executor", "pending")

    def __init__(self, executor: TPExecutorBase, pending) -> None:
        self.executor, self.pending = executor, pending

    def result(self) -> ModelRunnerOutput:
        return self.executor._run(self.pending.result)
