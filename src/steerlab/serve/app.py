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
"""

from __future__ import annotations

import asyncio
import copy
import http
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import steerlab
from steerlab.errors import SteeringError, SteerlabError
from steerlab.models import LoadedModel
from steerlab.runtime import Steer
from steerlab.serve import responses
from steerlab.serve.engine import (
    Completion,
    Engine,
    EngineBusy,
    EngineClosed,
    EngineConfig,
    Event,
    RequestHandle,
    TokenLogprob,
)
from steerlab.serve.protocol import ChatRequest, CompletionRequest, ErrorBody
from steerlab.serve.registry import ControllerRegistry, SteeringSpec
from steerlab.serve.sampling import SamplingParams

log = logging.getLogger("steerlab.serve")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what} for code, what in (
        (400, "a valid body the server will not run (unknown controller, limits, ...)"),
        (401, "missing or wrong bearer token"),
        (404, "unknown model"),
        (413, "request body too large"),
        (422, "the body fails schema validation"),
        (429, "the waiting queue is full"),
        (500, "generation failed"),
        (503, "the server is shutting down"),
    )}


@dataclass(frozen=True)
class ServerConfig:
    """Limits and options of the server.

    Args:
        served_name: the model id clients send (``GET /v1/models`` lists it).
        api_key: the bearer token every request but ``GET /health`` must carry (the ``/v1``
            API and its docs, ``/docs`` and ``/openapi.json``); ``None`` for none.
        max_tokens: largest ``max_tokens`` a request may ask for.
        default_max_tokens: ``max_tokens`` of a request that sends none (chat) or ``null``
            (both endpoints); ``None``: 256, or ``max_tokens`` if lower. A legacy completion
            that leaves the field out gets OpenAI's 16 (or ``max_tokens`` if lower).
        max_prompt_tokens: longest prompt, in tokens, a request may send.
        max_n: most choices (``n`` times the number of prompts) per request.
        max_body_bytes: largest request body.
        log_prompts: also log prompt text (off by default).
        engine: the engine's capacity.
        default_steering: the steering of a request that sends no ``steering`` field (one
            that sends ``"steering": []`` is unsteered), for clients that cannot add a body
            field (lm-evaluation-harness); checked against the controllers at start-up.
    """

    served_name: str
    api_key: str | None = None
    max_tokens: int = 512
    max_prompt_tokens: int = 2048
    max_n: int = 8
    max_body_bytes: int = 1 << 20
    log_prompts: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)
    disconnect_poll_s: float = 0.2
    default_max_tokens: int | None = None
    default_steering: tuple[SteeringSpec, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.default_steering, tuple) or not all(
                isinstance(x, SteeringSpec) for x in self.default_steering):
            raise SteeringError("default_steering must be a tuple of SteeringSpec")
        for name in ("max_tokens", "max_prompt_tokens", "max_n", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SteeringError(f"{name} must be a positive integer, got {value!r}")
        d = self.default_max_tokens
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise SteeringError(f"default_max_tokens must be a positive integer, got {d!r}")
            if d > self.max_tokens:
                raise SteeringError(f"default_max_tokens ({d}) exceeds max_tokens "
                                    f"({self.max_tokens})")

    @property
    def default_tokens(self) -> int:
        """``max_tokens`` of a request that sets none."""
        if self.default_max_tokens is not None:
            return self.default_max_tokens
        return min(DEFAULT_MAX_TOKENS, self.max_tokens)


DEFAULT_MAX_TOKENS = 256
OPENAI_COMPLETION_DEFAULT = 16  # legacy completions without max_tokens, as OpenAI


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def response(self) -> JSONResponse:
        return JSONResponse(responses.error_body(self.message, type=self.type, param=self.param,
                                                 code=self.code), status_code=self.status)


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


class _Stream(StreamingResponse):
    """A streamed response that cancels its requests however it ends, even if the client
    went away before the body generator first ran (its ``finally`` would then never run)."""

    def __init__(self, content: AsyncIterator[str], handles: Sequence[RequestHandle],
                 **kw: Any) -> None:
        super().__init__(content, **kw)
        self._handles = handles

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for h in self._handles:
                h.cancel()


class _Server:
    """State shared by the routes: the model, the engine, the controllers, the limits."""

    def __init__(self, lm: LoadedModel, registry: ControllerRegistry,
                 config: ServerConfig) -> None:
        self.lm, self.registry, self.config = lm, registry, config
        self.engine = Engine(lm, config.engine)
        # every controller is checked against the model now, never at request time
        registry.validate(lm, layers=self.engine.layers)
        try:
            registry.resolve(list(config.default_steering))
        except SteerlabError as exc:
            raise SteeringError(f"default steering: {exc}") from exc
        self.created = int(time.time())
        # the app's own tokenizer, so that encoding (in a worker thread) never waits for the
        # engine's decoding, nor makes it wait; the shared one under the engine's lock if it
        # cannot be copied
        self.tokenizer, self.tokenizer_lock = _own_tokenizer(lm.tokenizer,
                                                             self.engine.tokenizer_lock)
        # a prompt of more characters than this cannot fit in max_prompt_tokens tokens
        self.max_prompt_chars = config.max_prompt_tokens * _longest_token(lm.tokenizer)

    # -- request preparation -------------------------------------------------------------------
    def check_common(self, req: ChatRequest | CompletionRequest) -> list[Steer]:
        if req.model != self.config.served_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                                f"{self.config.served_name!r}", param="model",
                           code="model_not_found")
        bad = req.unsupported()
        if bad:
            raise APIError(400, f"unsupported option(s): {', '.join(bad)} (steerlab does not "
                                f"implement them; leave them unset)", param=bad[0],
                           code="unsupported_option")
        try:
            return self.registry.resolve(self.specs(req))
        except SteerlabError as exc:
            raise APIError(400, str(exc), param="steering", code="invalid_steering") from exc

    def specs(self, req: ChatRequest | CompletionRequest) -> list[SteeringSpec]:
        """The request's steering, or the server's default when it sends no field."""
        if req.steering is None:
            return list(self.config.default_steering)
        return req.steering_specs()

    def token_strings(self, ids: Iterable[int], *, spell_bytes: bool = False) -> dict[int, str]:
        """Each token's own text (special tokens spelt out), for log-probabilities; with
        ``spell_bytes``, a token that is part of a character is spelt ``bytes:\\xe2\\x80``
        as OpenAI's legacy completions do (its text alone would be U+FFFD, the same for many
        tokens: the ``top_logprobs`` dicts would merge them)."""
        uniq = sorted(set(ids))
        with self.tokenizer_lock:
            texts = self.tokenizer.batch_decode([[i] for i in uniq], skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)
        out = dict(zip(uniq, texts, strict=True))
        if spell_bytes:
            for t, raw in self.token_bytes(out, partial_only=True).items():
                out[t] = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return out

    def token_bytes(self, strings: dict[int, str], *,
                    partial_only: bool = False) -> dict[int, list[int]]:
        """Each token's bytes (chat ``bytes``): its text's UTF-8, except for a token that is
        part of a character (its text is U+FFFD), whose own bytes are read from its
        byte-level (GPT-2) or ``<0xHH>`` (SentencePiece) spelling where it has one
        (``partial_only``: only those)."""
        out = {} if partial_only else {t: list(s.encode("utf-8")) for t, s in strings.items()}
        partial = [t for t, s in strings.items() if _REPLACEMENT in s]
        if partial:
            with self.tokenizer_lock:
                pieces = self.tokenizer.convert_ids_to_tokens(partial)
            for t, piece in zip(partial, pieces, strict=True):
                raw = _piece_bytes(piece) if isinstance(piece, str) else None
                if raw is not None:
                    out[t] = raw
        return out

    def decode_prompt(self, ids: Sequence[int]) -> str:
        """A token-id prompt's text, for ``echo`` (special tokens spelt out)."""
        with self.tokenizer_lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False))

    # -- counts and sizes, before any tokenization (cheap: lengths only) ------------------------
    def check_count(self, prompts: int, n: int) -> None:
        if prompts * n > self.config.max_n:
            raise APIError(400, f"{prompts} prompt(s) x n={n} choices is over this "
                                f"server's limit of {self.config.max_n} per request", param="n")

    def check_chars(self, chars: int, what: str = "the prompt") -> None:
        if chars > self.max_prompt_chars:
            limit = self.config.max_prompt_tokens
            raise APIError(400, f"{what} has {chars} characters, more than {limit} tokens can "
                                f"hold; this server accepts at most {limit} tokens",
                           param="prompt", code="context_length_exceeded")

    def check_completion_sizes(self, req: CompletionRequest) -> None:
        p: Any = req.prompt
        if isinstance(p, str):
            self.check_count(1, req.n)
            self.check_chars(len(p))
            return
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        single_ids = isinstance(p[0], int)  # pydantic: lists are of one kind
        self.check_count(1 if single_ids else len(p), req.n)
        for x in [p] if single_ids else p:
            if isinstance(x, str):
                self.check_chars(len(x))
            else:
                self.check_prompts([x])

    def check_chat_sizes(self, req: ChatRequest) -> None:
        self.check_count(1, req.n)
        if len(req.messages) > self.config.max_prompt_tokens:
            raise APIError(400, f"{len(req.messages)} messages is more than this server's "
                                f"{self.config.max_prompt_tokens} prompt tokens can hold",
                           param="messages", code="context_length_exceeded")
        self.check_chars(sum(len(m.text()) for m in req.messages), "the messages' text")

    # -- tokenization (in a worker thread) -----------------------------------------------------
    def encode_completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p: Any = req.prompt
        if isinstance(p, str):
            p = [p]
        elif isinstance(p[0], int):
            return [[int(x) for x in p]]
        out = []
        for x in p:
            if isinstance(x, str):
                with self.tokenizer_lock:
                    out.append(list(self.tokenizer(x, add_special_tokens=True)["input_ids"]))
            else:
                out.append([int(t) for t in x])
        return out

    def encode_chat(self, req: ChatRequest) -> list[int]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"{self.config.served_name} has no chat template (a base "
                                f"model); use /v1/completions", code="no_chat_template")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in req.messages]
        with self.tokenizer_lock:
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
            except Exception as exc:  # jinja2 raises TemplateError for roles it rejects
                raise APIError(400, f"the model's chat template rejected the messages: {exc}",
                               param="messages") from exc
            return list(tok(text, add_special_tokens=False)["input_ids"])

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        for p in prompts:
            if not p:
                raise APIError(400, "a prompt is empty (no tokens)", param="prompt")
            if len(p) > self.config.max_prompt_tokens:
                raise APIError(400, f"the prompt has {len(p)} tokens; this server accepts at "
                                    f"most {self.config.max_prompt_tokens}",
                               param="prompt", code="context_length_exceeded")

    def max_tokens(self, asked: int | None, prompts: Sequence[Sequence[int]]) -> int:
        limit = self.config.max_tokens
        if asked is None:  # the server's default cap, within the model's context
            room = (self.engine.max_length or 10**9) - max(len(p) for p in prompts)
            return max(1, min(self.config.default_tokens, room))
        if asked > limit:
            raise APIError(400, f"max_tokens is {asked}; this server allows at most {limit}",
                           param="max_tokens", code="max_tokens_exceeded")
        context = self.engine.max_length
        longest = max(len(p) for p in prompts)
        if context is not None and longest + asked > context:
            raise APIError(400, f"the prompt ({longest} tokens) plus max_tokens ({asked}) "
                                f"exceeds the model's context of {context} tokens",
                           param="max_tokens", code="context_length_exceeded")
        return asked

    def submit(self, prompts: Sequence[Sequence[int]], n: int, base: SamplingParams,
               steers: list[Steer], rid: str) -> list[RequestHandle]:
        self.check_count(len(prompts), n)
        loop = asyncio.get_running_loop()
        handles: list[RequestHandle] = []
        try:
            for i, ids in enumerate(prompts):
                for j in range(n):
                    seed = None if base.seed is None else base.seed + j
                    params = replace(base, seed=seed)
                    handles.append(self.engine.submit(ids, params, steers,
                                                      request_id=f"{rid}-{i * n + j}", loop=loop))
        except EngineBusy as exc:
            for h in handles:
                h.cancel()
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from exc
        except EngineClosed as exc:
            for h in handles:
                h.cancel()
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from exc
        except SteerlabError as exc:
            for h in handles:
                h.cancel()
            raise APIError(400, str(exc)) from exc
        return handles


