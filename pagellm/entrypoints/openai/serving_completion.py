"""POST /v1/completions: CompletionRequest -> engine requests (one per prompt) -> response or SSE chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from pagellm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprob,
    PromptLogprobsList,
    UsageInfo,
    random_id,
)
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
from pagellm.outputs import CompletionOutput, Logprob
from pagellm.sampling_params import RequestOutputKind


def normalize_prompts(prompt: Any) -> list[Any]:
    """str | [str] | [int] | [[int]] -> engine prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [{"prompt_token_ids": p} for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists "
                   "of token ids.", param="prompt")


def embeds_prompts(embeds: str | list[str] | None) -> list[dict]:
    """vLLM's prompt_embeds: each a base64 string of torch.save(tensor (tokens, hidden)) -> {"prompt_embeds": tensor}
    (loaded with weights_only: tensors only, no code)."""
    import base64
    import binascii
    import io

    import torch

    out = []
    for item in [embeds] if isinstance(embeds, str) else embeds or []:
        try:
            t = torch.load(io.BytesIO(base64.b64decode(item, validate=True)), weights_only=True, map_location="cpu")
        except (binascii.Error, ValueError, RuntimeError, EOFError, TypeError) as e:
            raise APIError(400, f"prompt_embeds must be base64 of a torch.save'd tensor: {e}",
                           param="prompt_embeds") from None
        if not isinstance(t, torch.Tensor):
            raise APIError(400, f"prompt_embeds must hold a tensor, got {type(t).__name__}.", param="prompt_embeds")
        out.append({"prompt_embeds": t})
    return out


def salted(prompts: list[Any], cache_salt: str | None) -> list[Any]:
    """The engine prompts with the request's cache_salt (its prefix-cache entries are shared only with requests
    giving the same salt)."""
    if cache_salt is None:
        return prompts
    if not isinstance(cache_salt, str) or not cache_salt:
        raise APIError(400, "cache_salt must be a non-empty string.", param="cache_salt")
    return [{"prompt": p, "cache_salt": cache_salt} if isinstance(p, str) else {**p, "cache_salt": cache_salt}
            for p in prompts]


