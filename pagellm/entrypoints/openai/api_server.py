"""The OpenAI-compatible HTTP server: FastAPI routes over the serving functions.

    pagellm serve [MODEL] --host --port --api-key --served-model-name ...

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
POST /tokenize, POST /detokenize (these need the API key when --api-key is
set); GET /health, GET /version, GET /metrics, GET /docs (always open, for
probes and scrapers).

Every error has OpenAI's shape {"error": {"message", "type", "param", "code"}},
401 included. SIGINT/SIGTERM: stop accepting, abort in-flight requests (their
streams end with a final chunk, finish_reason "abort", and [DONE]), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagellm import __version__
from pagellm.engine.arg_utils import EngineArgs
from pagellm.engine.async_engine import AsyncLLMEngine
from pagellm.engine.chat_utils import apply_chat_template
from pagellm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagellm.entrypoints.openai.serving_chat import create_chat_completion
from pagellm.entrypoints.openai.serving_common import APIError, ServingState, api_error_from, check_request
from pagellm.entrypoints.openai.serving_completion import create_completion

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
    if kind in ("model_attributes_type", "dict_type") and not loc:
        return APIError(400, "the request body must be a JSON object.", code="invalid_request")
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=param, code="invalid_type"
                    if "type" in kind else "invalid_value")


def build_app(state: ServingState, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="pagellm", version=__version__,
                  description="OpenAI-compatible API over a paged-KV-cache engine.")
    app.state.serving = state

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("request failed")
        return _error_response(api_error_from(exc))

    async def respond(coro):
        try:
            result = await coro
        except Exception as e:  # noqa: BLE001 - every error gets OpenAI's shape
            return _error_response(api_error_from(e))
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(result.model_dump())

    auth = [Depends(require_key)]

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest):
        return await respond(create_completion(state, body))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatCompletionRequest):
        return await respond(create_chat_completion(state, body))

    @app.get("/v1/models", dependencies=auth)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.model_name, root=state.engine.config.model.model,
                                         max_model_len=state.max_model_len)])

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_request(state, body, "/tokenize")
        tok = state.tokenizer
        if body.messages is not None:
            conv = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = apply_chat_template(tok, conv, state.chat_template, body.add_generation_prompt)
        elif body.prompt is not None:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise APIError(400, "give prompt or messages.", param="prompt")
        return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_request(state, body, "/detokenize")
        vocab = state.engine.config.model.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must be in [0, {vocab}), got {bad[:5]}.", param="tokens")
        return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def make_state(ns: argparse.Namespace, engine_args: EngineArgs) -> ServingState:
    engine = AsyncLLMEngine.from_engine_args(engine_args)
    if engine.tokenizer is None:
        raise ValueError("the server needs a tokenizer; do not pass --skip-tokenizer-init")
    chat_template = None
    if ns.chat_template:
        with open(ns.chat_template) as f:
            chat_template = f.read()
    cfg = engine.config
    state = ServingState(engine, cfg.model.served_model_name,
                         cfg.model.max_model_len, max_n=ns.max_n, chat_template=chat_template)
    state.metrics.attach_engine(engine)
    return state


def run_server(ns: argparse.Namespace, engine_args: EngineArgs) -> None:
    state = make_state(ns, engine_args)
    app = build_app(state, ns.api_key)
    config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level,
                            timeout_graceful_shutdown=10)
    server = GracefulServer(config, state.engine)
    print(f"pagellm serving {state.model_name!r} on http://{ns.host}:{ns.port} "
          f"({state.engine.engine.num_blocks} KV blocks)", flush=True)
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
