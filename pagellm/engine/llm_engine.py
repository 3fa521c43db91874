"""LLMEngine: add_request / step / abort over scheduler, executor and output processor.

    add_request(id, prompt, params)
        InputProcessor (validate, tokenize) -> Request -> Scheduler.add_request
    step()
        Scheduler.schedule() -> SchedulerOutput
        Executor.execute_model() -> ModelRunnerOutput
        Scheduler.update_from_output() -> [RequestUpdate]
        OutputProcessor.process() -> [RequestOutput]   (stop strings feed back into the scheduler)
"""

from __future__ import annotations

import logging
import random
import time
import weakref
from typing import Any

from pagellm.config import EngineConfig
from pagellm.core.request import Request
from pagellm.core.scheduler import Scheduler, SchedulerStats
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.input_processor import InputProcessor, ProcessedInput, PromptType
from pagellm.engine.output_processor import OutputProcessor
from pagellm.executor.base import Executor, ExecutorDeadError, make_executor
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine cannot run another step (a tensor-parallel worker died, or the engine shut down)."""


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in {path!r}: {e}") from e


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model.tokenizer) if config.model.tokenizer else None
        self.executor = executor or make_executor(config)
        # Reap tensor-parallel workers when the engine is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, self.executor.shutdown)
        self.num_blocks = self.executor.determine_num_blocks()
        self.executor.init_kv_cache(self.num_blocks)
        self.scheduler = Scheduler(config.scheduler, config.cache.block_size, self.num_blocks,
                                   config.cache.enable_prefix_caching, config.model.sliding_window)
        self.input_processor = InputProcessor(config.model, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._rng = random.Random(config.model.seed)
        self.stats = EngineCounters()
        self.dead: str | None = None  # why the executor can run no more steps

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

    # ---- requests -------------------------------------------------------------------

    def process_input(self, prompt: PromptType, params: SamplingParams, max_seqs: int | None = None,
                      logprobs_cap: bool = True) -> ProcessedInput:
        """Validate and tokenize without queueing (raises ValueError on bad input), including whether
        the request could ever fit the KV cache (`max_seqs`: sequences it runs at once, default best_of).
        `logprobs_cap=False` exempts internal logprobs (beam-search candidates) from max_logprobs."""
        inp = self.input_processor.process(prompt, params, logprobs_cap)
        self.scheduler.check_fits(len(inp.prompt_token_ids), inp.params.max_tokens or 0,
                                  max_seqs if max_seqs is not None else inp.params.best_of)
        return inp

    def add_request(self, request_id: str, prompt: PromptType | ProcessedInput, params: SamplingParams | None = None,
                    arrival_time: float | None = None, policy: Any = None) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead}")
        inp = prompt if isinstance(prompt, ProcessedInput) else self.process_input(prompt, params or SamplingParams())
        if request_id in self.scheduler.requests or self.output_processor.has_request(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use.")
        p = inp.params
        arrival = time.monotonic() if arrival_time is None else arrival_time
        req = Request(request_id, inp.prompt_token_ids, p, arrival, prompt=inp.prompt,
                      eos_token_ids=self.config.model.eos_token_ids,
                      base_seed=p.seed if p.seed is not None else self._rng.getrandbits(63),
                      cache_salt=inp.cache_salt, policy=policy)
        self.scheduler.add_request(req)
        self.output_processor.add_request(request_id, inp.prompt, inp.prompt_token_ids, p, arrival)

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.scheduler.abort_requests(ids)
        return self.output_processor.abort(ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    # ---- one step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty and not sched.finished_seq_ids:
            return []
        try:
            out = self.executor.execute_model(sched)
        except ExecutorDeadError as e:  # no more steps: every request fails, new ones are refused
            return self._die(str(e))
        except Exception as e:  # a failing batch fails its requests, not the engine
            logger.exception("model step failed; aborting the %d sequences of the batch",
                             len(sched.num_scheduled_tokens))
            failed = self.scheduler.fail_step(sched)
            return self.output_processor.abort([r.request_id for r in failed], error=f"{type(e).__name__}: {e}")
        updates = self.scheduler.update_from_output(sched, out)
        self.stats.record(sched, updates)
        return self.output_processor.process(updates, self.scheduler.finish_by_stop_string)

    def get_stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def check_health(self) -> list[RequestOutput]:
        """Between steps: if a worker died, fail every request now (their final outputs are returned)."""
        if self.dead is not None:
            return []
        try:
            self.executor.check_health()
        except ExecutorDeadError as e:
            return self._die(str(e))
        return []

    def _die(self, reason: str) -> list[RequestOutput]:
        self.dead = reason
        logger.error("engine dead: %s", reason)
        ids = list(self.scheduler.requests)
        self.scheduler.abort_requests(ids)
        return self.output_processor.abort(ids, error=f"engine dead: {reason}")

    def shutdown(self) -> None:
        """Stop the executor's workers (tensor parallelism); the engine cannot step afterwards."""
        self._finalizer()


class EngineCounters:
    """Monotonic counters for metrics and benchmarks."""

    def __init__(self) -> None:
        self.num_steps = 0
        self.tokens_computed = 0  # tokens run through the model (prompts, recomputes, decodes)
        self.generation_tokens = 0  # sampled tokens

    def record(self, sched, updates) -> None:
        self.num_steps += 1
        self.tokens_computed += sched.total_num_scheduled_tokens
        self.generation_tokens += sum(len(d.new_token_ids) for u in updates for d in u.deltas)
