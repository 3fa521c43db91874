"""POST /v1/chat/completions: messages -> chat template -> engine request -> response or SSE chunks."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from pagellm.engine.chat_utils import chat_prompt
from pagellm.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    DeltaMessage,
    NamedToolChoice,
    TopLogprob,
    UsageInfo,
    random_id,
)
from pagellm.entrypoints.openai.reasoning import ReasoningStream
from pagellm.entrypoints.openai.serving_common import (
    APIError,
    ServingState,
    beam_search,
    check_generative,
    check_request,
    guarded_stream,
    lora_for,
    run_all,
    sse,
    tokens_as_ids,
    validate_inputs,
)
from pagellm.entrypoints.openai.serving_completion import prompt_logprobs_json, salted
from pagellm.entrypoints.openai.tool_calls import (
    ToolStream,
    check_tool_request,
    template_messages,
    tool_constraint,
)
from pagellm.outputs import Logprob
from pagellm.sampling_params import ParamError, RequestOutputKind


def chat_request_prompt(state: ServingState, req: ChatCompletionRequest) -> dict[str, Any]:
    """The engine prompt of a conversation: token ids by the chat template, and the images of its messages (CPU and
    network work: callers run it off the event loop)."""
    if not req.messages:
        raise APIError(400, "messages must not be empty.", param="messages")
    if req.chat_template is not None and not state.trust_request_chat_template:
        raise APIError(400, "a chat_template in the request is refused: the server runs only its own templates "
                       "unless started with --trust-request-chat-template.", param="chat_template",
                       code="untrusted_chat_template")
    conv = template_messages(req)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        return chat_prompt(state.tokenizer, state.engine.input_processor.mm, conv,
                           req.chat_template or state.chat_template, req.add_generation_prompt,
                           req.continue_final_message, tools, req.chat_template_kwargs, req.mm_processor_kwargs)
    except ParamError:
        raise
    except Exception as e:  # template errors are the request's fault
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from e


def chat_logprobs(entries: list[dict[int, Logprob]], token_ids: list[int], k: int,
                  as_ids: bool = False) -> ChatLogprobs:
    """`as_ids`: each token written "token_id:N" (return_tokens_as_token_ids)."""
    def token(t: int, lp: Logprob) -> str:
        return f"token_id:{t}" if as_ids else lp.decoded_token or ""

    content = []
    for entry, tok in zip(entries, token_ids):
        chosen = entry[tok]
        text = token(tok, chosen)
        tops = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                      key=lambda x: x[1].rank)
        content.append(ChatTokenLogprob(
            token=text, logprob=chosen.logprob, bytes=list(text.encode()),
            top_logprobs=[TopLogprob(token=token(t, lp), logprob=lp.logprob, bytes=list(token(t, lp).encode()))
                          for t, lp in tops]))
    return ChatLogprobs(content=content)



def tool_mode(state: ServingState, req: ChatCompletionRequest) -> str | None:
    """None (plain text), "named", "required" or "auto" (parse calls from the text)."""
    if not req.tools:
        return None
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        return "named"
    if choice == "required":
        return "required"
    if choice == "auto" or (choice is None and state.tool_parser is not None):
        return "auto"
    return None


def tool_stream(state: ServingState, req: ChatCompletionRequest, mode: str) -> ToolStream:
    name = req.tool_choice.function.name if mode == "named" else None
    parser = state.tool_parser.for_request(req) if state.tool_parser is not None else None  # (qwen3_coder: schemas)
    return ToolStream(mode, name, parser)


def echoed(req: ChatCompletionRequest) -> str:
    """vLLM's chat echo: the last message's text when it is the assistant's (the reply continues it), else ""."""
    last = req.messages[-1]
    return last.text() if req.echo and last.role == "assistant" else ""


def reasoning_stream(state: ServingState, params, prompt_text: str | None) -> ReasoningStream | None:
    """The choice's reasoning splitter (--reasoning-parser): for output no grammar constrains, or one whose grammar
    waits for the end of the thinking."""
    so = params.structured_outputs
    if state.reasoning_parser is None or (so is not None and so.think_tokens is None):
        return None
    return state.reasoning_parser.stream(prompt_text or "")


