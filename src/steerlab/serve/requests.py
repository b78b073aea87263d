"""What a client of the engine holds: the engine's configuration, a request's handle, the
events it receives (tokens, log-probabilities, the end) and its completion, and the errors
:meth:`Engine.submit` raises (:mod:`steerlab.serve.engine` runs the batch loop).

A :class:`RequestHandle` delivers events to an asyncio queue when it was made for a loop
(``events()``, ``result()``), else to a thread-safe queue (``wait()``); it is cancelled from
any thread, and the engine drops a cancelled row at its next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from steerlab.errors import SteeringError, SteerlabError

__all__ = ["Completion", "EngineBusy", "EngineClosed", "EngineConfig", "Event", "RequestHandle",
           "TokenLogprob"]

class EngineBusy(SteerlabError):
    """The engine's waiting queue is full (HTTP 429)."""


class EngineClosed(SteerlabError):
    """The engine was shut down."""


@dataclass(frozen=True)
class EngineConfig:
    """Capacity of the engine.

    Args:
        max_batch: rows decoded together at most.
        max_queue: requests waiting for a row at most; more are refused (:class:`EngineBusy`).
        max_prefill_tokens: padded prompt tokens (rows × longest prompt) pre-filled in one
            step at most, so that a burst of long prompts does not stall running rows for
            long (one request is always admitted, whatever its length).
    """

    max_batch: int = 32
    max_queue: int = 128
    max_prefill_tokens: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SteeringError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most likely alternatives at its position.

    ``logprob`` is ``None`` for a prompt's first token (nothing comes before it); ``top``
    holds ``(token id, logprob)`` pairs, most likely first (as many as asked for).
    """

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Event:
    """What a request produced in one step: a text delta and its token ids, or the end.

    ``logprobs`` has one entry per generated token of the step when the request asked for
    log-probabilities (also for an end-of-sequence token, which has no text and is not in
    ``token_ids``); the request's first event carries ``prompt_logprobs`` when it asked for
    the prompt to be scored.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    """The whole result of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    error: str | None = None
    queued_s: float = 0.0  # submission to admission
    first_token_s: float = 0.0  # submission to first token
    total_s: float = 0.0  # submission to end
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestHandle:
    """A submitted request: its events, its result, and a way to cancel it.

    Events go to an asyncio queue when the handle was made for a loop (``events()``,
    ``result()``), else to a thread-safe queue (``wait()``). Cancel from any thread.
    """

    def __init__(self, request_id: str, prompt_tokens: int,
                 loop: asyncio.AbstractEventLoop | None) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.finished: float | None = None
        self._loop = loop
        self._aqueue: asyncio.Queue[Event] | None = asyncio.Queue() if loop else None
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._done = False

    # -- producer side (engine thread) ---------------------------------------------------------
    def _push(self, event: Event) -> None:
        if event.token_ids and self.first_token is None:
            self.first_token = time.perf_counter()
        if event.finish_reason is not None:
            self.finished = time.perf_counter()
        if self._loop is not None and self._aqueue is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody listens any more
                self._cancelled.set()
        else:
            self._queue.put(event)

    # -- consumer side -------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (idempotent)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def events(self) -> AsyncIterator[Event]:
        """The request's events until (and including) the one with a finish reason."""
        if self._aqueue is None:
            raise SteeringError("this handle was not made for an event loop; use wait()")
        while not self._done:
            event = await self._aqueue.get()
            if event.finish_reason is not None:
                self._done = True
            yield event

    async def result(self) -> Completion:
        """Await the whole completion."""
        return self._collect([e async for e in self.events()])

    def wait(self, timeout: float | None = None) -> Completion:
        """Block until the request finishes (handles made without a loop)."""
        if self._loop is not None:
            raise SteeringError("this handle belongs to an event loop; await result()")
        events: list[Event] = []
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            try:
                event = self._queue.get(timeout=left)
            except queue.Empty as exc:
                raise TimeoutError(f"request {self.id} did not finish in {timeout} s") from exc
            events.append(event)
            if event.finish_reason is not None:
                return self._collect(events)

    def _collect(self, events: Sequence[Event]) -> Completion:
        last = events[-1]
        end = self.finished or time.perf_counter()
        return Completion(
            text="".join(e.text for e in events),
            token_ids=[t for e in events for t in e.token_ids],
            finish_reason=last.finish_reason or "error",
            prompt_tokens=self.prompt_tokens,
            error=last.error,
            queued_s=(self.admitted or end) - self.submitted,
            first_token_s=(self.first_token or end) - self.submitted,
            total_s=end - self.submitted,
            logprobs=[lp for e in events for lp in e.logprobs],
            prompt_logprobs=next((e.prompt_logprobs for e in events
                                  if e.prompt_logprobs is not None), None),
        )
