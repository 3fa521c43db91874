"""RayExecutor: tensor parallelism with ranks 1..N-1 as Ray actors, on this machine or across a cluster.

    ray.init()  (joins the cluster this machine belongs to, `ray start`, or starts a local one)
    placement group of N-1 bundles (1 CPU each, or 1 GPU) -> one RayTPWorker actor per bundle
    each actor runs tp_worker.run_worker: the same step protocol as the local processes, the TCP
    rendezvous at the driver's node address

Ray only places and watches the workers; every step's command travels over torch.distributed
(gloo), exactly as with the mp backend. A worker whose actor dies makes its `run` call finish early:
`check_health` sees that and the executor is dead (as with mp). `pip install pagellm[ray]`.
"""

from __future__ import annotations

import logging

from pagellm.config import EngineConfig
from pagellm.executor.tp_worker import TPExecutorBase, free_port, run_worker

logger = logging.getLogger(__name__)


class RayExecutor(TPExecutorBase):
    def __init__(self, config: EngineConfig) -> None:
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise ImportError("distributed_executor_backend='ray' needs Ray: pip install pagellm[ray]") from e
        if not ray.is_initialized():
            ray.init(log_to_driver=True)
        self.ray = ray
        tp = config.parallel.world_size
        gpu = config.device.device.startswith("cuda")
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([bundle] * (tp - 1), strategy="PACK")
        ray.get(self.pg.ready(), timeout=120)
        host = ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{free_port(host)}"
        worker_cls = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(RayTPWorker)
        self.actors = [worker_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=i)).remote() for i in range(tp - 1)]
        self.runs = [a.run.remote(config, rank, init_method) for rank, a in enumerate(self.actors, start=1)]
        super().__init__(config, init_method)
        logger.info("%d ranks over Ray, rendezvous %s", tp, init_method)

    def _gone(self) -> str | None:
        done, _ = self.ray.wait(self.runs, timeout=0, num_returns=len(self.runs))
        for ref in done:
            rank = self.runs.index(ref) + 1
            try:
                self.ray.get(ref)
                return f"tensor-parallel worker rank {rank} (Ray actor) stopped"
            except Exception as e:  # noqa: BLE001 - the actor's failure is the message
                return f"tensor-parallel worker rank {rank} (Ray actor) died: {type(e).__name__}: {str(e)[:300]}"
        return None

    def _reap(self, kill: bool = False) -> None:
        ray = self.ray
        if not kill:
            ray.wait(getattr(self, "runs", []), timeout=10, num_returns=len(getattr(self, "runs", [])))
        for a in getattr(self, "actors", []):
            ray.kill(a)
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.pg)


class RayTPWorker:
    """A Ray actor holding one tensor-parallel rank (its process lives as long as the actor)."""

    def run(self, config: EngineConfig, rank: int, init_method: str) -> None:
        import logging as _logging

        _logging.basicConfig(level=_logging.WARNING)
        run_worker(config, rank, init_method)
