"""The server's routes, one :data:`router` for :func:`~steerlab.serve.app.create_app` to
include: ``GET /health``, ``GET /v1/models`` (and one model), ``GET /v1/steering``,
``POST /v1/completions`` and ``POST /v1/chat/completions``.

The routes find the shared :class:`~steerlab.serve.state.ServerState` on ``app.state.server``.
A generation request is checked and tokenized (in a worker thread), its choices submitted to
the engine, then answered whole or streamed as server-sent events; either way it writes one
structured log record on the ``steerlab.serve`` logger when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from steerlab.errors import SteerlabError
from steerlab.runtime import Steer
from steerlab.serve import responses
from steerlab.serve.errors import ERROR_RESPONSES, APIError, generation_error
from steerlab.serve.protocol import ChatRequest, CompletionRequest
from steerlab.serve.requests import Completion, Event, RequestHandle, TokenLogprob
from steerlab.serve.sampling import SamplingParams
from steerlab.serve.state import OPENAI_COMPLETION_DEFAULT, ServerState

log = logging.getLogger("steerlab.serve")

router = APIRouter()


def _state(request: Request) -> ServerState:
    """The state of the app serving ``request``."""
    server: ServerState = request.app.state.server
    return server


# -- listing -------------------------------------------------------------------------------------
@router.get("/health", responses={503: {"description": "the engine is not running"}})
async def health(request: Request) -> JSONResponse:
    server = _state(request)
    ok = server.engine.running
    body = {"status": "ok" if ok else "stopped", "model": server.config.served_name,
            **server.engine.stats()}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(_state(request))]}


@router.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    server = _state(request)
    if model_id != server.config.served_name:
        raise APIError(404, f"model {model_id!r} does not exist", type="not_found_error",
                       code="model_not_found")
    return _model_card(server)


@router.get("/v1/steering", responses=ERROR_RESPONSES)
async def list_steering(request: Request) -> dict[str, Any]:
    server = _state(request)
    registry, cfg = server.registry, server.config
    return {"object": "list", "model": cfg.served_name,
            "max_steering_entries": registry.max_steers,
            "default_steering": registry.describe_steers(list(cfg.default_steering)),
            "scopes": ["last", "all", "generated", "from:P"],
            "data": [registry.controllers[n].describe() for n in registry.names]}


def _model_card(server: ServerState) -> dict[str, Any]:
    info = server.lm.info
    return {"id": server.config.served_name, "object": "model", "created": server.created,
            "owned_by": "steerlab", "max_model_len": server.engine.max_length,
            "steerlab": {**info.as_dict(), "controllers": server.registry.names}}


# -- generation ----------------------------------------------------------------------------------
@router.post("/v1/completions", responses=ERROR_RESPONSES)
async def completions(body: CompletionRequest, request: Request) -> Any:
    server = _state(request)
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
    return await _generate(server, "completion", body, prompts, steers, request,
                           prompt_log=body.prompt, echo=echo)


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    server = _state(request)
    steers = server.check_common(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    server.check_chat_sizes(body)  # before any rendering or tokenization
    prompts = [await asyncio.to_thread(server.encode_chat, body)]
    server.check_prompts(prompts)
    return await _generate(server, "chat", body, prompts, steers, request,
                           prompt_log=[m.model_dump() for m in body.messages])


def _sampling(server: ServerState, body: ChatRequest | CompletionRequest,
              prompts: list[list[int]]) -> SamplingParams:
    """The request's sampling parameters, ``max_tokens`` and log-probabilities resolved."""
    asked = body.limit() if isinstance(body, ChatRequest) else body.max_tokens
    if isinstance(body, CompletionRequest) and "max_tokens" not in body.model_fields_set:
        asked = min(OPENAI_COMPLETION_DEFAULT, server.config.max_tokens)  # OpenAI's default
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
        return SamplingParams(max_tokens=server.max_tokens(asked, prompts),
                              temperature=body.temperature, top_p=body.top_p,
                              seed=body.seed, stop=body.stop_list(),
                              ignore_eos=body.ignore_eos, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs)
    except SteerlabError as exc:
        raise APIError(400, str(exc)) from exc


async def _generate(server: ServerState, kind: responses.Kind,
                    body: ChatRequest | CompletionRequest, prompts: list[list[int]],
                    steers: list[Steer], request: Request, prompt_log: Any,
                    echo: list[str | None] | None = None) -> Any:
    """Run a checked request's choices on the engine; answer whole or as a stream."""
    base = _sampling(server, body, prompts)
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
    out = _Layout(kind, server, body.n, echoed, base.logprobs is not None)
    prompt_tokens = sum(len(p) for p in prompts)
    record: dict[str, Any] = {
        "event": "request", "id": rid, "endpoint": request.url.path, "stream": body.stream,
        "model": body.model, "choices": len(handles),
        "prompt_tokens": prompt_tokens, "max_tokens": base.max_tokens,
        "temperature": base.temperature, "steering": server.registry.describe_steers(
            server.specs(body)),
        "client": request.client.host if request.client else None,
    }
    if server.config.log_prompts:
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
        results = await _gather(handles, request.is_disconnected,
                                server.config.disconnect_poll_s)
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    if results is None:  # the client went away; nobody reads this
        _log_done(record, 499, handles, started)
        return JSONResponse({}, status_code=499)
    failure = generation_error(results)
    if failure is not None:
        _log_done(record, failure.status, handles, started, results, failure.message)
        raise failure
    _log_done(record, 200, handles, started, results)
    texts, lps = await asyncio.to_thread(out.full, results)
    return JSONResponse(responses.full_response(kind, rid, created, body.model, results,
                                                prompt_tokens, steering_desc, texts=texts,
                                                logprobs=lps),
                        headers={"X-Request-Id": rid})


async def _gather(handles: Sequence[RequestHandle], disconnected: Callable[[], Awaitable[bool]],
                  poll_s: float) -> list[Completion] | None:
    """Every handle's completion; ``None`` (all cancelled) if the client goes away first."""
    tasks = [asyncio.ensure_future(h.result()) for h in handles]
    try:
        while True:
            _, pending = await asyncio.wait(tasks, timeout=poll_s)
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
    """A streamed request's server-sent events, logged when the stream ends."""
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
            err = generation_error([event])
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
    """Write a request's log record: status, timings, token counts, finish reasons."""
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


class _Layout:
    """A request's choices as the client sees them: the echoed prompt before the completion
    (legacy completions with ``echo``) and log-probabilities in the endpoint's layout, for
    the whole body (``full``, in a worker thread: it decodes every token) or a stream's
    events (``event``, offsets carried from one chunk to the next)."""

    def __init__(self, kind: responses.Kind, server: ServerState, n: int,
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
