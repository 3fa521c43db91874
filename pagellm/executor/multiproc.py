"""MultiprocExecutor: tensor parallelism on one machine, one process per rank.

Rank 0 (the driver) runs in the engine's process; ranks 1..N-1 are fresh interpreters
(`python -m pagellm.executor.worker_main`, the config pickled on stdin) running tp_worker.run_worker.
They meet at a TCP rendezvous on localhost (gloo on CPU, NCCL on CUDA).

A worker that dies or hangs: the next collective fails (at once when its socket closes, or after
`distributed_timeout` seconds), the executor turns that into ExecutorDeadError, and it stays dead:
the engine fails the requests in flight and refuses new ones. `check_health` notices a dead worker
between steps too. `shutdown` (and garbage collection, and interpreter exit) reaps every worker.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import weakref

from pagellm.config import EngineConfig
from pagellm.executor.tp_worker import TPExecutorBase, free_port

logger = logging.getLogger(__name__)


def _reap(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def _start_worker(config: EngineConfig, rank: int, init_method: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "pagellm.executor.worker_main", str(rank), init_method],
                            stdin=subprocess.PIPE)
    proc.stdin.write(pickle.dumps(config))
    proc.stdin.close()
    return proc


class MultiprocExecutor(TPExecutorBase):
    def __init__(self, config: EngineConfig) -> None:
        p = config.parallel
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.procs = [_start_worker(config, rank, init_method) for rank in range(1, p.world_size)]
        self._finalizer = weakref.finalize(self, _reap, self.procs)
        super().__init__(config, init_method)
        logger.info("%d ranks (tensor parallel %d x pipeline stages %d; rank 0 in pid %d, workers %s)", p.world_size,
                    p.tensor_parallel_size, p.pipeline_parallel_size, os.getpid(), [w.pid for w in self.procs])

    def _gone(self) -> str | None:
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                return f"worker rank {rank} (pid {p.pid}) exited with code {p.returncode}"
        return None

    def _reap(self, kill: bool = False) -> None:
        if kill:
            for p in self.procs:
                p.kill()
        self._finalizer()