_REPLACEMENT = "\ufffd"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character map, inverted: which byte each character spells."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


_BYTE_LEVEL = _byte_level_alphabet()


def _piece_bytes(piece: str) -> list[int] | None:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return [int(piece[3:5], 16)]
        except ValueError:
            return None
    if piece and all(c in _BYTE_LEVEL for c in piece):
        return [_BYTE_LEVEL[c] for c in piece]
    return None


def _own_tokenizer(tok: Any, shared_lock: threading.Lock) -> tuple[Any, threading.Lock]:
    try:
        return copy.deepcopy(tok), threading.Lock()
    except Exception:  # a tokenizer that cannot be copied: share it, under the engine's lock
        return tok, shared_lock


def _longest_token(tok: Any) -> int:
    """The most characters one token stands for (an upper bound: byte-level vocabularies
    spell each byte as one character)."""
    try:
        vocab = tok.get_vocab()
        longest = max((len(t) for t in vocab), default=0)
    except Exception:
        longest = 0
    return longest if longest > 0 else 64


class _Layout:
    """A request's choices as the client sees them: the echoed prompt before the completion
    (legacy completions with ``echo``) and log-probabilities in the endpoint's layout, for
    the whole body (``full``, in a worker thread: it decodes every token) or a stream's
    events (``event``, offsets carried from one chunk to the next)."""

    def __init__(self, kind: responses.Kind, server: _Server, n: int,
                 echo: list[str] | None, logprobs: bool) -> None:
        self.kind, self.server, self.n, self.echo, self.logprobs = (
            kind, server, n, echo, logprobs)
        self.started: set[int] = set()
        self.offsets: dict[int, int] = {}

    def _entries(self, prompt: list[TokenLogprob] | None,
                 generated: list[TokenLogprob]) -> list[TokenLogprob]:
        return [*(prompt or []), *generated] if self.echo is not None else list(generated)

    def _layout(self, entries: list[TokenLogprob], strings: dict[int, str],
                offset: int) -> dict[str, Any]:
        if self.kind == "chat":
            return responses.chat_logprobs(entries, strings, self.server.token_bytes(strings))
        return responses.completion_logprobs(entries, strings, offset)

    def _strings(self, entries: list[TokenLogprob]) -> dict[int, str]:
        return self.server.token_strings(
            [e.token for e in entries] + [t for e in entries for t, _ in e.top],
            spell_bytes=self.kind == "completion")

    def full(self, results: Sequence[Completion]
             ) -> tuple[list[str] | None, list[dict[str, Any] | None] | None]:
        texts = None if self.echo is None else [
            self.echo[k // self.n] + r.text for k, r in enumerate(results)]
        if not self.logprobs:
            return texts, None
        entries = [self._entries(r.prompt_logprobs, r.logprobs) for r in results]
        strings = self._strings([e for x in entries for e in x])
        return texts, [self._layout(x, strings, 0) for x in entries]

    def wanted(self, i: int, event: Event) -> bool:
        """Whether a stream event makes a chunk."""
        return bool(event.text or event.finish_reason is not None or event.logprobs
                    or (self.echo is not None and i not in self.started))

    async def event(self, i: int, event: Event) -> tuple[str, dict[str, Any] | None]:
        """A stream event's text and log-probabilities (the prompt before the first)."""
        first = i not in self.started
        self.started.add(i)
        text = event.text
        if first and self.echo is not None:
            text = self.echo[i // self.n] + text
        if not self.logprobs:
            return text, None
        entries = self._entries(event.prompt_logprobs if first else None, event.logprobs)
        offset = self.offsets.get(i, 0)
        layout = await asyncio.to_thread(
            lambda: self._layout(entries, self._strings(entries), offset))
        if self.kind == "completion":
            self.offsets[i] = self.offsets.get(i, 0) + sum(len(t) for t in layout["tokens"])
        return text, layout


def _failure(results: Sequence[Completion | Event]) -> APIError | None:
    """The error to answer with when a choice failed or was cancelled by the server."""
    for r in results:
        if r.finish_reason == "error":
            return APIError(500, r.error or "generation failed", type="server_error",
                            code="generation_failed")
        if r.finish_reason == "cancelled":
            return APIError(503, r.error or "the request was cancelled", type="server_error",
                            code="cancelled")
    return None


async def _merged(handles: Sequence[RequestHandle]) -> AsyncIterator[tuple[int, Event]]:
    """Events of several handles as they come, tagged with the handle's index."""
    if len(handles) == 1:
        async for event in handles[0].events():
            yield 0, event
        return
    q: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
        async for e in h.events():
            await q.put((i, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, e = await q.get()
            if e.finish_reason is not None:
                left -= 1
            yield i, e
    finally:
        for t in tasks:
            t.cancel()


def create_app(lm: LoadedModel, registry: ControllerRegistry | None = None,
               config: ServerConfig | None = None) -> FastAPI:
    """Build the FastAPI app; its lifespan starts and stops the engine."""
    cfg = config or ServerConfig(served_name=lm.info.model_id)
    server = _Server(lm, registry or ControllerRegistry.empty(), cfg)

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

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = []
        for e in errors[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        first = errors[0] if errors else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return APIError(422, "invalid request: " + "; ".join(parts), param=param,
                        code="validation_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message, code = str(exc.detail or ""), None
        cause = exc.__cause__
        if exc.status_code == 400 and cause is not None:  # FastAPI could not parse the body
            code = "invalid_body"
            if isinstance(cause, RecursionError):
                message = ("the request body nests JSON arrays or objects too deeply to be "
                           "parsed; send a flatter body")
            else:
                message = (f"the request body could not be parsed as JSON "
                           f"({type(cause).__name__}: {cause})"[:500])
        if not message.strip():
            try:
                message = http.HTTPStatus(exc.status_code).phrase
            except ValueError:
                message = f"HTTP error {exc.status_code}"
        response = APIError(exc.status_code, message, type=kind, code=code).response()
        for name, value in (exc.headers or {}).items():  # e.g. Allow on a 405
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception({"event": "error", "path": request.url.path})
        return APIError(500, f"internal error: {type(exc).__name__}",
                        type="server_error").response()


    @app.get("/health", responses={503: {"description": "the engine is not running"}})
    async def health() -> JSONResponse:
        ok = server.engine.running
        body = {"status": "ok" if ok else "stopped", "model": cfg.served_name,
                **server.engine.stats()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models", responses=_ERRORS)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{model_id:path}", responses=_ERRORS)
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != cfg.served_name:
            raise APIError(404, f"model {model_id!r} does not exist", type="not_found_error",
                           code="model_not_found")
        return _model_card(server)

    @app.get("/v1/steering", responses=_ERRORS)
    async def list_steering() -> dict[str, Any]:
        return {"object": "list", "model": cfg.served_name,
                "max_steering_entries": server.registry.max_steers,
                "default_steering": server.registry.describe_steers(
                    list(cfg.default_steering)),
                "scopes": ["last", "all", "generated", "from:P"],
                "data": [server.registry.controllers[n].describe()
                         for n in server.registry.names]}

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        steers = server.check_common(body)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 (generate nothing) needs echo: true (score the "
                                "prompt with logprobs)", param="max_tokens")
        server.check_completion_sizes(body)  # before any tokenization
        prompts = await asyncio.to_thread(server.encode_completion_prompts, body)
        server.check_prompts(prompts)
        echo: list[str | None] | None = None
        if body.echo:  # the prompts' text as given (token-id prompts: decoded once valid)
            p: Any = body.prompt
            echo = [p] if isinstance(p, str) else (
                list(p) if p and isinstance(p[0], str) else [None] * len(prompts))
        return await _generate("completion", body, prompts, steers, request,
                               prompt_log=body.prompt, echo=echo)

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        steers = server.check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        server.check_chat_sizes(body)  # before any rendering or tokenization
        prompts = [await asyncio.to_thread(server.encode_chat, body)]
        server.check_prompts(prompts)
        return await _generate("chat", body, prompts, steers, request,
                               prompt_log=[m.model_dump() for m in body.messages])

    async def _generate(kind: responses.Kind, body: ChatRequest | CompletionRequest,
                        prompts: list[list[int]], steers: list[Steer], request: Request,
                        prompt_log: Any, echo: list[str | None] | None = None) -> Any:
        asked = body.limit() if isinstance(body, ChatRequest) else body.max_tokens
        if isinstance(body, CompletionRequest) and "max_tokens" not in body.model_fields_set:
            asked = min(OPENAI_COMPLETION_DEFAULT, cfg.max_tokens)  # OpenAI's default
        if isinstance(body, ChatRequest):
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            prompt_logprobs = None
        else:
            logprobs = body.logprobs
            # echo scores the prompt when log-probabilities are asked for; max_tokens 0
            # always runs the prompt (and reports what was asked)
            prompt_logprobs = (logprobs if logprobs is not None else 0) if body.echo and (
                logprobs is not None or asked == 0) else None
        try:
            base = SamplingParams(max_tokens=server.max_tokens(asked, prompts),
                                  temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed, stop=body.stop_list(),
                                  ignore_eos=body.ignore_eos, logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs)
        except SteerlabError as exc:
            raise APIError(400, str(exc)) from exc
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex[:24]}"
        handles = server.submit(prompts, body.n, base, steers, rid)  # checks the token ids
        try:
            echoed = None if echo is None else [
                e if e is not None else await asyncio.to_thread(server.decode_prompt, ids)
                for e, ids in zip(echo, prompts, strict=True)]
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        out = _Layout(kind, server, body.n, echoed, logprobs is not None)
        prompt_tokens = sum(len(p) for p in prompts)
        record: dict[str, Any] = {
            "event": "request", "id": rid, "endpoint": request.url.path, "stream": body.stream,
            "model": body.model, "choices": len(handles),
            "prompt_tokens": prompt_tokens, "max_tokens": base.max_tokens,
            "temperature": base.temperature, "steering": server.registry.describe_steers(
                server.specs(body)),
            "client": request.client.host if request.client else None,
        }
        if cfg.log_prompts:
            record["prompt"] = prompt_log
        created = int(time.time())
        steering_desc = record["steering"]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _Stream(
                _stream(kind, rid, created, body.model, handles, prompt_tokens, include_usage,
                        record, out), handles,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        started = time.perf_counter()
        try:
            results = await _gather(handles, request.is_disconnected)
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        if results is None:  # the client went away; nobody reads this
            _log_done(record, 499, handles, started)
            return JSONResponse({}, status_code=499)
        failure = _failure(results)
        if failure is not None:
            _log_done(record, failure.status, handles, started, results, failure.message)
            raise failure
        _log_done(record, 200, handles, started, results)
        texts, lps = await asyncio.to_thread(out.full, results)
        return JSONResponse(responses.full_response(kind, rid, created, body.model, results,
                                                    prompt_tokens, steering_desc, texts=texts,
                                                    logprobs=lps),
                            headers={"X-Request-Id": rid})

    async def _gather(handles: Sequence[RequestHandle],
                      disconnected: Callable[[], Awaitable[bool]]) -> list[Completion] | None:
        tasks = [asyncio.ensure_future(h.result()) for h in handles]
        try:
            while True:
                _, pending = await asyncio.wait(tasks, timeout=cfg.disconnect_poll_s)
                if not pending:
                    return [t.result() for t in tasks]
                if await disconnected():
                    for h in handles:
                        h.cancel()
                    return None
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()

    async def _stream(kind: responses.Kind, rid: str, created: int, model: str,
                      handles: Sequence[RequestHandle], prompt_tokens: int,
                      include_usage: bool, record: dict[str, Any],
                      out: _Layout) -> AsyncIterator[str]:
        started = time.perf_counter()
        status, message = 200, None
        finished = False
        tokens = 0
        reasons: dict[int, str] = {}
        steering: list[dict[str, Any]] | None = record["steering"]  # in the first chunk only
        try:
            if kind == "chat":
                for i in range(len(handles)):
                    yield responses.sse(responses.chunk(kind, rid, created, model, i, role=True,
                                                        steering=steering))
                    steering = None
            async for i, event in _merged(handles):
                tokens += len(event.token_ids)
                if event.finish_reason is not None:
                    reasons[i] = event.finish_reason
                err = _failure([event])
                if err is not None:
                    status, message = err.status, err.message
                    yield responses.sse(responses.error_body(err.message, type=err.type,
                                                             code=err.code))
                    for h in handles:
                        h.cancel()
                    return
                if out.wanted(i, event):
                    text, lps = await out.event(i, event)
                    yield responses.sse(responses.chunk(
                        kind, rid, created, model, i, text=text,
                        finish_reason=event.finish_reason, logprobs=lps, steering=steering))
                    steering = None
            if include_usage:
                yield responses.sse(responses.usage_chunk(kind, rid, created, model,
                                                          prompt_tokens, tokens))
            yield responses.sse("[DONE]")
            finished = True
        finally:
            if not finished and status == 200:
                status = 499  # the client went away mid-stream
            for h in handles:
                h.cancel()
            record = dict(record, completion_tokens=tokens,
                          finish_reasons=[reasons.get(i) for i in range(len(handles))])
            _log_done(record, status, handles, started, error=message)

    def _log_done(record: dict[str, Any], status: int, handles: Sequence[RequestHandle],
                  started: float, results: Sequence[Completion] | None = None,
                  error: str | None = None) -> None:
        now = time.perf_counter()
        out = dict(record, status=status, latency_ms=round(1000 * (now - started), 1))
        firsts = [h.first_token for h in handles if h.first_token is not None]
        if firsts:
            out["ttft_ms"] = round(1000 * (min(firsts) - handles[0].submitted), 1)
        admitted = [h.admitted for h in handles if h.admitted is not None]
        if admitted:
            out["queue_ms"] = round(1000 * (min(admitted) - handles[0].submitted), 1)
        if results is not None:
            out["completion_tokens"] = sum(r.completion_tokens for r in results)
            out["finish_reasons"] = [r.finish_reason for r in results]
        if error:
            out["error"] = error
        log.info(out)

    return app


def _model_card(server: _Server) -> dict[str, Any]:
    info = server.lm.info
    return {"id": server.config.served_name, "object": "model", "created": server.created,
            "owned_by": "steerlab", "max_model_len": server.engine.max_length,
            "steerlab": {**info.as_dict(), "controllers": server.registry.names}}
