"""EngineCore: the scheduler and the executor, with no tokenizer. Validated requests in, token updates out.

    add_request(id, ProcessedInput)                 -> Scheduler.add_request
    step() -> CoreStep
        Scheduler.schedule() -> SchedulerOutput -> Executor.execute_model() -> ModelRunnerOutput
        -> Scheduler.update_from_output() -> [RequestUpdate]

With async scheduling (one GPU; the default there) a step call schedules and launches step N+1
before it waits for step N's results, so the host's work for N+1 (scheduling, input building) and
for N (updating requests, detokenizing) overlaps the device's work:

    call k:    schedule N+1, launch N+1 | wait for N, update_from_output(N) -> CoreStep of N
    call k+1:  schedule N+2, launch N+2 | wait for N+1, ...

With pipeline stages (pipeline_parallel_size P > 1) a step call keeps up to P steps in flight, each of
sequences the others do not hold (the scheduler skips a request whose token is in flight, and splits the
running requests over the P micro-batches), so every stage works on one of them at a time, as vLLM's batch queue
does:

    call k:    launch steps until P are in flight | wait for the oldest, update_from_output -> its CoreStep

A step whose grammar masks depend on the step before it (a constrained sequence with a token in flight) is
launched without sampling; its masks follow once that step is applied (`finish_sampling`). While a request
lives that needs its sampled tokens on the host before its next step (beam search, bad words of several
tokens), steps run one at a time again.
    finish_sequence(id, index, stop)                 (a stop string matched by whoever detokenizes)
    abort_requests(ids), check_health(), shutdown()

Between rollouts (RL post-training; idle engine only): sleep(level) / wake_up(tags), update_weights(named tensors),
reload_weights(dir), reset_prefix_cache(), and collective_rpc(method) on every rank's worker (worker/worker.py).

It runs where the model runs: inside LLMEngine for offline use, or alone in the engine-core process
of `pagellm serve` (engine/core_proc.py), where its inputs and outputs are plain pickled messages.
"""

from __future__ import annotations

