"""The OpenAI-compatible HTTP server: FastAPI routes over the serving functions.

    pagellm serve [MODEL] --host --port --api-key --served-model-name ...

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /v1/models/{model}, POST /tokenize, POST /detokenize (these need the API
key when --api-key is set, checked before the body is read); GET /health,
GET /version, GET /metrics, GET /docs, GET /openapi.json (always open, for
probes and scrapers); GET /dashboard (a live page over GET /dashboard/state: needs the key
unless --dashboard-public; the page accepts it as ?key=).

Every error has OpenAI's shape {"error": {"message", "type", "param", "code"}},
401, 404 (unknown route), 405, 413 (body over --max-request-body-size) and
unparsable bodies included; /openapi.json declares them. Tokenization and chat
templates run in worker threads, never on the event loop.

SIGINT/SIGTERM: stop accepting, abort in-flight requests (their streams end with a
final chunk, finish_reason "abort", and [DONE]), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Annotated

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagellm import __version__
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.async_engine import AsyncLLMEngine
from pagellm.engine.chat_utils import apply_chat_template
from pagellm.entrypoints.openai.dashboard import add_dashboard
from pagellm.entrypoints.openai.middleware import DEFAULT_MAX_BODY_SIZE, BodySizeLimit, RequireApiKey
from pagellm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassificationRequest,
    ClassificationResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    PoolingRequest,
    PoolingResponseList,
    RerankRequest,
    RerankResponse,
    ResponsesRequest,
    ScoreRequest,
    ScoreResponse,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from pagellm.entrypoints.openai.reasoning import PARSERS
from pagellm.entrypoints.openai.serving_chat import create_chat_completion
from pagellm.entrypoints.openai.serving_common import (
    TRACE_CONTEXT,
    APIError,
    ServingState,
    api_error_from,
    check_request,
    model_not_found,
)
from pagellm.entrypoints.openai.serving_completion import create_completion
from pagellm.entrypoints.openai.serving_pooling import (
    create_classification,
    create_embedding,
    create_pooling,
    create_rerank,
    create_score,
)
from pagellm.entrypoints.openai.serving_responses import create_response
from pagellm.entrypoints.openai.tool_calls import template_messages
from pagellm.tracing import init_tracer, trace_headers

logger = logging.getLogger(__name__)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON.", code="invalid_json")
    if kind in ("model_attributes_type", "dict_type", "model_type") and not loc:
        return APIError(400, "the request body must be a JSON object.", code="invalid_request")
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    return APIError(400, f"{where}: {msg}", param=param, code="invalid_type" if "type" in kind else "invalid_value")


_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _http_error(exc: StarletteHTTPException) -> APIError:
    """Starlette's own errors (unknown route, wrong method, an unparsable body) in OpenAI's shape."""
    detail = exc.detail if isinstance(exc.detail, str) else "invalid request"
    if exc.status_code == 404:
        detail = "no such route: see /docs for the routes this server has."
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(exc.status_code, detail, type=kind, code=_HTTP_CODES.get(exc.status_code),
                    headers=dict(exc.headers or {}))


# Responses every API route may send besides its 200 (declared in /openapi.json).
ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "Invalid request: a field, its type or its range; the message names the field."),
    (401, "Missing or wrong API key (when the server has --api-key)."),
    (404, "Unknown model."),
    (413, "Request body over --max-request-body-size."),
    (429, "Too many waiting requests; retry after Retry-After seconds."),
    (500, "The engine failed the request."),
    (503, "The engine is shutting down."),
)}
# With stream: true, each event's data is a chunk (a JSON object: the response with choice deltas, or an
# error object if the stream fails after it started), and the last one is the string [DONE].
STREAMING = {"description": "The response; a server-sent event stream (text/event-stream) with stream: true.",
             "content": {"text/event-stream": {"schema": {"anyOf": [
                 {"type": "object", "description": "a chunk, or an error object"},
                 {"type": "string", "enum": ["[DONE]"]}]}}}}


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def build_app(state: ServingState, api_key: str | None = None,
              max_body_size: int = DEFAULT_MAX_BODY_SIZE, dashboard_public: bool = False,
              cors: dict | None = None) -> FastAPI:
    """`cors`: CORSMiddleware's options (allow_origins, ...); None or no origins: no CORS headers."""
    app = FastAPI(title="pagellm", version=__version__,
                  description="OpenAI-compatible API over a paged-KV-cache engine.")
    app.state.serving = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return _error_response(_http_error(exc))

    async def respond(request: Request, coro):
        """Run a handler; a client that leaves before a non-streaming answer is ready aborts its requests."""
        if state.tracer is not None:
            TRACE_CONTEXT.set(trace_headers(request.headers))
        work = asyncio.ensure_future(coro)
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not gone.done():
                gone.cancel()
        if not work.done():
            work.cancel()  # cancels run_all, which aborts every engine request of this call
            with contextlib.suppress(BaseException):
                await work
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        try:
            result = work.result()
        except Exception as e:  # noqa: BLE001 - every error gets OpenAI's shape
            err = api_error_from(e)
            if err.status >= 500:
                logger.warning("request failed: %s", err.message)
            return _error_response(err)
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if isinstance(result, Response):
            return result
        return JSONResponse(result if isinstance(result, dict) else result.model_dump())

    api = dict(responses={200: STREAMING, **ERRORS})

    @app.post("/v1/completions", **api)
    async def completions(request: Request, body: CompletionRequest) -> CompletionResponse:
        return await respond(request, create_completion(state, body))

    @app.post("/v1/chat/completions", **api)
    async def chat(request: Request, body: ChatCompletionRequest) -> ChatCompletionResponse:
        return await respond(request, create_chat_completion(state, body))

    @app.post("/v1/responses", **api)
    async def responses(request: Request, body: ResponsesRequest) -> dict:
        return await respond(request, create_response(state, body))

    pooling = dict(responses={k: ERRORS[k] for k in (400, 401, 404, 413, 429)})

    @app.post("/v1/embeddings", **pooling)
    async def embeddings(request: Request, body: EmbeddingRequest) -> EmbeddingResponse:
        return await respond(request, create_embedding(state, body))

    @app.post("/pooling", **pooling)
    async def pooling_route(request: Request, body: PoolingRequest) -> PoolingResponseList:
        return await respond(request, create_pooling(state, body))

    @app.post("/classify", **pooling)
    @app.post("/v1/classify", include_in_schema=False, **pooling)
    async def classify(request: Request, body: ClassificationRequest) -> ClassificationResponse:
        return await respond(request, create_classification(state, body))

    @app.post("/score", **pooling)
    @app.post("/v1/score", include_in_schema=False, **pooling)
    async def score(request: Request, body: ScoreRequest) -> ScoreResponse:
        return await respond(request, create_score(state, body))

    @app.post("/rerank", **pooling)
    @app.post("/v1/rerank", include_in_schema=False, **pooling)
    @app.post("/v2/rerank", include_in_schema=False, **pooling)
    async def rerank(request: Request, body: RerankRequest) -> RerankResponse:
        return await respond(request, create_rerank(state, body))

    @app.get("/v1/models", responses={401: ERRORS[401]})
    async def models() -> ModelList:
        return ModelList(data=[_model_card(state), *(_model_card(state, name) for name in state.lora_modules)])

    @app.get("/v1/models/{model:path}", responses={401: ERRORS[401], 404: ERRORS[404]})
    async def model(model: str) -> ModelCard:
        if model != state.model_name and model not in state.lora_modules:
            raise model_not_found(state, model)
        return _model_card(state, None if model == state.model_name else model)

    errors = {k: ERRORS[k] for k in (400, 401, 404, 413)}

    if state.allow_runtime_lora_updating:
        lora_responses = {200: {"description": "Done (a line of text).", "content": {"text/plain": {}}}, **errors}

        @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=lora_responses)
        async def load_lora_adapter(request: Request, body: LoadLoRAAdapterRequest):
            return await respond(request, _load_lora(state, body))

        @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=lora_responses)
        async def unload_lora_adapter(request: Request, body: UnloadLoRAAdapterRequest):
            return await respond(request, _unload_lora(state, body))

    if state.server_dev_mode:
        _add_dev_routes(app, state, respond, errors)

    @app.post("/tokenize", responses=errors)
    async def tokenize(request: Request, body: TokenizeRequest) -> TokenizeResponse:
        return await respond(request, serve_tokenize(state, body))

    @app.post("/detokenize", responses=errors)
    async def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
        return await respond(request, serve_detokenize(state, body))

    @app.get("/health", response_class=Response, responses={
        200: {"description": "The server is up (no body)."},
        503: {"model": ErrorResponse, "description": "The engine is dead (a worker died); requests fail."}})
    async def health() -> Response:
        if state.engine.dead is not None:
            return _error_response(APIError(503, f"the engine is dead: {state.engine.dead}", type="server_error",
                                            code="service_unavailable"))
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format."}})
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    add_dashboard(app, state)
    app.openapi = lambda: _openapi(app)
    # Outermost first: the API key is checked before the body is read, then the body's size.
    app.add_middleware(BodySizeLimit, max_bytes=max_body_size)
    app.add_middleware(RequireApiKey, api_key=api_key, dashboard_public=dashboard_public)
    if cors and cors.get("allow_origins"):  # outermost: preflights are answered before the key is asked for
        app.add_middleware(CORSMiddleware, **cors)
    return app


