"""The worker: what `collective_rpc` reaches on every rank, and the calls RL post-training runs between rollouts.

    Worker(runner, rank)                            one per rank, beside its ModelRunner
        .model_runner, .rank, .device, .config     (vLLM's names: a worker extension reads
                                                    self.model_runner.model)
        .sleep(level) / .wake_up(tags)              sleep mode: free the device memory of the weights
                                                    and of the KV cache, and take it back
        .update_weights([(name, tensor), ...])      checkpoint-named tensors into the live weights
        .reload_weights(model_dir=None)             the weights again from a checkpoint on disk

`worker_extension_cls` ("module.Class", vLLM's option) adds a class's methods to the worker on every rank, so
`collective_rpc("my_method", ...)` runs user code beside the model (e.g. receiving weights from a trainer).

Sleep mode frees memory without dropping a Python reference: each storage under the model's parameters, buffers
and tensor attributes is resized to zero bytes and back (`UntypedStorage.resize_`), so tied weights, views, the
layers' own references and the recurrent states bound into a model all see the memory again at wake-up.

    level 1   weights copied to host memory (pinned on CUDA), then freed (on a CPU they stay: host memory is where
              the copy would go); KV cache (and recurrent states) freed
    level 2   parameters freed without a copy (buffers and tensor attributes are copied: rotary tables,
              quantized weights' scales); the KV cache freed. Reload or update the weights after waking.

After the weights wake, the decode CUDA graphs are captured again (their memory moved).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)

SLEEP_TAGS = ("weights", "kv_cache")


def as_bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over a whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def own_tensors(m: nn.Module) -> Iterable[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_parameter) for a module's own parameters, buffers and tensor attributes."""
    for name, p in m._parameters.items():
        if p is not None:
            yield name, p, True
    for name, b in m._buffers.items():
        if b is not None:
            yield name, b, False
    for name, v in vars(m).items():
        if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
            yield name, v, False


def module_tensors(modules: Iterable[nn.Module]) -> Iterable[tuple[torch.Tensor, bool]]:
    """(tensor, is_parameter) for every parameter, buffer and tensor attribute of the modules and their children."""
    for root in modules:
        for m in root.modules():
            for _, t, is_param in own_tensors(m):
                yield t, is_param


class DeviceMemory:
    """The storages sleep mode frees: the weights' (with their host copies) and the caches'."""

    def __init__(self) -> None:
        self.weights: list[tuple[torch.UntypedStorage, int, torch.Tensor | None]] = []  # (storage, bytes, copy)
        self.caches: list[tuple[torch.UntypedStorage, int]] = []
        self.bytes_freed = 0

    @staticmethod
    def _storages(tensors: Iterable[tuple[torch.Tensor, bool]], skip: set[int]) -> dict[int, list]:
        """data_ptr -> [storage, only parameters over it] for the resizable, non-empty storages not in `skip`."""
        found: dict[int, list] = {}
        for t, is_param in tensors:
            s = t.untyped_storage()
            key = s.data_ptr()
            if s.nbytes() == 0 or key in skip:
                continue
            if key in found:
                found[key][1] = found[key][1] and is_param
            elif s.resizable():
                found[key] = [s, is_param]
        return found

    def free(self, level: int, modules: list[nn.Module], caches: list[torch.Tensor], device: torch.device) -> None:
        """Level 1 on a CPU keeps the weights where they are: host memory is where a copy would go."""
        pin = device.type == "cuda"
        cache_storages = self._storages(((t, False) for t in caches), set())
        for s, _ in cache_storages.values():
            self.caches.append((s, s.nbytes()))
        weights = () if level == 1 and device.type == "cpu" else module_tensors(modules)
        for s, only_params in self._storages(weights, set(cache_storages)).values():
            copy = None
            if level == 1 or not only_params:
                copy = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin)
                copy.copy_(as_bytes_of(s))
            self.weights.append((s, s.nbytes(), copy))
        for s, _, _ in self.weights:
            self.bytes_freed += s.nbytes()
            s.resize_(0)
        for s, n in self.caches:
            self.bytes_freed += n
            s.resize_(0)
        if pin:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def restore_weights(self) -> None:
        for s, n, copy in self.weights:
            s.resize_(n)
            if copy is not None:
                as_bytes_of(s).copy_(copy)
        self.weights = []

    def restore_caches(self) -> None:
        from pagellm.worker.kv_cache import advise_huge_pages

        for s, n in self.caches:
            s.resize_(n)
            t = as_bytes_of(s)
            advise_huge_pages(t)  # then touched, as at allocation (kv_cache.allocate_kv_cache)
            t.zero_()
        self.caches = []


