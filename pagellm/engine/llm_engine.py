"""LLMEngine: the offline engine in one process: EngineCore plus tokenization and detokenization.

    add_request(id, prompt, params)
        InputProcessor (validate, tokenize) -> EngineCore.add_request -> Scheduler
    step()
        EngineCore.step() -> CoreStep ([RequestUpdate], failed requests)
        OutputProcessor.process() -> [RequestOutput]   (stop strings feed back into the core at once)

`pagellm serve` splits the same pieces over two processes (engine/async_engine.py): the core in an
engine process, tokenization and detokenization beside the HTTP server.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from pagellm.config import EngineConfig
from pagellm.core.scheduler import SchedulerStats
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.core import CoreStep, EngineCore, EngineCounters, EngineDeadError, EngineSleepingError  # noqa: F401
from pagellm.engine.input_processor import InputProcessor, ProcessedInput, PromptType
from pagellm.engine.output_processor import OutputProcessor
from pagellm.executor.base import Executor
from pagellm.outputs import RequestOutput
from pagellm.pooling_params import PoolingParams
from pagellm.sampling_params import SamplingParams
from pagellm.structured_output.manager import make_manager

logger = logging.getLogger(__name__)


def load_tokenizer(path: str) -> Any:
    """transformers' tokenizer of the directory; a chat template found only in the processor's chat_template.json
    (llava-hf checkpoints) becomes the tokenizer's."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in {path!r}: {e}") from e
    processor_template = os.path.join(path, "chat_template.json")
    if not getattr(tok, "chat_template", None) and os.path.isfile(processor_template):
        try:
            with open(processor_template) as f:
                tok.chat_template = json.load(f)["chat_template"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring %s: %s", processor_template, e)
    return tok


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model.tokenizer) if config.model.tokenizer else None
        m = config.model
        structured = make_manager(None, self.tokenizer, m.vocab_size, m.eos_token_ids)  # grammars compiled once
        self.core = EngineCore(config, executor, structured)
        self.input_processor = InputProcessor(config.model, self.tokenizer, structured,
                                              config.scheduler.max_num_batched_tokens, config.cache.block_size)
        self.output_processor = OutputProcessor(self.tokenizer)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

    # The core's parts, for callers that inspect them (tests, benchmarks).
    scheduler = property(lambda self: self.core.scheduler)
    executor = property(lambda self: self.core.executor)
    num_blocks = property(lambda self: self.core.num_blocks)
    stats = property(lambda self: self.core.counters)
    dead = property(lambda self: self.core.dead)

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

    def process_pooling_input(self, prompt: PromptType, params: PoolingParams) -> ProcessedInput:
        """A pooling model's request, validated and tokenized without queueing (ValueError on bad input)."""
        inp = self.input_processor.process_pooling(prompt, params)
        self.scheduler.check_fits(len(inp.prompt_token_ids), 1, 1)
        return inp

    def add_request(self, request_id: str, prompt: PromptType | ProcessedInput,
                    params: SamplingParams | PoolingParams | None = None,
                    arrival_time: float | None = None, policy: Any = None, lora_request: Any = None) -> None:
        if self.core.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.core.dead}")
        if isinstance(prompt, ProcessedInput):
            inp = prompt
        elif isinstance(params, PoolingParams):
            inp = self.process_pooling_input(prompt, params)
        else:
            inp = self.process_input(prompt, params or SamplingParams())
        if lora_request is not None:
            inp.lora = lora_request
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use.")
        self.core.add_request(request_id, inp, arrival_time, policy)
        req = self.scheduler.requests[request_id]
        self.output_processor.add_request(request_id, inp.prompt, inp.prompt_token_ids, inp.params, req.arrival_time,
                                          embeds=inp.embeds_prompt)

    def add_lora(self, lora_request) -> bool:
        """Load a LoRA adapter now (requests naming it load it on arrival otherwise); False if it was loaded."""
        return self.core.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Unload an adapter that no live request uses; False if it was not loaded."""
        return self.core.remove_lora(lora_int_id)

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.core.abort_requests(ids)
        return self.output_processor.abort(ids)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    # ---- one step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        return self._outputs(self.core.step())

    def check_health(self) -> list[RequestOutput]:
        """Between steps: if a worker died, fail every request now (their final outputs are returned)."""
        return self._outputs(self.core.check_health())

    def _outputs(self, result: CoreStep) -> list[RequestOutput]:
        outs = self.output_processor.abort(result.failed, error=result.error) if result.failed else []
        return outs + self.output_processor.process(result.updates, self.core.finish_sequence)

    def get_stats(self) -> SchedulerStats:
        return self.core.get_stats()

    # ---- between rollouts (engine/core.py) ------------------------------------------

    def sleep(self, level: int = 1) -> None:
        self.core.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.core.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.core.is_sleeping()

    def reset_prefix_cache(self) -> bool:
        return self.core.reset_prefix_cache()

    def update_weights(self, weights) -> int:
        return self.core.update_weights(weights)

    def reload_weights(self, model_dir: str | None = None) -> None:
        self.core.reload_weights(model_dir)

    def collective_rpc(self, method, args: tuple = (), kwargs: dict | None = None) -> list:
        return self.core.collective_rpc(method, args, kwargs)

    def shutdown(self) -> None:
        """Stop the executor's workers (tensor parallelism); the engine cannot step afterwards."""
        self.core.shutdown()
