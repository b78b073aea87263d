"""A continuous-batching generation engine with per-row steering.

One background thread owns the model and runs a loop of *steps*. At each step it

1. drops the rows whose clients went away (cancelled),
2. admits waiting requests (up to ``max_batch`` rows in all, and at most
   ``max_prefill_tokens`` padded prompt tokens per step) and pre-fills them together in one
   left-padded forward pass, each row under its own controllers and strengths,
3. merges their KV caches into the running batch (:mod:`steerlab.serve.batch_cache`), and
4. runs one decode step for every running row, again each row with its own steering.

Finished rows (end of sequence, a stop string, ``max_tokens``) leave the batch after the
step that finished them, and new requests join at the next step: nobody waits for the whole
batch to finish (continuous batching at step granularity; pre-fill and decode are separate
forward passes because a Hugging Face model takes one cache layout per call).

Per-row semantics are the runtime's (:class:`steerlab.runtime.steering` with ``rows=`` and
explicit prompt lengths): positions are absolute, padding is never steered, a row without
controllers is computed exactly as an unsteered row, and each row samples with its own
seeded generator. A request's output therefore does not depend on what else is in the batch
(up to floating-point reduction order in batched matrix products; ``benchmarks/serve_load.py``
and the tests check greedy outputs against the same request served alone).

A request may ask for log-probabilities (``SamplingParams.logprobs``: the chosen token's and
the top alternatives at each generated token) and for its prompt to be scored
(``prompt_logprobs``: each prompt token given the ones before it; ``max_tokens`` may then be
0). Scoring rows are pre-filled apart from the others of their step, with the logits of every
position; the prompt length the runtime is told is the whole prompt's, as in generation.

The engine is independent of HTTP: ``submit`` returns a :class:`RequestHandle` whose events can
be awaited from an asyncio loop or waited for from a plain thread.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerlab.errors import SteeringError, SteerlabError
from steerlab.models import LoadedModel
from steerlab.runtime import Steer, check_compatible, steering
from steerlab.serve.batch_cache import BatchCache, check_layers, new_cache
from steerlab.serve.requests import (  # the request-side types, importable from here too
    Completion,
    EngineBusy,
    EngineClosed,
    EngineConfig,
    Event,
    RequestHandle,
    TokenLogprob,
)
from steerlab.serve.sampling import SamplingParams, TextStream, choose_tokens, make_generator
from steerlab.sites import LayerMap, find_layers

__all__ = ["Completion", "Engine", "EngineBusy", "EngineClosed", "EngineConfig", "Event",
           "RequestHandle", "TokenLogprob"]

log = logging.getLogger("steerlab.serve.engine")
SCORE_CHUNK = 512  # prompt positions log-softmaxed at once when a request scores its prompt


@dataclass
class _Row:
    handle: RequestHandle
    prompt_ids: list[int]
    steers: tuple[Steer, ...]
    params: SamplingParams
    stream: TextStream
    generator: torch.Generator | None
    next_token: int = -1
    generated: int = 0
    done: bool = False
    # state controllers carry from one forward pass to the next (S-PID), this request's own
    carry: dict[Any, Any] = field(default_factory=dict)
    # the prompt's scores, sent with the request's first event
    pending_prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def scores_prompt(self) -> bool:
        return self.params.prompt_logprobs is not None


class Engine:
    """Serve generation requests from one model with continuous batching.

    Usage::

        with Engine(lm, EngineConfig(max_batch=16)) as engine:
            h = engine.submit(ids, SamplingParams(max_tokens=32), steers=[Steer(caa, 4.0)])
            print(h.wait().text)

    Args:
        lm: the loaded model (the engine's thread is its only user while it runs).
        config: capacity (:class:`EngineConfig`).
        layers: a precomputed layer map (found if omitted).
    """

    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None, *,
                 layers: LayerMap | None = None) -> None:
        self.lm = lm
        self.config = config or EngineConfig()
        self.layers = layers if layers is not None else find_layers(lm.model)
        params = inspect.signature(lm.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_kw = "logits_to_keep" in params
        self.max_length = _max_length(lm)
        self.eos_ids = _eos_ids(lm)
        pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None else None
        self.pad_id = int(pad) if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self._waiting: deque[_Row] = deque()
        self._active: list[_Row] = []
        self._batch = BatchCache(new_cache(), torch.zeros(0, 0, dtype=torch.long))
        self._cv = threading.Condition()
        # Hugging Face fast tokenizers are Rust objects that raise "Already borrowed" when one
        # thread reconfigures them (padding, truncation) while another decodes: the engine
        # decodes under this lock, and whoever encodes for it (the HTTP app) takes it too.
        self.tokenizer_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._checked_cache = False
        self._ids = itertools.count(1)
        self.counters = {"submitted": 0, "completed": 0, "cancelled": 0, "failed": 0,
                         "rejected": 0, "generated_tokens": 0, "prompt_tokens": 0,
                         "steps": 0, "prefills": 0}

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the engine's thread (idempotent)."""
        with self._cv:
            if self._thread is not None:
                return self
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="steerlab-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread; requests still waiting or running end with finish reason
        ``cancelled``."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cv:
            self._thread = None
            for row in [*self._waiting, *self._active]:
                row.handle._push(Event(finish_reason="cancelled", error="the server shut down"))
            self._waiting.clear()
            self._active = []
            self._batch = BatchCache(new_cache(), torch.zeros(0, 0, dtype=torch.long))

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- submission ----------------------------------------------------------------------------
    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                      steers: Sequence[Steer] = ()) -> None:
        """Validate a request without submitting it (raises :class:`SteerlabError`)."""
        if not prompt_ids:
            raise SteeringError("the prompt is empty")
        vocab = _vocab_size(self.lm)
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise SteeringError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if self.max_length is not None and len(prompt_ids) + params.max_tokens > self.max_length:
            raise SteeringError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                f"exceeds the model's context of {self.max_length} tokens"
            )
        for s in steers:
            if not isinstance(s, Steer):
                raise SteeringError(f"expected Steer objects, got {type(s).__name__}")
            check_compatible(s.controller, self.layers, self.lm.info.model_id)
            s.resolved_scope()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               steers: Sequence[Steer] = (), *, request_id: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request. Raises :class:`EngineBusy` when the waiting queue is full,
        :class:`EngineClosed` when the engine is not running, and
        :class:`~steerlab.errors.SteerlabError` on an invalid request."""
        ids = [int(t) for t in prompt_ids]
        self.check_request(ids, params, steers)
        rid = request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(rid, len(ids), loop)
        row = _Row(
            handle=handle, prompt_ids=ids, steers=tuple(steers), params=params,
            stream=TextStream(self.lm.tokenizer, params.stop),
            generator=None if params.greedy else make_generator(params.seed),
        )
        with self._cv:
            if self._stopping or (self._thread is not None and not self._thread.is_alive()):
                raise EngineClosed("the engine is shut down")
            self._purge_cancelled()
            if len(self._waiting) >= self.config.max_queue:
                self.counters["rejected"] += 1
                raise EngineBusy(
                    f"the server is at capacity ({len(self._active)} running, "
                    f"{len(self._waiting)} waiting); retry later"
                )
            self._waiting.append(row)
            self.counters["submitted"] += 1
            self._cv.notify_all()
        return handle

    def stats(self) -> dict[str, Any]:
        """Running and waiting rows, the batch's cache length and the counters."""
        with self._cv:
            return {"running": len(self._active), "waiting": len(self._waiting),
                    "cache_length": self._batch.length, "max_batch": self.config.max_batch,
                    "max_queue": self.config.max_queue, **self.counters}

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug outside the forward passes: end the running
                log.exception("engine step failed")  # rows, keep serving the queue
                self._fail_rows(self._active, exc, reset=True)

    def step(self) -> bool:
        """Run one step: drop cancelled rows, admit and pre-fill waiting requests, decode one
        token for every running row. Returns whether there was anything to do.

        The engine's thread calls this in a loop; call it yourself only on an engine that
        was not started (deterministic tests and single-threaded use).
        """
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise SteeringError("step() is the engine thread's; this engine is running")
        with self._cv:
            admitted = self._admit()
        if not admitted and not self._active:
            return False
        try:
            self._drop_cancelled()
            # rows that score their prompt need the logits of every prompt position: they are
            # pre-filled apart, so that the others keep computing the last position's only
            self._prefill_guarded([r for r in admitted if not r.scores_prompt])
            self._prefill_guarded([r for r in admitted if r.scores_prompt])
            if self._active:
                try:
                    self._decode()
                except Exception as exc:
                    log.exception("decode step failed")
                    self._fail_rows(self._active, exc, reset=True)
        except Exception as exc:  # outside the forward passes (a cache copy out of memory)
            log.exception("engine step failed")
            self._fail_rows([*admitted, *self._active], exc, reset=True)
        return True

    def _prefill_guarded(self, admitted: list[_Row]) -> None:
        """Pre-fill the admitted rows; a failure fails only the requests that caused it.

        A failed pre-fill touches only its own fresh cache (the merge into the running batch
        is all-or-nothing), so the running rows go on; a group that failed together is
        retried one request at a time, so that only the culprit fails. (A failed decode step
        may have left the shared cache half-updated, so its rows all end: see ``step``.)
        """
        if not admitted:
            return
        try:
            self._prefill(admitted)
            return
        except Exception as exc:
            if len(admitted) == 1:
                log.exception("pre-fill failed")
                self._fail_rows(admitted, exc)
                return
            log.warning("pre-fill of %d requests failed (%s); retrying one by one",
                        len(admitted), exc)
        for row in admitted:
            if row.done or row in self._active:
                continue
            try:
                self._prefill([row])
            except Exception as one:
                log.exception("pre-fill failed")
                self._fail_rows([row], one)

    def _admit(self) -> list[_Row]:
        """Take waiting requests that fit (called with the lock held)."""
        out: list[_Row] = []
        longest = 0
        self._purge_cancelled()
        while self._waiting and len(self._active) + len(out) < self.config.max_batch:
            row = self._waiting[0]
            width = max(longest, len(row.prompt_ids))
            if out and width * (len(out) + 1) > self.config.max_prefill_tokens:
                break
            self._waiting.popleft()
            longest = width
            row.handle.admitted = time.perf_counter()
            out.append(row)
        return out

    def _purge_cancelled(self) -> None:
        """End the waiting requests whose clients went away (called with the lock held), so
        that they hold no place in the queue."""
        if any(r.handle.cancelled for r in self._waiting):
            for r in [r for r in self._waiting if r.handle.cancelled]:
                self._finish(r, Event(finish_reason="cancelled"))
            self._waiting = deque(r for r in self._waiting if not r.done)

    def _drop_cancelled(self) -> None:
        if any(r.handle.cancelled for r in self._active):
            for r in self._active:
                if r.handle.cancelled:
                    self._finish(r, Event(finish_reason="cancelled"))
            self._compact()

    def _forward(self, rows: Sequence[_Row], input_ids: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor, cache: Any, prompt_len: Sequence[int],
                 *, full: bool = False) -> torch.Tensor:
        """The last position's logits ``(B, vocab)`` in float32; with ``full``, the logits
        of every position ``(B, seq, vocab)`` in the model's dtype."""
        model = self.lm.model
        device = self.lm.device
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device), self._cache_kw: cache, "use_cache": True,
        }
        if self._logits_kw and not full:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            if any(r.steers for r in rows):
                ctx = steering(self.lm, rows=[list(r.steers) for r in rows], layers=self.layers,
                               prompt_len=prompt_len, carry=[r.carry for r in rows])
                with ctx:
                    out = model(**kwargs)
            else:
                out = model(**kwargs)
        if full:
            return out.logits
        return out.logits[:, -1, :].float()

    def _prefill(self, rows: list[_Row]) -> None:
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.prompt_ids)
            ids[i, width - n:] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - n:] = 1
        cache = new_cache()
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # padding: any position, masked
        full = any(r.scores_prompt for r in rows)
        logits = self._forward(rows, ids, mask, positions, cache,
                               [len(r.prompt_ids) for r in rows], full=full)
        if full:
            for i, r in enumerate(rows):
                if r.scores_prompt:
                    n = len(r.prompt_ids)
                    self._score_prompt(r, logits[i, width - n:width - 1])
            logits = logits[:, -1, :].float()
        if not self._checked_cache:
            check_layers(cache)
            self._checked_cache = True
        self.counters["prefills"] += 1
        self.counters["prompt_tokens"] += sum(len(r.prompt_ids) for r in rows)
        self._batch.extend(BatchCache(cache, mask.to(self._batch.mask.device)))
        self._active.extend(rows)
        live = [i for i, r in enumerate(rows) if not r.done]
        if live:
            self._advance([rows[i] for i in live], logits[live])
        self._compact()

    def _score_prompt(self, row: _Row, logits: torch.Tensor) -> None:
        """The prompt tokens' log-probabilities from the logits of the positions before them
        (``(n - 1, vocab)``), in chunks of positions (one float32 log-softmax at a time)."""
        ids = row.prompt_ids
        k = row.params.prompt_logprobs or 0
        out = [TokenLogprob(ids[0], None)]
        target = torch.tensor(ids[1:], dtype=torch.long, device=logits.device)
        for start in range(0, len(ids) - 1, SCORE_CHUNK):
            x = logits[start:start + SCORE_CHUNK].float()
            if not bool(torch.isfinite(x).all()):
                self._finish(row, Event(finish_reason="error", error=(
                    "the model produced non-finite logits on the prompt; lower the steering "
                    "strength")), failed=True)
                return
            lp = torch.log_softmax(x, dim=-1)
            chosen = lp.gather(1, target[start:start + len(x), None])[:, 0].tolist()
            if k:
                values, indices = lp.topk(min(k, lp.shape[-1]), dim=-1)
                tops = [tuple(zip(i, v, strict=True))
                        for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
            else:
                tops = [()] * len(chosen)
            out.extend(TokenLogprob(t, c, top) for t, c, top in
                       zip(ids[start + 1:start + 1 + len(x)], chosen, tops, strict=True))
        row.pending_prompt_logprobs = out

    def _decode(self) -> None:
        rows = self._active
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long)
        self._batch.append_step()
        logits = self._forward(rows, ids, self._batch.mask, self._batch.next_positions(),
                               self._batch.cache, [len(r.prompt_ids) for r in rows])
        self.counters["steps"] += 1
        self._advance(rows, logits)
        self._compact()

    def _advance(self, rows: Sequence[_Row], logits: torch.Tensor) -> None:
        """Sample each row's next token, stream it, and finish the rows that are done."""
        tokens = choose_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
        entries = _token_logprobs(logits, rows, tokens)
        with self.tokenizer_lock:
            self._emit(rows, tokens, entries)

    def _emit(self, rows: Sequence[_Row], tokens: Sequence[int | None],
              entries: Sequence[TokenLogprob | None] | None = None) -> None:
        entries = entries if entries is not None else [None] * len(rows)
        for r, token, entry in zip(rows, tokens, entries, strict=True):
            lps = [entry] if entry is not None else []
            if r.params.max_tokens == 0:  # the prompt scored, nothing to generate
                self._finish(r, Event(finish_reason="length"))
                continue
            if token is None:
                self._finish(r, Event(finish_reason="error", error=(
                    f"the model produced non-finite logits after {r.generated} tokens; lower "
                    f"the steering strength")), failed=True)
                continue
            if token in self.eos_ids and not r.params.ignore_eos:
                self._finish(r, Event(text=r.stream.finish(), finish_reason="stop",
                                      logprobs=lps))
                continue
            delta = r.stream.push(token)
            r.generated += 1
            self.counters["generated_tokens"] += 1
            length = len(r.prompt_ids) + r.generated
            if r.stream.stopped:
                self._finish(r, Event(text=delta, token_ids=[token], finish_reason="stop",
                                      logprobs=lps))
            elif r.generated >= r.params.max_tokens or (
                    self.max_length is not None and length >= self.max_length):
                self._finish(r, Event(text=delta + r.stream.finish(), token_ids=[token],
                                      finish_reason="length", logprobs=lps))
            else:
                r.next_token = token
                self._send(r, Event(text=delta, token_ids=[token], logprobs=lps))

    def _send(self, row: _Row, event: Event) -> None:
        if row.pending_prompt_logprobs is not None:  # the first event carries the prompt's
            event.prompt_logprobs, row.pending_prompt_logprobs = (
                row.pending_prompt_logprobs, None)
        row.handle._push(event)

    def _finish(self, row: _Row, event: Event, *, failed: bool = False) -> None:
        row.done = True
        key = ("failed" if failed else "cancelled" if event.finish_reason == "cancelled"
               else "completed")
        self.counters[key] += 1
        self._send(row, event)

    def _compact(self) -> None:
        keep = [i for i, r in enumerate(self._active) if not r.done]
        if len(keep) != len(self._active):
            self._batch.select(keep)
            self._active = [self._active[i] for i in keep]

    def _fail_rows(self, rows: Sequence[_Row], exc: Exception, *, reset: bool = False) -> None:
        message = str(exc) if isinstance(exc, SteerlabError) else (
            f"generation failed: {type(exc).__name__}: {exc}")
        for r in list(rows):
            if not r.done:
                self._finish(r, Event(finish_reason="error", error=message), failed=True)
        if reset:
            self._active = []
            self._batch = BatchCache(new_cache(), torch.zeros(0, 0, dtype=torch.long))
        else:
            self._compact()


