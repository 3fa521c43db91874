"""The pooling routes (a model served with runner pooling): vLLM's shapes.

    POST /v1/embeddings           EmbeddingRequest -> one embedding per input (float list, or base64 float32)
    POST /pooling                 PoolingRequest -> the raw output per input (any task the model serves)
    POST /classify, /v1/classify  ClassificationRequest -> class probabilities and the top label per input
    POST /score, /v1/score        ScoreRequest -> a score per (text_1, text_2) pair (1:N or N:N)
    POST /rerank, /v1/rerank, /v2/rerank   RerankRequest -> documents by relevance to the query

An embedding model scores by cosine similarity, a cross-encoder (a classification model with one label) by its
sigmoid on the tokenizer's text pair. The same routes on a generative model, or /v1/completions and
/v1/chat/completions on a pooling model, are a 400 saying the model does not support that API.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np

from pagellm.engine.chat_utils import apply_chat_template
from pagellm.entrypoints.llm import pair_scores, score_inputs, score_pairs
from pagellm.entrypoints.openai.protocol import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingData,
    PoolingRequest,
    PoolingResponseList,
    PoolingUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    random_id,
)
from pagellm.entrypoints.openai.serving_common import APIError, ServingState, check_request
from pagellm.entrypoints.openai.serving_completion import normalize_prompts
from pagellm.pooling_params import PoolingParams
from pagellm.sampling_params import ParamError


def _model_task(state: ServingState, route: str, wants: tuple[str, ...]) -> str:
    pooler = state.engine.config.model.pooler
    if pooler is None or pooler.task not in wants:
        raise APIError(400, f"The model does not support the {route} API.", code="invalid_value")
    return pooler.task


async def _pool(state: ServingState, prompts: list[Any], params: PoolingParams, prefix: str, priority: int) -> list:
    """Run one engine request per prompt; the outputs in input order. Prompts are checked (400) before any runs;
    leaving early (a disconnect) aborts them all."""
    state.engine.check_capacity(len(prompts))

    def process() -> list:
        inputs = [state.engine.process_pooling_input(p, params) for p in prompts]
        for inp in inputs:
            inp.priority = priority
        return inputs

    try:
        inputs = await asyncio.to_thread(process)
    except ParamError as e:
        if e.code == "context_length_exceeded":
            raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. {e}",
                           param="input", code="context_length_exceeded") from e
        raise
    rid = random_id(prefix)
    start = time.monotonic()

    async def one(i: int, inp) -> Any:
        async for out in state.engine.generate(inp, None, f"{rid}-{i}"):
            if out.finished:
                state.metrics.pooling_finished(out, start, time.monotonic())
                return out
        raise APIError(500, "the engine returned no output", type="server_error", code="internal_error")

    tasks = [asyncio.create_task(one(i, inp)) for i, inp in enumerate(inputs)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
            if t.cancelled() or not t.done():  # gather cancels its tasks when the caller is cancelled (a disconnect)
                state.metrics.pooling_aborted()  # counted before the next await (a cancelled scope raises there)
        await asyncio.gather(*tasks, return_exceptions=True)


def _params(req: Any, task: str, **fields: Any) -> PoolingParams:
    try:
        return PoolingParams(truncate_prompt_tokens=req.truncate_prompt_tokens, task=task, **fields)
    except ParamError as e:
        raise APIError(400, str(e), param=e.param) from e


def _usage(outs: list) -> PoolingUsage:
    n = sum(len(o.prompt_token_ids) for o in outs)
    return PoolingUsage(prompt_tokens=n, total_tokens=n)


def _input_prompts(value: Any) -> list[Any]:
    try:
        return normalize_prompts(value)
    except APIError as e:
        raise APIError(400, e.message.replace("prompt", "input"), param="input") from e


def _chat_ids(state: ServingState, req: EmbeddingRequest) -> list[int]:
    """vLLM's chat embeddings: the conversation through the chat template (no generation prompt by default)."""
    if state.tokenizer is None:
        raise APIError(400, "messages need a tokenizer (the server runs with --skip-tokenizer-init).", param="messages")
    conv = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        return apply_chat_template(state.tokenizer, conv, state.chat_template, req.add_generation_prompt,
                                   req.continue_final_message, None, req.chat_template_kwargs)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e


