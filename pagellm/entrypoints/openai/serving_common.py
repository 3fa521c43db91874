"""What the completion and chat handlers share: errors, validation, running requests, metrics.

The handlers are plain async functions over a `ServingState`; they know
nothing of HTTP beyond returning a body or an async iterator of SSE lines, so
they are testable without a server.

    check_request (model, n, stream-only fields, logprob caps)
    -> validate_inputs (queue room: 429 before anything streams; tokenize and
       validate in a worker thread, never on the event loop)
    -> run_all (one engine request per prompt; leaving early aborts them all)
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pagellm.core.scheduler import check_priority
from pagellm.engine.async_engine import (
    AsyncLLMEngine,
    EngineBusyError,
    EngineDeadError,
    EngineSleepingError,
    QueueFullError,
    RequestFailedError,
)
from pagellm.engine.input_processor import ProcessedInput
from pagellm.entrypoints.openai.metrics import ServerMetrics
from pagellm.entrypoints.openai.protocol import OpenAIBaseModel
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import ParamError, SamplingParams

logger = logging.getLogger(__name__)


_DEFAULT_CODES = {400: "invalid_value", 401: "invalid_api_key", 404: "not_found", 413: "request_too_large",
                  409: "conflict", 429: "rate_limit_exceeded", 500: "internal_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error with OpenAI's body shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        code = code or _DEFAULT_CODES.get(status)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error_from(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineBusyError):
        return APIError(409, str(e), code="conflict")
    if isinstance(e, ParamError):
        return APIError(400, str(e), param=e.param, code=e.code or "invalid_value")
    if isinstance(e, ValueError):
        return APIError(400, str(e), code="invalid_value")
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"})
    if isinstance(e, (EngineDeadError, EngineSleepingError)):
        return APIError(503, str(e), type="server_error", code="service_unavailable")
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e), type="server_error", code="internal_error")
    return APIError(500, f"{type(e).__name__}: {e}", type="server_error", code="internal_error")


@dataclass
class ServingState:
    engine: AsyncLLMEngine
    model_name: str
    max_model_len: int
    max_n: int = 16  # largest n / best_of (--max-n)
    chat_template: str | None = None  # --chat-template, overriding the tokenizer's
    max_logprobs: int = 20  # largest logprobs / top_logprobs / prompt_logprobs (--max-logprobs)
    trust_request_chat_template: bool = False  # accept a chat_template in the request body
    tool_parser: Any = None  # parses tool calls out of text for tool_choice "auto" (--enable-auto-tool-choice)
    default_sampling: dict[str, Any] = field(default_factory=dict)  # from the generation config (--generation-config)
    reasoning_parser: Any = None  # splits a chat reply's thinking from its answer (--reasoning-parser)
    reasoning_tokens: tuple[int, int] | None = None  # its tags' token ids, when each is one token
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens in replies
    return_tokens_as_token_ids: bool = False  # logprobs tokens as "token_id:N" (--return-tokens-as-token-ids)
    lora_modules: dict[str, Any] = field(default_factory=dict)  # adapter name -> LoRARequest (--lora-modules)
    tracer: Any = None  # RequestTracer: a span per finished request (--otlp-traces-endpoint)
    allow_runtime_lora_updating: bool = False  # the load/unload routes (--allow-runtime-lora-updating)
    server_dev_mode: bool = False  # /sleep, /wake_up, /is_sleeping, /reset_prefix_cache, /collective_rpc
    metrics: ServerMetrics = field(default_factory=ServerMetrics)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer


def model_not_found(state: ServingState, model: str) -> APIError:
    names = ", ".join(f"`{n}`" for n in [state.model_name, *state.lora_modules])
    return APIError(404, f"The model `{model}` does not exist. This server serves {names}.", param="model",
                    code="model_not_found")


def lora_for(state: ServingState, req: OpenAIBaseModel) -> Any:
    """The LoRARequest of the adapter the request names as its model, or None (the base model)."""
    return state.lora_modules.get(getattr(req, "model", None) or "")


def check_request(state: ServingState, req: OpenAIBaseModel, route: str) -> None:
    model = getattr(req, "model", None)
    if model is not None and model != state.model_name and model not in state.lora_modules:
        raise model_not_found(state, model)
    ignored = req.ignored_fields()
    if ignored:
        logger.warning("%s: ignoring unknown fields %s", route, ignored)
    check_priority(state.engine.config.scheduler.policy, getattr(req, "priority", 0))
    n = getattr(req, "n", 1)
    best_of = getattr(req, "best_of", None) or n
    for name, v in (("n", n), ("best_of", best_of)):
        if isinstance(v, int) and v > state.max_n:
            raise APIError(400, f"{name} must be <= {state.max_n} (the server's --max-n), got {v}.", param=name,
                           code="invalid_value")
    stream = getattr(req, "stream", False)
    if stream and best_of != n:
        raise APIError(400, "best_of > n cannot be streamed: the n best are known only at the end.",
                       param="best_of", code="invalid_value")
    if getattr(req, "stream_options", None) is not None and not stream:
        raise APIError(400, "stream_options is only allowed with stream: true.", param="stream_options",
                       code="invalid_value")
    if getattr(req, "prompt_logprobs", None) is not None and stream:
        raise APIError(400, "prompt_logprobs cannot be streamed; ask without stream: true.", param="prompt_logprobs",
                       code="invalid_value")
    for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
        v = getattr(req, name, None)
        if type(v) is int and v > state.max_logprobs:
            raise APIError(400, f"{name} must be <= {state.max_logprobs} (the server's --max-logprobs), got {v}.",
                           param=name, code="invalid_value")


def check_generative(state: ServingState, route: str) -> None:
    """A 400 for the text-generation routes when the model runs as a pooling model."""
    if state.engine.config.model.pooler is not None:
        raise APIError(400, f"The model does not support the {route} API (it runs as a pooling model: "
                            "/v1/embeddings, /classify, /score, /rerank).", code="invalid_value")


def beam_search(state: ServingState, req: Any, params: SamplingParams,
                wants_logprobs: bool) -> tuple[SamplingParams, dict | None]:
    """vLLM's use_beam_search: the params each beam samples with and BeamSearchPolicy's arguments (n beams, the
    n best returned); (params, None) without it. 400 for what beam search cannot honour."""
    if not req.use_beam_search:
        return params, None
    from pagellm.core.beam_search import BeamSearchPolicy
    from pagellm.sampling_params import BeamSearchParams

    refused = {"temperature": req.temperature not in (None, 0), "best_of": req.best_of not in (None, req.n),
               "stop": bool(params.stop), "stop_token_ids": bool(params.stop_token_ids), "logprobs": wants_logprobs,
               "prompt_logprobs": params.prompt_logprobs is not None}
    for name, bad in refused.items():
        if bad:
            raise APIError(400, f"{name} is not supported with use_beam_search.", param=name)
    num_eos = 0 if params.ignore_eos else len(state.engine.config.model.eos_token_ids)
    policy = dict(beam_width=req.n, length_penalty=req.length_penalty, num_eos=num_eos)
    try:
        beams = BeamSearchParams(
            beam_width=req.n, max_tokens=params.max_tokens or 1, ignore_eos=params.ignore_eos,
            length_penalty=req.length_penalty, include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens, logit_bias=params.logit_bias, bad_words=params.bad_words,
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, structured_outputs=params.structured_outputs)
    except ParamError as e:
        raise APIError(400, str(e), param=e.param) from e
    sp = beams.sampling_params(BeamSearchPolicy(**policy).num_candidates)
    sp.max_tokens, sp.output_kind = params.max_tokens, params.output_kind  # None: the prompt's room, as usual
    return sp, policy


async def validate_inputs(state: ServingState, prompts: list[Any], params: SamplingParams, prompt_param: str,
                          max_tokens_param: str = "max_tokens", priority: int = 0,
                          beam: dict | None = None, lora: Any = None) -> list[ProcessedInput]:
    """Queue room first (429 before anything streams), then tokenize and validate off the event loop."""
    state.engine.check_capacity(len(prompts))
    # A request without max_tokens gets the prompt's room, capped by the generation config's max_tokens.
    cap = state.default_sampling.get("max_tokens") if params.max_tokens is None else None

    def process() -> list[ProcessedInput]:
        if beam is None:
            inputs = [state.engine.process_input(p, params) for p in prompts]
        else:  # the beams run at once; their candidates are internal logprobs, not capped by --max-logprobs
            inputs = [state.engine.process_input(p, params, beam["beam_width"], logprobs_cap=False) for p in prompts]
        for inp in inputs:
            inp.priority, inp.beam, inp.lora = priority, beam, lora
        if cap is not None:
            for inp in inputs:
                inp.params.max_tokens = min(inp.params.max_tokens, max(cap, inp.params.min_tokens))
        return inputs

    try:
        return await asyncio.to_thread(process)
    except ParamError as e:
        if e.code == "context_length_exceeded":
            param = max_tokens_param if e.param == "max_tokens" else prompt_param
            raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. {e}",
                           param=param, code="context_length_exceeded") from e
        raise


@dataclass
class _Timing:
    start: float
    first: float | None = None
    tokens: int = 0
    finished: bool = False


# The W3C trace context (traceparent, tracestate) of the HTTP request being served, set by the route.
TRACE_CONTEXT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("trace_context", default=None)


async def run_all(state: ServingState, inputs: list[ProcessedInput], base_id: str) -> AsyncIterator[
        tuple[int, RequestOutput]]:
    """Run one engine request per input concurrently; yield (input index, output) as they come.

    Leaving early (a disconnect, an error) cancels every request, which aborts it in the engine.
    """
    queue: asyncio.Queue = asyncio.Queue()
    timings = [_Timing(time.monotonic()) for _ in inputs]

    async def pump(i: int, inp: ProcessedInput) -> None:
        try:
            async for out in state.engine.generate(inp, None, f"{base_id}-{i}"):
                t = timings[i]
                now = time.monotonic()
                new = sum(len(c.token_ids) for c in out.outputs)
                if new and t.first is None:
                    t.first = now
                t.tokens += new
                if out.finished:
                    t.finished = True
                    state.metrics.request_finished(out, inp.params, t.start, t.first, t.tokens, now)
                    if state.tracer is not None:
                        state.tracer.request_span(out, inp.params, state.model_name, TRACE_CONTEXT.get(), t.tokens)
                await queue.put((i, out))
            await queue.put((i, None))
        except BaseException as e:  # noqa: BLE001 - delivered to the consumer
            if not isinstance(e, asyncio.CancelledError):
                timings[i].finished = True  # failed, not aborted
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, inp)) for i, inp in enumerate(inputs)]
    done = 0
    try:
        while done < len(tasks):
            i, item = await queue.get()
            if item is None:
                done += 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield i, item
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        # Counted before the next await: a stream closed by its client runs this in a cancelled scope,
        # where any await raises again.
        for inp, t in zip(inputs, timings):
            if not t.finished:  # the client left or another prompt failed: aborted in the engine
                state.metrics.request_aborted(inp.params)
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def guarded_stream(gen: AsyncIterator[str]) -> AsyncIterator[str]:
    """An SSE stream that fails after it started ends with an error event and [DONE]."""
    try:
        async for chunk in gen:
            yield chunk
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001
        err = api_error_from(e)
        logger.warning("stream failed: %s", err.message)
        yield sse(err.body())
    yield SSE_DONE


def tokens_as_ids(state: ServingState, req) -> bool:
    """A request's return_tokens_as_token_ids, else the server's --return-tokens-as-token-ids."""
    flag = req.return_tokens_as_token_ids
    return state.return_tokens_as_token_ids if flag is None else flag