class Worker:
    """One rank's worker (module docstring)."""

    def __init__(self, runner, rank: int = 0) -> None:
        self.model_runner = runner
        self.rank = rank
        self.device = runner.device
        self.config = runner.config
        self.memory: DeviceMemory | None = None  # while asleep
        self.asleep: set[str] = set()

    # ---- sleep mode -----------------------------------------------------------------

    def sleep(self, level: int = 1) -> int:
        """Free the weights' and the KV cache's device memory (module docstring); the bytes freed. EngineCore.sleep
        checks the level and that the engine is idle and awake."""
        r = self.model_runner
        r.drop_graphs()
        self.memory = DeviceMemory()
        self.memory.free(level, r.weight_modules(), r.cache_tensors(), r.device)
        self.asleep = set(SLEEP_TAGS)
        logger.info("asleep (level %d): %.2f GiB freed", level, self.memory.bytes_freed / 2**30)
        return self.memory.bytes_freed

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back the memory of `tags` ("weights", "kv_cache"; default both; EngineCore.wake_up checks them)."""
        tags = SLEEP_TAGS if tags is None else tags
        if self.memory is None:
            return
        if "weights" in tags and "weights" in self.asleep:
            self.memory.restore_weights()
        if "kv_cache" in tags and "kv_cache" in self.asleep:
            self.memory.restore_caches()
        self.asleep -= set(tags)
        if not self.asleep:
            self.memory = None
            self.model_runner.capture_graphs()

    def is_sleeping(self) -> bool:
        return bool(self.asleep)

    # ---- weights --------------------------------------------------------------------

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Checkpoint-named tensors (Hugging Face names, whole tensors) into the live weights; the model's parameters
        written."""
        self._weights_awake()
        return sorted(self.model_runner.update_weights(weights))

    def reload_weights(self, model_dir: str | None = None) -> None:
        """The weights again from a checkpoint directory (default: the model's own)."""
        self._weights_awake()
        self.model_runner.reload_weights(model_dir)

    def _weights_awake(self) -> None:
        if "weights" in self.asleep:
            raise ValueError("the weights are asleep: wake_up(tags=['weights']) before updating them.")


def make_worker(runner, rank: int, extension: str | None) -> Worker:
    """The Worker of a rank, with the methods of `extension` ("module.Class") added."""
    if not extension:
        return Worker(runner, rank)
    from pagellm.config import import_by_name

    ext = import_by_name(extension, "worker_extension_cls")
    clash = sorted(n for n in vars(ext) if not n.startswith("__") and hasattr(Worker, n))
    if clash:
        raise ValueError(f"worker_extension_cls {extension!r} redefines the worker's {clash}.")
    cls = type(f"Worker+{ext.__name__}", (Worker, ext), {})
    return cls(runner, rank)


def call_worker(worker: Worker, method, args: tuple, kwargs: dict):
    """collective_rpc's call on one worker: a method name, or a function taking the worker first."""
    if isinstance(method, str):
        fn = getattr(worker, method, None)
        if fn is None or not callable(fn):
            raise ValueError(f"the worker has no method {method!r}.")
        return fn(*args, **kwargs)
    return method(worker, *args, **kwargs)