def _token_logprobs(logits: torch.Tensor, rows: Sequence[_Row],
                    tokens: Sequence[int | None]) -> list[TokenLogprob | None]:
    """The chosen tokens' log-probabilities and top alternatives, for the rows that asked."""
    out: list[TokenLogprob | None] = [None] * len(rows)
    want = [i for i, (r, t) in enumerate(zip(rows, tokens, strict=True))
            if r.params.logprobs is not None and t is not None and r.params.max_tokens > 0]
    if not want:
        return out
    lp = torch.log_softmax(logits[want].float(), dim=-1)
    k = min(max(rows[i].params.logprobs or 0 for i in want), lp.shape[-1])
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in want], device=lp.device))
    chosen_l = chosen[:, 0].tolist()
    if k:
        values, indices = lp.topk(k, dim=-1)
        values_l, indices_l = values.tolist(), indices.tolist()
    for j, i in enumerate(want):
        n = rows[i].params.logprobs or 0
        top = tuple(zip(indices_l[j][:n], values_l[j][:n], strict=True)) if n else ()
        token = tokens[i]
        assert token is not None
        out[i] = TokenLogprob(token, chosen_l[j], top)
    return out


def _eos_ids(lm: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(lm.model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, list | tuple):
        ids.update(int(v) for v in value)
    tok_eos = getattr(lm.tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        ids.add(tok_eos)
    return frozenset(ids)


def _max_length(lm: LoadedModel) -> int | None:
    config = lm.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _vocab_size(lm: LoadedModel) -> int:
    emb = lm.model.get_input_embeddings()
    return int(emb.weight.shape[0])