async def create_embedding(state: ServingState, req: EmbeddingRequest) -> EmbeddingResponse:
    check_request(state, req, "/v1/embeddings")
    _model_task(state, "Embeddings", ("embed",))
    params = _params(req, "embed", dimensions=req.dimensions, normalize=req.normalize)
    if (req.input is None) == (req.messages is None):
        raise APIError(400, "give either input or messages (a conversation for the chat template).", param="input")
    if req.messages is not None:
        prompts = [{"prompt_token_ids": await asyncio.to_thread(_chat_ids, state, req)}]
    else:
        prompts = _input_prompts(req.input)
    outs = await _pool(state, prompts, params, "embd", req.priority)
    data = []
    for i, out in enumerate(outs):
        vec = out.outputs.data
        emb: list[float] | str = (base64.b64encode(vec.numpy().astype("<f4").tobytes()).decode()
                                  if req.encoding_format == "base64" else vec.tolist())
        data.append(EmbeddingData(index=i, embedding=emb))
    return EmbeddingResponse(id=random_id("embd"), model=req.model or state.model_name, data=data,
                             usage=_usage(outs))


async def create_pooling(state: ServingState, req: PoolingRequest) -> PoolingResponseList:
    check_request(state, req, "/pooling")
    task = req.task or _model_task(state, "Pooling", ("embed", "classify", "token_classify"))
    params = _params(req, task, normalize=req.normalize, use_activation=req.use_activation)  # checked per task
    outs = await _pool(state, _input_prompts(req.input), params, "pool", req.priority)
    data = [PoolingData(index=i, data=o.outputs.data.tolist()) for i, o in enumerate(outs)]
    return PoolingResponseList(id=random_id("pool"), model=req.model or state.model_name, data=data,
                               usage=_usage(outs))


async def create_classification(state: ServingState, req: ClassificationRequest) -> ClassificationResponse:
    check_request(state, req, "/classify")
    _model_task(state, "Classification", ("classify",))
    labels = state.engine.config.model.pooler.labels
    params = _params(req, "classify", use_activation=req.use_activation)
    outs = await _pool(state, _input_prompts(req.input), params, "classify", req.priority)
    data = []
    for i, out in enumerate(outs):
        probs = out.outputs.data.tolist()
        best = int(np.argmax(probs))
        data.append(ClassificationData(index=i, label=labels[best] if best < len(labels) else None, probs=probs,
                                       num_classes=len(probs)))
    return ClassificationResponse(id=random_id("classify"), model=req.model or state.model_name, data=data,
                                  usage=_usage(outs))


async def _scores(state: ServingState, pairs: list[tuple[str, str]], req: Any) -> tuple[list[float], PoolingUsage]:
    """One score per pair (llm.score_inputs / pair_scores, as LLM.score), and the prompt tokens it took."""
    _model_task(state, "Score", ("embed", "classify"))
    try:
        task, prompts = score_inputs(state.engine.config.model.pooler, state.tokenizer, pairs)
    except ValueError as e:
        raise APIError(400, f"The model does not support the Score API: {e}", code="invalid_value") from e
    outs = await _pool(state, prompts, _params(req, task, use_activation=req.use_activation), "score", req.priority)
    return pair_scores(task, [o.outputs.data for o in outs]), _usage(outs)


async def create_score(state: ServingState, req: ScoreRequest) -> ScoreResponse:
    check_request(state, req, "/score")
    try:
        pairs = score_pairs(req.text_1, req.text_2)
    except ValueError as e:
        raise APIError(400, str(e), param="text_1") from e
    scores, usage = await _scores(state, pairs, req)
    return ScoreResponse(id=random_id("score"), model=req.model or state.model_name,
                         data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)], usage=usage)


async def create_rerank(state: ServingState, req: RerankRequest) -> RerankResponse:
    check_request(state, req, "/rerank")
    if not req.documents:
        raise APIError(400, "documents must not be empty.", param="documents")
    if req.top_n < 0:
        raise APIError(400, f"top_n must be >= 0, got {req.top_n}.", param="top_n")
    scores, usage = await _scores(state, [(req.query, d) for d in req.documents], req)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if req.top_n:
        order = order[:req.top_n]
    results = [RerankResult(index=i, document=RerankDocument(text=req.documents[i]), relevance_score=scores[i])
               for i in order]
    return RerankResponse(id=random_id("rerank"), model=req.model or state.model_name, usage=usage,
                          results=results)
