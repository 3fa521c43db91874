"""Executor: where the model runs. The engine talks to it through this small protocol only.

    UniProcExecutor   the model runner in this process (CPU or one GPU)

Tensor-parallel executors (one worker process per rank over torch.distributed,
or Ray actors across nodes) implement the same four methods.
"""

from __future__ import annotations

from typing import Protocol

from pagellm.config import EngineConfig
from pagellm.core.sched_output import ModelRunnerOutput, SchedulerOutput


class Executor(Protocol):
    def determine_num_blocks(self) -> int: ...

    def init_kv_cache(self, num_blocks: int) -> None: ...

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...

    def shutdown(self) -> None: ...


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        from pagellm.worker.model_runner import ModelRunner

        self.runner = ModelRunner(config)

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(sched)

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig) -> Executor:
    return UniProcExecutor(config)