def reasoning_fields(req: ChatCompletionRequest, reasoning: str | None) -> dict:
    return {"reasoning": reasoning, "reasoning_content": reasoning} if reasoning and req.include_reasoning else {}


def choice_message(state: ServingState, req: ChatCompletionRequest, mode: str | None, text: str,
                   finish_reason: str | None, thinking: ReasoningStream | None = None,
                   ) -> tuple[ChatResponseMessage, str | None]:
    """The assistant message for a finished choice, its thinking (with a reasoning parser) and tool calls parsed
    out of the text; finish_reason "tool_calls" with calls."""
    reasoning = None
    if thinking is not None:
        reasoning, text = thinking.feed(text, final=True)
    extra = reasoning_fields(req, reasoning)
    if mode is None:
        return ChatResponseMessage(content=text if text or not reasoning else None, **extra), finish_reason
    ts = tool_stream(state, req, mode)
    ts.feed(text)
    content, _ = ts.finish()
    if mode == "auto":
        content, _ = ts.parser.parse(text)
    calls = ts.calls
    reason = "tool_calls" if calls and finish_reason == "stop" else finish_reason
    return ChatResponseMessage(content=content, tool_calls=calls, **extra), reason


async def create_chat_completion(state: ServingState,
                                 req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
    check_request(state, req, "/v1/chat/completions")
    check_generative(state, "Chat Completions")
    check_tool_request(req, state.tool_parser is not None)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
    if req.top_logprobs is not None and req.top_logprobs < 0:
        raise APIError(400, f"top_logprobs must be >= 0, got {req.top_logprobs}.", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                 state.default_sampling)
    constraint = tool_constraint(req)
    if constraint is not None:
        params.structured_outputs = constraint  # the call is valid by construction
    if any(getattr(p, "keep_special_tokens", False) for p in (state.reasoning_parser, state.tool_parser)):
        params.skip_special_tokens = False  # a parser reads tags that are special tokens (harmony)
    params.output_kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
    state.engine.check_capacity(1)
    prompt = await asyncio.to_thread(chat_request_prompt, state, req)
    ids = prompt["prompt_token_ids"]
    prompt_text = None
    if state.reasoning_parser is not None:  # where the output starts: inside the thinking or not
        prompt_text = await asyncio.to_thread(state.tokenizer.decode, ids[-64:])
        if params.structured_outputs is not None and state.reasoning_tokens is not None:
            # the constraint applies to the answer, after the thinking (the tags are single tokens)
            params.structured_outputs = dataclasses.replace(
                params.structured_outputs, think_tokens=state.reasoning_tokens,
                thinking=state.reasoning_parser.begins_in_reasoning(prompt_text))
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    params, beam = beam_search(state, req, params, req.logprobs)
    inputs = await validate_inputs(state, salted([prompt], req.cache_salt), params, "messages",
                                   max_param, priority=req.priority, beam=beam, lora=lora_for(state, req))
    rid = random_id("chatcmpl")
    mode = tool_mode(state, req)
    if req.stream:
        return guarded_stream(_stream(state, req, inputs, rid, mode, prompt_text))
    choices: list[ChatChoice] = []
    usage = UsageInfo()
    prompt_lps = None
    async for _, out in run_all(state, inputs, rid):
        usage.add_prompt(len(out.prompt_token_ids), out.num_cached_tokens, state.enable_prompt_tokens_details)
        if req.prompt_logprobs is not None:
            prompt_lps = prompt_logprobs_json(out.prompt_logprobs)
        for c in out.outputs:
            usage.completion_tokens += len(c.token_ids)
            lp = chat_logprobs(c.logprobs or [], c.token_ids, req.top_logprobs or 0,
                               tokens_as_ids(state, req)) if req.logprobs else None
            message, reason = choice_message(state, req, mode, c.text, c.finish_reason,
                                             reasoning_stream(state, inputs[0].params, prompt_text))
            if echoed(req):
                message.content = echoed(req) + (message.content or "")
            choices.append(ChatChoice(index=c.index, message=message, logprobs=lp, finish_reason=reason,
                                      stop_reason=c.stop_reason,
                                      token_ids=list(c.token_ids) if req.return_token_ids else None))
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    choices.sort(key=lambda ch: ch.index)
    return ChatCompletionResponse(id=rid, model=state.model_name, choices=choices, usage=usage,
                                  prompt_logprobs=prompt_lps,
                                  prompt_token_ids=list(inputs[0].prompt_token_ids) if req.return_token_ids else None)


async def _stream(state: ServingState, req: ChatCompletionRequest, inputs, rid: str,
                  mode: str | None, prompt_text: str | None) -> AsyncIterator[str]:
    created = int(time.time())
    num_prompt = len(inputs[0].prompt_token_ids)
    continuous = req.stream_options is not None and req.stream_options.continuous()
    generated = [0] * req.n  # tokens so far, per choice

    def chunk(index: int, delta: DeltaMessage, prompt_ids: list[int] | None = None, **kw) -> str:
        choice = {"index": index, "delta": delta.model_dump(exclude_none=True), "logprobs": None,
                  "finish_reason": None, **kw}
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [choice]}
        if prompt_ids is not None:
            body["prompt_token_ids"] = prompt_ids
        if continuous:
            body["usage"] = UsageInfo.so_far(num_prompt, generated[index])
        return sse(body)

    prompt_ids = list(inputs[0].prompt_token_ids) if req.return_token_ids else None
    for i in range(req.n):  # the role comes first, once per choice (then the echoed text, if any)
        yield chunk(i, DeltaMessage(role="assistant", content=""), prompt_ids)
        if echoed(req):
            yield chunk(i, DeltaMessage(content=echoed(req)))
    tools = {i: tool_stream(state, req, mode) for i in range(req.n)} if mode else {}
    thinking = {i: reasoning_stream(state, inputs[0].params, prompt_text) for i in range(req.n)}
    usage = UsageInfo(prompt_tokens=len(inputs[0].prompt_token_ids))
    cached = 0  # prompt tokens from the prefix cache (every output of the request reports them)
    async for _, out in run_all(state, inputs, rid):
        cached = out.num_cached_tokens
        for c in out.outputs:
            usage.completion_tokens += len(c.token_ids)
            generated[c.index] += len(c.token_ids)
            lp = None
            if req.logprobs:
                lp = chat_logprobs(c.logprobs or [], c.token_ids, req.top_logprobs or 0,
                                   tokens_as_ids(state, req)).model_dump()
            text, reasoning, ts = c.text, None, thinking[c.index]
            if ts is not None:  # the last piece also releases what the splitter held back
                reasoning, text = ts.feed(text, final=c.finish_reason is not None)
            extra = reasoning_fields(req, reasoning)
            content, calls = (tools[c.index].feed(text) if mode else (text, []))
            if extra and not content:
                content = None  # a thinking-only delta
            ids = {"token_ids": list(c.token_ids)} if req.return_token_ids else {}
            if (content or calls or extra or (c.finish_reason is None and not mode and ts is None) or lp
                    or (ids and c.token_ids)):  # every token id is sent, even while its text is held back
                yield chunk(c.index, DeltaMessage(content=content, tool_calls=calls or None, **extra), logprobs=lp,
                            **ids)
            if c.finish_reason is not None:
                reason = c.finish_reason
                if mode:
                    rest, final_calls = tools[c.index].finish()
                    if rest or final_calls:
                        yield chunk(c.index, DeltaMessage(content=rest, tool_calls=final_calls or None))
                    if tools[c.index].calls and reason == "stop":
                        reason = "tool_calls"
                yield chunk(c.index, DeltaMessage(), finish_reason=reason, stop_reason=c.stop_reason)
    if req.stream_options is not None and req.stream_options.include_usage:
        usage.add_prompt(0, cached, state.enable_prompt_tokens_details)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                   "choices": [], "usage": usage.model_dump()})