class CollectiveRPCRequest(BaseModel):
    method: str
    args: list = []
    kwargs: dict = {}
    timeout: float | None = None


def _add_dev_routes(app: FastAPI, state: ServingState, respond, errors: dict) -> None:
    """--server-dev-mode (vLLM's VLLM_SERVER_DEV_MODE routes): sleep mode, the prefix cache and worker calls for RL
    post-training between rollouts. Not for a server open to clients."""
    engine = state.engine
    busy = {**errors, 409: {"model": ErrorResponse, "description": "Requests are running (the call needs an idle "
                                                                     "engine)."}}

    async def empty(coro) -> Response:
        await coro
        return Response(status_code=200)

    @app.post("/sleep", responses=busy)
    async def sleep(request: Request, level: int = 1) -> Response:
        return await respond(request, empty(engine.sleep(level)))

    @app.post("/wake_up", responses=errors)
    async def wake_up(request: Request, tags: Annotated[list[str] | None, Query()] = None) -> Response:
        return await respond(request, empty(engine.wake_up(tags)))

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict:
        return {"is_sleeping": await engine.is_sleeping()}

    @app.post("/reset_prefix_cache", responses=busy)
    async def reset_prefix_cache(request: Request) -> Response:
        async def reset() -> Response:
            if not await engine.reset_prefix_cache():
                raise APIError(409, "the prefix cache was not reset: requests hold KV blocks; retry when they end.",
                               code="conflict")
            return Response(status_code=200)

        return await respond(request, reset())

    @app.post("/collective_rpc", responses=errors)
    async def collective_rpc(request: Request, body: CollectiveRPCRequest) -> JSONResponse:
        async def call() -> JSONResponse:
            results = await engine.collective_rpc(body.method, body.timeout, tuple(body.args), body.kwargs)
            try:
                return JSONResponse({"results": results})
            except (TypeError, ValueError) as e:
                raise APIError(500, f"the results of {body.method!r} are not JSON: {e}", type="server_error") from e

        return await respond(request, call())