def legacy_logprobs(entries: list[dict[int, Logprob] | None], token_ids: list[int], k: int,
                    text_start: int, tokenizer, as_ids: bool = False) -> CompletionLogprobs:
    """The completions API's logprobs: per token its text, offset in the choice text, logprob, and the
    top-k candidates plus the sampled token itself (so logprobs=0 still reports the sampled token, as vLLM).
    `as_ids`: tokens written "token_id:N" (the offsets still count the text)."""
    out = CompletionLogprobs()
    offset = text_start
    for entry, tok in zip(entries, token_ids):
        text = (entry[tok].decoded_token if entry and tok in entry else None) or tokenizer.decode([tok])
        out.tokens.append(f"token_id:{tok}" if as_ids else text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(entry[tok].logprob)
        top = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
        out.top_logprobs.append({(f"token_id:{t}" if as_ids else lp.decoded_token or str(t)): lp.logprob
                                 for t, lp in top if t == tok or (lp.rank and lp.rank <= k)})
    return out


def prompt_logprobs_json(entries: list[dict[int, Logprob] | None] | None) -> PromptLogprobsList | None:
    """vLLM's prompt_logprobs: per prompt position None (the first) or {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {str(t): PromptLogprob(logprob=lp.logprob, rank=lp.rank,
                                                            decoded_token=lp.decoded_token) for t, lp in e.items()}
            for e in entries]


async def create_completion(state: ServingState, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
    check_request(state, req, "/v1/completions")
    check_generative(state, "Completions")
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported by this server.", param="suffix", code="unsupported_parameter")
    prompts = salted(embeds_prompts(req.prompt_embeds) + (normalize_prompts(req.prompt) if req.prompt is not None
                                                          or req.prompt_embeds is None else []), req.cache_salt)
    if req.prompt_embeds is not None and req.echo:
        raise APIError(400, "echo needs the prompt's text; a prompt given as prompt_embeds has none.", param="echo")
    params = req.sampling_params(req.max_tokens, req.logprobs, state.default_sampling)
    if req.echo and req.logprobs is not None and params.prompt_logprobs is None:
        params.prompt_logprobs = req.logprobs
    params.output_kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
    params, beam = beam_search(state, req, params, req.logprobs is not None)
    inputs = await validate_inputs(state, prompts, params, "prompt", priority=req.priority, beam=beam,
                                   lora=lora_for(state, req))
    rid = random_id("cmpl")
    if req.stream:
        return guarded_stream(_stream(state, req, inputs, rid))
    choices: list[CompletionChoice] = []
    usage = UsageInfo()
    async for i, out in run_all(state, inputs, rid):
        usage.add_prompt(len(out.prompt_token_ids), out.num_cached_tokens, state.enable_prompt_tokens_details)
        for c in out.outputs:
            usage.completion_tokens += len(c.token_ids)
            choices.append(_choice(state, req, i, out, c))
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    choices.sort(key=lambda ch: ch.index)
    return CompletionResponse(id=rid, model=state.model_name, choices=choices, usage=usage)


def _choice(state: ServingState, req: CompletionRequest, i: int, out, c: CompletionOutput) -> CompletionChoice:
    prompt_text = ""
    if req.echo:
        prompt_text = out.prompt if out.prompt is not None else state.tokenizer.decode(out.prompt_token_ids)
    lp = None
    if req.logprobs is not None:
        entries, ids, start = list(c.logprobs or []), list(c.token_ids), len(prompt_text)
        if req.echo:
            entries = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + entries
            ids = list(out.prompt_token_ids) + ids
            start = 0
        lp = legacy_logprobs(entries, ids, req.logprobs, start, state.tokenizer, tokens_as_ids(state, req))
    ids = dict(prompt_token_ids=list(out.prompt_token_ids), token_ids=list(c.token_ids)) if req.return_token_ids else {}
    return CompletionChoice(index=i * req.n + c.index, text=prompt_text + c.text, logprobs=lp,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                            prompt_logprobs=prompt_logprobs_json(out.prompt_logprobs)
                            if req.prompt_logprobs is not None else None, **ids)


async def _stream(state: ServingState, req: CompletionRequest, inputs, rid: str) -> AsyncIterator[str]:
    created = int(time.time())
    usage = UsageInfo()
    echoed: set[int] = set()
    started: set[int] = set()  # choices that have sent their first chunk
    text_pos: dict[int, int] = {}
    continuous = req.stream_options is not None and req.stream_options.continuous()
    generated: dict[int, int] = {}  # tokens so far, per choice
    async for i, out in run_all(state, inputs, rid):
        if out.finished:
            usage.add_prompt(len(out.prompt_token_ids), out.num_cached_tokens, state.enable_prompt_tokens_details)
        for c in out.outputs:
            index = i * req.n + c.index
            usage.completion_tokens += len(c.token_ids)
            prefix = ""
            if req.echo and index not in echoed:
                echoed.add(index)
                prefix = out.prompt if out.prompt is not None else state.tokenizer.decode(out.prompt_token_ids)
            lp = None
            if req.logprobs is not None:
                start = text_pos.get(index, len(prefix))
                lp = legacy_logprobs(list(c.logprobs or []), list(c.token_ids), req.logprobs, start, state.tokenizer,
                                     tokens_as_ids(state, req))
                # offsets continue over the whole choice, token by token (as in the non-streaming response)
                text_pos[index] = lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else start
            ids = {}
            if req.return_token_ids:
                ids["token_ids"] = list(c.token_ids)
                if index not in started:
                    ids["prompt_token_ids"] = list(out.prompt_token_ids)
            started.add(index)
            choice = CompletionChoice(index=index, text=prefix + c.text, logprobs=lp, finish_reason=c.finish_reason,
                                      stop_reason=c.stop_reason, **ids)
            body = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": [choice.model_dump()]}
            if continuous:
                generated[index] = generated.get(index, 0) + len(c.token_ids)
                body["usage"] = UsageInfo.so_far(len(out.prompt_token_ids), generated[index])
            yield sse(body)
    if req.stream_options is not None and req.stream_options.include_usage:
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                   "choices": [], "usage": usage.model_dump()})
