"""Executor: where the model runs. The engine talks to it through this small protocol only.

    UniProcExecutor     the model runner in this process (CPU or one GPU)
    MultiprocExecutor   tensor / pipeline parallel: rank 0 in this process, ranks 1.. in local worker processes
    RayExecutor         tensor / pipeline parallel: rank 0 in this process, ranks 1.. as Ray actors (any node)

The two parallel executors share the step protocol (executor/tp_worker.py): rank 0
broadcasts each command to the other ranks over a gloo group, every rank runs it on its shard,
and rank 0 returns the result (with pipeline stages: the one the last stage sends it). They differ
only in how worker processes are started and watched.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch

from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput


class ExecutorDeadError(RuntimeError):
    """A worker died or stopped answering: the executor cannot run another step."""


class Executor(Protocol):
    def determine_num_blocks(self) -> int: ...

    def init_kv_cache(self, num_blocks: int) -> None: ...

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...

    def collective_rpc(self, method, args: tuple = (), kwargs: dict | None = None) -> list:
        """A Worker method (by name) or a function taking the worker first, on every rank: the results in rank
        order (worker/worker.py)."""
        ...

    def check_health(self) -> None:
        """Raises ExecutorDeadError when a worker is gone."""
        ...

    def shutdown(self) -> None: ...


class AsyncExecutor(Executor, Protocol):
    """What async scheduling needs on top (one device: UniProcExecutor): queue a step and return a handle
    whose result() waits for it; a grammar_deferred step samples once finish_sampling brings its masks."""

    def execute_model_async(self, sched: SchedulerOutput) -> Any: ...

    def finish_sampling(self, pending: Any, grammar_bitmask: Any) -> None: ...


class DoneStep:
    """A step that ran to completion: its result is already here (the handle execute_model_async may return)."""

    __slots__ = ("out",)

    def __init__(self, out: ModelRunnerOutput) -> None:
        self.out = out

    def result(self) -> ModelRunnerOutput:
        return self.out


def set_process_threads(config: EngineConfig) -> None:
    """Torch intra-op threads of the calling process: the configured count, or an even share of the
    cores when several tensor-parallel ranks share this machine."""
    n = config.device.num_threads
    world = config.parallel.world_size
    if n is None and world > 1 and config.device.device == "cpu":
        n = max(1, (os.cpu_count() or 1) // world)
    if n:
        torch.set_num_threads(n)


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        from pagellm.worker.model_runner import ModelRunner
        from pagellm.worker.worker import make_worker

        set_process_threads(config)
        self.runner = ModelRunner(config)
        self.worker = make_worker(self.runner, 0, config.parallel.worker_extension_cls)

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(sched)

    def execute_model_async(self, sched: SchedulerOutput):
        return self.runner.execute_model_async(sched)

    def finish_sampling(self, pending, grammar_bitmask) -> None:
        self.runner.finish_sampling(pending, grammar_bitmask)

    def add_lora(self, lora) -> bool:
        return self.runner.add_lora(lora)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.runner.remove_lora(lora_int_id)

    def collective_rpc(self, method, args: tuple = (), kwargs: dict | None = None) -> list:
        from pagellm.worker.worker import call_worker

        return [call_worker(self.worker, method, args, kwargs or {})]

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig) -> Executor:
    if config.parallel.world_size == 1:
        return UniProcExecutor(config)
    if config.parallel.distributed_executor_backend == "ray":
        from pagellm.executor.ray_executor import RayExecutor

        return RayExecutor(config)
    from pagellm.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(config)