async def _load_lora(state: ServingState, body: LoadLoRAAdapterRequest) -> Response:
    """Load an adapter in every engine core under a new name (400 if the name is taken or the adapter refused)."""
    from pagellm.lora.adapter import read_adapter_config
    from pagellm.lora.request import LoRARequest

    name = body.lora_name
    if name in state.lora_modules or name == state.model_name:
        raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    read_adapter_config(body.lora_path, state.engine.config.lora.max_lora_rank)  # a quick 400 for the common cases
    lora = LoRARequest(name, max((m.lora_int_id for m in state.lora_modules.values()), default=0) + 1, body.lora_path)
    await state.engine.update_lora(lora, load=True)
    state.lora_modules[name] = lora
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def _unload_lora(state: ServingState, body: UnloadLoRAAdapterRequest) -> Response:
    """Drop an adapter from every engine core (404 if unknown, 400 while requests use it)."""
    lora = state.lora_modules.get(body.lora_name)
    if lora is None or (body.lora_int_id is not None and body.lora_int_id != lora.lora_int_id):
        raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                       code="model_not_found")
    await state.engine.update_lora(lora, load=False)
    del state.lora_modules[body.lora_name]
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _model_card(state: ServingState, lora: str | None = None) -> ModelCard:
    """The base model's card, or a LoRA adapter's (its path as root, the base model as parent)."""
    if lora is not None:
        return ModelCard(id=lora, root=state.lora_modules[lora].lora_path, parent=state.model_name,
                         max_model_len=state.max_model_len)
    return ModelCard(id=state.model_name, root=state.engine.config.model.model, max_model_len=state.max_model_len)


