"""ASGI middleware that answers before a request body is parsed: the API key, the body's size.

    client -> RequireApiKey (401 unless the key matches, for /v1/*, /tokenize, /detokenize)
           -> BodySizeLimit (413 when Content-Length, or the bytes actually sent, exceed the limit)
           -> FastAPI (body parsing, validation, routes)

Both answer in OpenAI's error shape. Checking the key first means an unauthenticated client learns
nothing about the body it sent; limiting the body before parsing means a huge body costs the
server no JSON parsing and no memory beyond the limit.
"""

from __future__ import annotations

import hmac
import json
from typing import Any
from urllib.parse import parse_qs

DEFAULT_MAX_BODY_SIZE = 16 * 2**20  # bytes; a max_model_len prompt as text is far smaller
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
DASHBOARD_PREFIX = "/dashboard"  # protected too, unless --dashboard-public; a browser may pass ?key=
DASHBOARD_ASSETS = "/dashboard/static/"  # the page's script and style sheet: code, no data, always open


async def send_error(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequireApiKey:
    def __init__(self, app, api_key: str | None, dashboard_public: bool = False) -> None:
        self.app = app
        self.api_key = api_key
        self.dashboard_public = dashboard_public

    def _protected(self, path: str) -> bool:
        if path.startswith(DASHBOARD_PREFIX):
            return not self.dashboard_public and not path.startswith(DASHBOARD_ASSETS)
        return path.startswith(PROTECTED_PREFIXES)

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if self.api_key is None or scope["type"] != "http" or not self._protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not given and scope["path"].startswith(DASHBOARD_PREFIX):  # a page opened in a browser: ?key=
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key", [""])[0]
        if hmac.compare_digest(given.encode(), self.api_key.encode()):
            await self.app(scope, receive, send)
            return
        await send_error(send, 401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                         "invalid_api_key", [(b"www-authenticate", b"Bearer")])


class _BodyTooLarge(BaseException):
    """Raised from receive(); a BaseException so that the framework's body parser (which turns any
    Exception into a 400) lets it through to this middleware."""


class BodySizeLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes (the server's --max-request-body-size)."

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_error(send, 413, self._message(), "request_too_large")
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await send_error(send, 413, self._message(), "request_too_large")
