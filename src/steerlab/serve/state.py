"""The server's configuration and the state its routes share.

:class:`ServerConfig` holds the limits and options; :class:`ServerState` the model, the
engine, the controllers and the app's own copy of the tokenizer, and prepares requests: it
checks counts and sizes before any tokenization, tokenizes (the routes call those methods in
a worker thread), decodes token texts for log-probabilities and submits choices to the
engine, each failure raised as an :class:`~steerlab.serve.errors.APIError`.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from steerlab.errors import SteeringError, SteerlabError
from steerlab.models import LoadedModel
from steerlab.runtime import Steer
from steerlab.serve.engine import Engine, EngineBusy, EngineClosed, EngineConfig, RequestHandle
from steerlab.serve.errors import APIError
from steerlab.serve.protocol import ChatRequest, CompletionRequest
from steerlab.serve.registry import ControllerRegistry, SteeringSpec
from steerlab.serve.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 256
OPENAI_COMPLETION_DEFAULT = 16  # legacy completions without max_tokens, as OpenAI


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



class ServerState:
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
        """The checks both endpoints share (model, unsupported options); the request's
        steering, resolved."""
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
        """At most ``max_n`` choices (prompts times ``n``) per request."""
        if prompts * n > self.config.max_n:
            raise APIError(400, f"{prompts} prompt(s) x n={n} choices is over this "
                                f"server's limit of {self.config.max_n} per request", param="n")

    def check_chars(self, chars: int, what: str = "the prompt") -> None:
        """No more characters than ``max_prompt_tokens`` tokens can hold."""
        if chars > self.max_prompt_chars:
            limit = self.config.max_prompt_tokens
            raise APIError(400, f"{what} has {chars} characters, more than {limit} tokens can "
                                f"hold; this server accepts at most {limit} tokens",
                           param="prompt", code="context_length_exceeded")

    def check_completion_sizes(self, req: CompletionRequest) -> None:
        """A legacy completion's counts and prompt lengths, before tokenization."""
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
        """A chat request's counts and message lengths, before rendering."""
        self.check_count(1, req.n)
        if len(req.messages) > self.config.max_prompt_tokens:
            raise APIError(400, f"{len(req.messages)} messages is more than this server's "
                                f"{self.config.max_prompt_tokens} prompt tokens can hold",
                           param="messages", code="context_length_exceeded")
        self.check_chars(sum(len(m.text()) for m in req.messages), "the messages' text")

    # -- tokenization (in a worker thread) -----------------------------------------------------
    def encode_completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """A legacy completion's prompts as token ids (text gets the special tokens)."""
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
        """The chat messages rendered with the model's chat template, as token ids."""
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
        """Every prompt has tokens, and no more than ``max_prompt_tokens``."""
        for p in prompts:
            if not p:
                raise APIError(400, "a prompt is empty (no tokens)", param="prompt")
            if len(p) > self.config.max_prompt_tokens:
                raise APIError(400, f"the prompt has {len(p)} tokens; this server accepts at "
                                    f"most {self.config.max_prompt_tokens}",
                               param="prompt", code="context_length_exceeded")

    def max_tokens(self, asked: int | None, prompts: Sequence[Sequence[int]]) -> int:
        """The ``max_tokens`` to run: the default cap when none is asked for, else what
        was asked, within the server's limit and the model's context."""
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
        """Submit ``n`` choices of each prompt (seeds ``seed``, ``seed + 1``, ...); none
        stays submitted if one is refused."""
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