async def serve_tokenize(state: ServingState, body: TokenizeRequest) -> TokenizeResponse:
    check_request(state, body, "/tokenize")
    tok = state.tokenizer
    if body.messages is not None:
        conv = template_messages(body)
        ids = await asyncio.to_thread(apply_chat_template, tok, conv, state.chat_template, body.add_generation_prompt,
                                      template_kwargs=body.chat_template_kwargs)
    elif body.prompt is not None:
        ids = await asyncio.to_thread(tok.encode, body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        raise APIError(400, "give prompt or messages.", param="prompt")
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)


async def serve_detokenize(state: ServingState, body: DetokenizeRequest) -> DetokenizeResponse:
    check_request(state, body, "/detokenize")
    vocab = state.engine.config.model.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens must be in [0, {vocab}), got {bad[:5]}.", param="tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(state.tokenizer.decode, body.tokens))


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, minus the 422 it declares for every body (this server answers 400)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def make_state(ns: argparse.Namespace, engine_args: EngineArgs) -> ServingState:
    runtime_lora = getattr(ns, "allow_runtime_lora_updating", False)
    if runtime_lora and not engine_args.enable_lora:
        raise ValueError("--allow-runtime-lora-updating needs --enable-lora.")
    engine = AsyncLLMEngine.from_engine_args(engine_args)
    if engine.tokenizer is None:
        raise ValueError("the server needs a tokenizer; do not pass --skip-tokenizer-init")
    chat_template = None
    if ns.chat_template:
        with open(ns.chat_template) as f:
            chat_template = f.read()
    cfg = engine.config
    parser = None
    if ns.enable_auto_tool_choice:
        if ns.tool_call_parser is None:
            from pagellm.entrypoints.openai.tool_calls import TOOL_PARSERS

            raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser ({', '.join(TOOL_PARSERS)}).")
        from pagellm.entrypoints.openai.tool_calls import make_parser

        parser = make_parser(ns.tool_call_parser)
    state = ServingState(engine, cfg.model.served_model_name, cfg.model.max_model_len, max_n=ns.max_n,
                         chat_template=chat_template, max_logprobs=cfg.model.max_logprobs,
                         trust_request_chat_template=ns.trust_request_chat_template, tool_parser=parser,
                         default_sampling=dict(cfg.model.default_sampling),
                         reasoning_parser=PARSERS[ns.reasoning_parser] if ns.reasoning_parser else None,
                         enable_prompt_tokens_details=ns.enable_prompt_tokens_details,
                         return_tokens_as_token_ids=ns.return_tokens_as_token_ids,
                         lora_modules={m.lora_name: m for m in (cfg.lora.modules if cfg.lora is not None else ())},
                         allow_runtime_lora_updating=runtime_lora,
                         server_dev_mode=getattr(ns, "server_dev_mode", False))
    if getattr(ns, "otlp_traces_endpoint", None):
        state.tracer = init_tracer(ns.otlp_traces_endpoint)
    if state.reasoning_parser is not None:
        state.reasoning_tokens = state.reasoning_parser.token_ids(engine.tokenizer)
    state.metrics.attach_engine(engine)
    return state


def run_server(ns: argparse.Namespace, engine_args: EngineArgs) -> None:
    state = make_state(ns, engine_args)
    cors = dict(allow_origins=ns.allowed_origins, allow_methods=ns.allowed_methods, allow_headers=ns.allowed_headers,
                allow_credentials=ns.allow_credentials)
    app = build_app(state, ns.api_key, ns.max_request_body_size, ns.dashboard_public, cors)
    config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level,
                            timeout_graceful_shutdown=10)
    server = GracefulServer(config, state.engine)
    print(f"pagellm serving {state.model_name!r} on http://{ns.host}:{ns.port} "
          f"({state.engine.num_blocks} KV blocks{' per replica' if len(state.engine.replicas) > 1 else ''})",
          flush=True)
    if state.default_sampling:
        print(f"sampling defaults for fields a request leaves unset (the generation config; --generation-config "
              f"vllm turns them off): {state.default_sampling}", flush=True)
    asyncio.run(server.serve())


class GracefulServer(uvicorn.Server):
    """On SIGINT/SIGTERM, abort in-flight requests first (their streams end cleanly), then let uvicorn exit."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine) -> None:
        super().__init__(config)
        self.engine = engine
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if not self._draining:
            self._draining = True
            asyncio.get_event_loop().create_task(self.engine.shutdown(drain_timeout=0.0))
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets=sockets)
        # A shutdown asked for by a signal is a clean exit (status 0): uvicorn would re-raise the signal.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()
