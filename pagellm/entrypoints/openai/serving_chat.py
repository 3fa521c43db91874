"""POST /v1/chat/completions: messages -> chat template -> engine request -> response or SSE chunks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from pagellm.engine.chat_utils import apply_chat_template
from pagellm.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
    random_id,
)
from pagellm.entrypoints.openai.serving_common import (
    APIError,
    ServingState,
    check_request,
    guarded_stream,
    run_all,
    sse,
    validate_inputs,
)
from pagellm.entrypoints.openai.serving_completion import prompt_logprobs_json
from pagellm.outputs import Logprob
from pagellm.sampling_params import ParamError, RequestOutputKind


def chat_prompt_ids(state: ServingState, req: ChatCompletionRequest) -> list[int]:
    """Render the conversation with the chat template (CPU work: callers run it off the event loop)."""
    if not req.messages:
        raise APIError(400, "messages must not be empty.", param="messages")
    if req.chat_template is not None and not state.trust_request_chat_template:
        raise APIError(400, "a chat_template in the request is refused: the server runs only its own templates "
                       "unless started with --trust-request-chat-template.", param="chat_template",
                       code="untrusted_chat_template")
    conv = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        return apply_chat_template(state.tokenizer, conv, req.chat_template or state.chat_template,
                                   req.add_generation_prompt, req.continue_final_message)
    except ParamError:
        raise
    except Exception as e:  # template errors are the request's fault
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from e


def chat_logprobs(entries: list[dict[int, Logprob]], token_ids: list[int], k: int) -> ChatLogprobs:
    content = []
    for entry, tok in zip(entries, token_ids):
        chosen = entry[tok]
        text = chosen.decoded_token or ""
        tops = sorted((lp for t, lp in entry.items() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
        content.append(ChatTokenLogprob(
            token=text, logprob=chosen.logprob, bytes=list(text.encode()),
            top_logprobs=[TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob,
                                     bytes=list((lp.decoded_token or "").encode())) for lp in tops]))
    return ChatLogprobs(content=content)


async def create_chat_completion(state: ServingState,
                                 req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
    check_request(state, req, "/v1/chat/completions")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
    if req.top_logprobs is not None and req.top_logprobs < 0:
        raise APIError(400, f"top_logprobs must be >= 0, got {req.top_logprobs}.", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    params.output_kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
    state.engine.check_capacity(1)
    ids = await asyncio.to_thread(chat_prompt_ids, state, req)
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    inputs = await validate_inputs(state, [{"prompt_token_ids": ids}], params, "messages", max_param)
    rid = random_id("chatcmpl")
    if req.stream:
        return guarded_stream(_stream(state, req, inputs, rid))
    choices: list[ChatChoice] = []
    usage = UsageInfo()
    prompt_lps = None
    async for _, out in run_all(state, inputs, rid):
        usage.prompt_tokens = len(out.prompt_token_ids)
        if req.prompt_logprobs is not None:
            prompt_lps = prompt_logprobs_json(out.prompt_logprobs)
        for c in out.outputs:
            usage.completion_tokens += len(c.token_ids)
            lp = chat_logprobs(c.logprobs or [], c.token_ids, req.top_logprobs or 0) if req.logprobs else None
            choices.append(ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text), logprobs=lp,
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    choices.sort(key=lambda ch: ch.index)
    return ChatCompletionResponse(id=rid, model=state.model_name, choices=choices, usage=usage,
                                  prompt_logprobs=prompt_lps)


async def _stream(state: ServingState, req: ChatCompletionRequest, inputs, rid: str) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(index: int, delta: DeltaMessage, **kw) -> str:
        choice = {"index": index, "delta": delta.model_dump(exclude_none=True), "logprobs": None,
                  "finish_reason": None, **kw}
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                    "choices": [choice]})

    for i in range(req.n):  # the role comes first, once per choice
        yield chunk(i, DeltaMessage(role="assistant", content=""))
    usage = UsageInfo(prompt_tokens=len(inputs[0].prompt_token_ids))
    async for _, out in run_all(state, inputs, rid):
        for c in out.outputs:
            usage.completion_tokens += len(c.token_ids)
            lp = None
            if req.logprobs:
                lp = chat_logprobs(c.logprobs or [], c.token_ids, req.top_logprobs or 0).model_dump()
            if c.text or c.finish_reason is None or lp:
                yield chunk(c.index, DeltaMessage(content=c.text), logprobs=lp)
            if c.finish_reason is not None:
                yield chunk(c.index, DeltaMessage(), finish_reason=c.finish_reason, stop_reason=c.stop_reason)
    if req.stream_options is not None and req.stream_options.include_usage:
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                   "choices": [], "usage": usage.model_dump()})
