"""The OpenAI-compatible HTTP server (FastAPI), with per-request steering.

Endpoints: ``GET /health`` (no auth), ``GET /v1/models``, ``GET /v1/steering``,
``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed with server-sent events
when ``"stream": true``). A request picks its steering in the extra body field
``"steering": [{"controller": "positive", "strength": 4.0, "scope": "all"}, ...]``; several
entries add up, none means plain generation (a request without the field gets the server's
``default_steering``, none by default). Requests run on one
:class:`~steerlab.serve.engine.Engine`, batched with whatever else is running.

Log-probabilities: ``logprobs`` and ``echo`` on ``/v1/completions`` (the legacy layout
``{tokens, token_logprobs, top_logprobs, text_offset}``; ``echo`` with ``logprobs`` scores the
prompt too, ``max_tokens: 0`` only that, which is what lm-evaluation-harness's
``local-completions`` sends for loglikelihood requests), ``logprobs`` and ``top_logprobs`` on
chat. The engine computes them (prompt scores in the pre-fill); token texts are decoded here,
in a worker thread. Streams carry the resolved ``steering`` in their first chunk.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
401 without the bearer token (when one is set: every route but ``/health``, the API docs
included), 404 for an unknown model or route, 413 for a body over the size limit, 422 for a
body that fails schema validation (wrong type, missing field, value out of range), 400 for a
body that cannot be parsed (nested too deeply) or a valid body the server will not run
(unknown controller, strength out of bounds, prompt or ``max_tokens`` over the limits, an
unsupported option), 429 when the waiting queue is full, 503 while shutting down, 500 for a
failed generation. A client that disconnects cancels its request at the engine's next step.

Counts and sizes are checked before any tokenization (choices per request, prompt lengths in
characters against what ``max_prompt_tokens`` tokens can hold), and prompts are tokenized in
a worker thread with the app's own copy of the tokenizer, so a hostile body neither blocks
the event loop (``/health``, running streams) nor the engine's decoding.

Each generation request writes one structured (JSON) log record on the ``steerlab.serve``
logger: id, endpoint, status, token counts, finish reasons, steering, timings; the prompt
text only with ``log_prompts=True``.

The pieces: :mod:`~steerlab.serve.state` (the configuration and the state the routes share),
:mod:`~steerlab.serve.routes` (the endpoints), :mod:`~steerlab.serve.errors` (the error body
and the exception handlers); this module has the middleware (bearer token, body size) and
:func:`create_app`, which puts them together.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import steerlab
from steerlab.models import LoadedModel
from steerlab.serve.errors import APIError, install_error_handlers
from steerlab.serve.registry import ControllerRegistry
from steerlab.serve.routes import router
from steerlab.serve.state import (
    DEFAULT_MAX_TOKENS,
    OPENAI_COMPLETION_DEFAULT,
    ServerConfig,
    ServerState,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "OPENAI_COMPLETION_DEFAULT",
    "APIError",
    "BearerAuth",
    "BodyLimit",
    "ServerConfig",
    "ServerState",
    "create_app",
]

log = logging.getLogger("steerlab.serve")


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with a 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = APIError(413, f"request body over the limit of {self.limit} bytes",
                             code="body_too_large")
        try:
            if length is not None and int(length) > self.limit:
                await too_large.response()(scope, receive, send)
                return
        except ValueError:
            await APIError(400, "invalid Content-Length header").response()(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # FastAPI passes an HTTPException raised while it reads the body through
                    # (anything else becomes a 400 "error parsing the body")
                    raise StarletteHTTPException(
                        413, f"request body over the limit of {self.limit} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except StarletteHTTPException as exc:
            if exc.status_code != 413 or started:
                raise
            await too_large.response()(scope, receive, send)


class BearerAuth:
    """ASGI middleware: every request but ``GET /health`` must carry
    ``Authorization: Bearer KEY`` (the ``/v1`` API, and ``/docs`` and ``/openapi.json``, which
    describe it).

    It answers 401 before the body is read, so a client without the key learns nothing of
    the API (not even whether its body would validate)."""

    OPEN = frozenset({"/health"})

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")) not in self.OPEN:
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(),
                                                                         self.key):
                await APIError(401, "missing or wrong API key (send Authorization: Bearer "
                                    "KEY)", type="authentication_error",
                               code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(lm: LoadedModel, registry: ControllerRegistry | None = None,
               config: ServerConfig | None = None) -> FastAPI:
    """Build the FastAPI app; its lifespan starts and stops the engine."""
    cfg = config or ServerConfig(served_name=lm.info.model_id)
    server = ServerState(lm, registry or ControllerRegistry.empty(), cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        log.info({"event": "startup", "model": cfg.served_name,
                  "controllers": server.registry.names, "max_batch": cfg.engine.max_batch,
                  "max_queue": cfg.engine.max_queue, "auth": cfg.api_key is not None})
        try:
            yield
        finally:
            server.engine.close()
            log.info({"event": "shutdown", **server.engine.counters})

    app = FastAPI(title="steerlab", version=steerlab.__version__, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    if cfg.api_key is not None:  # added last: runs first, before any body is read
        app.add_middleware(BearerAuth, key=cfg.api_key)
    install_error_handlers(app)
    app.include_router(router)
    return app