import logging
import random
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from pagellm.config import EngineConfig
from pagellm.core.beam_search import BeamSearchPolicy
from pagellm.core.request import Request
from pagellm.core.sched_output import RequestUpdate, SchedulerOutput
from pagellm.core.scheduler import Scheduler, SchedulerStats
from pagellm.engine.input_processor import ProcessedInput
from pagellm.executor.base import DoneStep, Executor, ExecutorDeadError, make_executor

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine cannot run another step (a tensor-parallel worker died, or the engine shut down)."""


class EngineBusyError(ValueError):
    """A call that needs an idle engine came while requests run (the server answers 409)."""


class EngineSleepingError(RuntimeError):
    """A request reached an engine put to sleep (sleep mode): wake_up() first."""


@dataclass
class CoreStep:
    """What one step (or a health check) produced."""

    updates: list[RequestUpdate] = field(default_factory=list)  # per request: new tokens, finishes
    failed: list[str] = field(default_factory=list)  # requests ended by an error (their blocks are free)
    error: str | None = None  # why they failed


@dataclass
class EngineCounters:
    """Monotonic counters for metrics and benchmarks."""

    num_steps: int = 0
    tokens_computed: int = 0  # tokens run through the model (prompts, recomputes, decodes)
    generation_tokens: int = 0  # sampled tokens
    overlapped_steps: int = 0  # steps launched while another was still in flight (async scheduling, pipeline)
    device_steps: int = 0  # forward passes: num_steps plus the extra steps of multi-step decodes

    def record(self, sched, updates) -> None:
        self.num_steps += 1
        self.device_steps += sched.num_steps
        self.tokens_computed += sched.total_num_scheduled_tokens
        self.generation_tokens += sum(len(d.new_token_ids) for u in updates for d in u.deltas)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor | None = None, structured: Any = None) -> None:
        """`structured`: the StructuredOutputManager to share (offline, with the input processor's); by default the
        core makes its own, loading the tokenizer only when a constrained request arrives."""
        self.config = config
        m = config.model
        if structured is None:
            from pagellm.structured_output.manager import make_manager

            structured = make_manager(m.tokenizer, None, m.vocab_size, m.eos_token_ids)
        self.structured = structured
        self.executor = executor or make_executor(config)
        # Reap tensor-parallel workers when the core is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, self.executor.shutdown)
        self.num_blocks = self.executor.determine_num_blocks()
        self.executor.init_kv_cache(self.num_blocks)
        stages = config.parallel.pipeline_parallel_size
        self.scheduler = Scheduler(config.scheduler, config.cache.block_size, self.num_blocks,
                                   config.cache.enable_prefix_caching, config.model.sliding_window, structured,
                                   config.lora.max_loras if config.lora is not None else 0, config.model.stateful,
                                   (config.cache.mamba_block_size, config.cache.num_state_checkpoints),
                                   micro_batches=stages)
        self._rng = random.Random(config.model.seed)
        self._loaded_loras: dict[int, None] = {}  # adapter ids loaded in the worker, least recently requested first
        self.lora_evictions = 0  # adapters dropped for max_cpu_loras
        for lora in config.lora.modules if config.lora is not None else ():  # --lora-modules: refused at start-up
            self.add_lora(lora)
        self.counters = EngineCounters()
        self.dead: str | None = None  # why the executor can run no more steps
        # steps a call may keep in flight: one per pipeline stage, two with async scheduling, else one
        self.depth = stages if stages > 1 else 2 if config.scheduler.async_scheduling else 1
        self._in_flight: deque[tuple[SchedulerOutput, Any]] = deque()  # launched steps, oldest first
        self.asleep: set[str] = set()  # sleep mode: what is asleep ("weights", "kv_cache")

    def add_request(self, request_id: str, inp: ProcessedInput, arrival_time: float | None = None,
                    policy: Any = None) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead}")
        if self.asleep:
            raise EngineSleepingError("the engine is asleep (sleep mode): wake_up() before sending requests.")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        p = inp.params
        if policy is None and inp.beam is not None:
            policy = BeamSearchPolicy(**inp.beam)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        salt, lora_id = inp.cache_salt, 0
        if inp.lora is not None:
            self.add_lora(inp.lora)
            lora_id = inp.lora.lora_int_id
            salt = f"{salt or ''}\x00lora:{lora_id}"  # cached prefixes are per adapter: its K/V differ
        req = Request(request_id, inp.prompt_token_ids, p, arrival, prompt=inp.prompt,
                      eos_token_ids=self.config.model.eos_token_ids,
                      base_seed=p.seed if p.seed is not None else self._rng.getrandbits(63),
                      cache_salt=salt, priority=inp.priority, lora_id=lora_id, policy=policy,
                      pooling_params=inp.pooling, mm_features=inp.mm_features, mm_rope=inp.mm_rope)
        self.scheduler.add_request(req)

    def add_lora(self, lora) -> bool:
        """Load a LoRA adapter in the worker unless it is loaded (ValueError if it cannot be served). True when it
        was loaded now."""
        if self.config.lora is None:
            raise ValueError("a LoRA adapter needs enable_lora=True (--enable-lora).")
        loaded = self.executor.add_lora(lora)
        lru = self._loaded_loras
        lru.pop(lora.lora_int_id, None)
        lru[lora.lora_int_id] = None  # most recently requested last
        self._evict_loras(keep=lora.lora_int_id)
        return loaded

    def _evict_loras(self, keep: int) -> None:
        """Beyond max_cpu_loras loaded adapters, drop the least recently requested ones that no live request uses
        (a request naming one later loads it again from its path)."""
        cap = self.config.lora.max_cpu_loras
        if cap is None or len(self._loaded_loras) <= cap:
            return
        in_use = {r.lora_id for r in self.scheduler.requests.values()} | {keep}
        for lid in list(self._loaded_loras):
            if len(self._loaded_loras) <= cap:
                break
            if lid not in in_use:
                self.executor.remove_lora(lid)
                del self._loaded_loras[lid]
                self.lora_evictions += 1

    def remove_lora(self, lora_int_id: int) -> bool:
        """Unload an adapter no live request uses (ValueError otherwise); False when it was not loaded."""
        if self.config.lora is None:
            raise ValueError("a LoRA adapter needs enable_lora=True (--enable-lora).")
        users = sum(1 for r in self.scheduler.requests.values() if r.lora_id == lora_int_id)
        if users:
            raise ValueError(f"LoRA adapter {lora_int_id} is in use by {users} request(s); unload it once they end.")
        self._loaded_loras.pop(lora_int_id, None)
        return self.executor.remove_lora(lora_int_id)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def finish_sequence(self, request_id: str, index: int, stop: str) -> bool:
        """A stop string ended sequence `index`; True when the whole request is now finished."""
        return self.scheduler.finish_by_stop_string(request_id, index, stop)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    def step(self) -> CoreStep:
        """Run one step and return what it produced. With async scheduling: launch the next step, then return
        what the one launched by the previous call produced."""
        if self.dead is not None:  # _die emptied the queue
            return CoreStep()
        if not self._in_flight:
            failed = self._launch()
            if failed is not None or not self._in_flight:
                return failed or CoreStep()
        while len(self._in_flight) < self.depth and self.scheduler.can_schedule_ahead():
            before = len(self._in_flight)
            failed = self._launch()
            if failed is not None:
                return self._merge(failed, self._collect())
            if len(self._in_flight) == before:
                break  # nothing more to schedule until a step comes back
            self.counters.overlapped_steps += 1
        return self._collect()

    def _launch(self) -> CoreStep | None:
        """Schedule a step and queue it on the executor; a CoreStep only when that failed."""
        sched = self.scheduler.schedule()
        if not sched.has_work:
            return None
        try:
            if self.depth > 1:
                pending = self.executor.execute_model_async(sched)
            else:
                pending = DoneStep(self.executor.execute_model(sched))
        except ExecutorDeadError as e:  # no more steps: every request fails, new ones are refused
            return self._die(str(e))
        except Exception as e:  # a failing batch fails its requests, not the engine
            return self._fail(sched, [], e)
        self._in_flight.append((sched, pending))
        return None

    def _collect(self) -> CoreStep:
        """Wait for the oldest step in flight and apply its results; then the next step in flight, if it waits for
        grammar masks that depend on these results, gets them."""
        sched, pending = self._in_flight.popleft()
        try:
            out = pending.result()
        except ExecutorDeadError as e:
            return self._die(str(e))
        except Exception as e:
            done = self._fail(sched, [s for s, _ in self._in_flight], e)
        else:
            updates = self.scheduler.update_from_output(sched, out)
            self.counters.record(sched, updates)
            done = CoreStep(updates)
        if self._in_flight and self._in_flight[0][0].grammar_deferred:
            nxt, nxt_pending = self._in_flight[0]
            try:
                self.executor.finish_sampling(nxt_pending, self.scheduler.grammar_bitmask(nxt))
            except Exception as e:
                self._in_flight.popleft()
                done = self._merge(done, self._fail(nxt, [s for s, _ in self._in_flight], e))
        return done

    def _fail(self, sched: SchedulerOutput, later: list[SchedulerOutput], e: Exception) -> CoreStep:
        logger.error("model step failed; aborting the requests of its %d sequences",
                     len(sched.num_scheduled_tokens), exc_info=e)
        failed = self.scheduler.fail_step(sched, later)
        return CoreStep(failed=[r.request_id for r in failed], error=f"{type(e).__name__}: {e}")

    @staticmethod
    def _merge(a: CoreStep, b: CoreStep) -> CoreStep:
        return CoreStep(a.updates + b.updates, a.failed + b.failed, a.error or b.error)

    def check_health(self) -> CoreStep:
        """Between steps: if a worker died, fail every request now."""
        if self.dead is None:
            try:
                self.executor.check_health()
            except ExecutorDeadError as e:
                return self._die(str(e))
        return CoreStep()

    def _die(self, reason: str) -> CoreStep:
        self.dead = reason
        self._in_flight.clear()
        logger.error("engine dead: %s", reason)
        ids = list(self.scheduler.requests)
        self.scheduler.abort_requests(ids)
        return CoreStep(failed=ids, error=f"engine dead: {reason}")

    def get_stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    # ---- between rollouts: sleep mode, weights, worker calls --------------------------

    def collective_rpc(self, method, args: tuple = (), kwargs: dict | None = None) -> list:
        """A worker method (by name) or a function taking the worker first, on every rank; the results in rank
        order. The method's own error is raised and the engine goes on; a lost worker makes the engine dead."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead}")
        try:
            return self.executor.collective_rpc(method, args, kwargs)
        except ExecutorDeadError as e:
            self._die(str(e))
            raise EngineDeadError(f"the engine is dead: {e}") from e

    def _require_idle(self, what: str) -> None:
        if self.has_unfinished_requests():
            raise EngineBusyError(f"{what} needs an idle engine: {len(self.scheduler.requests)} request(s) are "
                             "unfinished (let them finish or abort them).")

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prefixes (vLLM's call, e.g. after new weights); False while requests hold blocks."""
        return self.scheduler.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Free the device memory of the weights (level 1: a host copy is kept; level 2: discarded) and of the KV
        cache, whose contents (and the prefix cache) are forgotten."""
        if not self.config.device.enable_sleep_mode:
            raise ValueError("sleep mode needs enable_sleep_mode=True (--enable-sleep-mode).")
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}.")
        if self.asleep:
            raise ValueError(f"the engine is asleep already ({', '.join(sorted(self.asleep))}); wake_up() first.")
        self._require_idle("sleep()")
        self.scheduler.reset_prefix_cache()
        self.collective_rpc("sleep", (level,))
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back the memory of `tags` ("weights", "kv_cache"; default both). After level 2, update or reload the
        weights before generating: their memory comes back uninitialized."""
        from pagellm.worker.worker import SLEEP_TAGS

        tags = list(SLEEP_TAGS) if tags is None else list(tags)
        bad = [t for t in tags if t not in SLEEP_TAGS]
        if bad:
            raise ValueError(f"wake_up tags are {list(SLEEP_TAGS)}, got {bad}.")
        if self.asleep:
            self.collective_rpc("wake_up", (tags,))
            self.asleep -= set(tags)

    def is_sleeping(self) -> bool:
        return bool(self.asleep)

    def update_weights(self, weights) -> int:
        """Checkpoint-named tensors (Hugging Face names) into the model's weights on every rank; the prefix cache is
        forgotten (its K/V came from the old weights). Returns how many of the model's parameters were written (packed
        projections take several checkpoint tensors)."""
        self._require_idle("update_weights()")
        written: set[str] = set()
        try:
            for chunk in _chunks(weights, UPDATE_CHUNK_BYTES):  # (tensor parallelism pickles each chunk to the ranks)
                written.update(self.collective_rpc("update_weights", (chunk,))[0])
        finally:
            self.scheduler.reset_prefix_cache()
        return len(written)

    def reload_weights(self, model_dir: str | None = None) -> None:
        """The weights again from a checkpoint directory (default: the model's), on every rank; the prefix cache is
        forgotten."""
        self._require_idle("reload_weights()")
        try:
            self.collective_rpc("reload_weights", (model_dir,))
        finally:
            self.scheduler.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the executor's workers (tensor parallelism); the core cannot step afterwards."""
        self._finalizer()


UPDATE_CHUNK_BYTES = 256 << 20  # tensors per update_weights call on the workers


def _chunks(weights, limit: int):
    """(name, tensor) pairs in lists of up to `limit` bytes (one larger tensor alone)."""
    items = weights.items() if hasattr(weights, "items") else weights
    chunk, size = [], 0
    for name, t in items:
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"update_weights takes (name, tensor) pairs, got ({type(name).__name__}, "
                             f"{type(t).__name__}).")
        nbytes = t.numel() * t.element_size()
        if chunk and size + nbytes > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, t))
        size += nbytes
    if chunk:
        yield chunk
