"""Per-row sampling and streamed detokenization for the serving engine.

Each row of a batch samples on its own: greedy rows take the arg-max; sampled rows apply
their temperature and nucleus (top-p) cut-off and draw with their own seeded
``torch.Generator``, so a row's tokens never depend on which rows share its batch.

:class:`TextStream` turns a row's token ids into text deltas for streaming: it holds back an
incomplete UTF-8 character (the tokenizer decodes it as U+FFFD) and any tail that could still
grow into a stop string, and cuts the text at the first stop string (which is not returned,
as in the OpenAI API).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerlab.errors import SteeringError

_REPLACEMENT = "\ufffd"
GREEDY_BELOW = 1e-5  # temperatures below this decode greedily


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    Args:
        max_tokens: tokens to generate at most (finish reason ``length``).
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling mass in (0, 1].
        seed: seed of the row's generator (sampled rows); ``None`` draws one.
        stop: strings that end generation (not included in the output).
        ignore_eos: keep generating past end-of-sequence tokens.
        logprobs: report each generated token's log-probability with this many most likely
            alternatives (0: the chosen token's alone); ``None``: no log-probabilities.
        prompt_logprobs: also score the prompt's tokens (each given the ones before it; the
            first has none), with this many alternatives; ``None``: no prompt scoring. With
            it, ``max_tokens`` may be 0 (score the prompt, generate nothing).

    Log-probabilities are those of the (steered) model's distribution, a log-softmax of its
    logits before temperature and top-p, as vLLM reports them by default.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise SteeringError(f"{name} must be None or an integer >= 0, got {value!r}")
        least = 0 if self.prompt_logprobs is not None else 1
        if (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                or self.max_tokens < least):
            raise SteeringError(f"max_tokens must be a positive integer (0 only when scoring "
                                f"the prompt), got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SteeringError(f"temperature must be >= 0, got {self.temperature!r}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise SteeringError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SteeringError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small that dividing logits by it would overflow."""
        return self.temperature < GREEDY_BELOW


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) % (2**63))
    return g


def sample_row(logits: torch.Tensor, params: SamplingParams,
               generator: torch.Generator) -> int:
    """One token from a row's ``(vocab,)`` logits with temperature and top-p."""
    x = logits.detach().to("cpu", torch.float32) / params.temperature
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_p, dim=-1)
        # keep the smallest prefix whose mass reaches top_p, and always the most likely token
        # (a tiny top_p such as 1e-300 rounds to 0 in float32 and would drop them all)
        drop = cumulative - sorted_p >= params.top_p
        drop[0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise SteeringError("the model produced non-finite logits (is the strength too large?)")
    return int(torch.multinomial(probs, 1, generator=generator))


def choose_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None]) -> list[int | None]:
    """The next token of every row of ``(B, vocab)`` logits; ``None`` where they are not
    finite (the caller fails that row alone)."""
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    greedy = logits.argmax(dim=-1).tolist()
    out: list[int | None] = []
    for r, p in enumerate(params):
        if not finite[r]:
            out.append(None)
        elif p.greedy:
            out.append(int(greedy[r]))
        else:
            gen = generators[r]
            assert gen is not None
            try:
                out.append(sample_row(logits[r], p, gen))
            except SteeringError:
                out.append(None)
    return out


@dataclass
class TextStream:
    """Incremental text of one row's generated tokens, with stop strings."""

    tokenizer: Any
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the text released so far
    stopped: bool = False

    def _decode(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def push(self, token: int) -> str:
        """Add a token; return the newly releasable text (sets ``stopped`` at a stop string)."""
        self.ids.append(token)
        full = self._decode()
        if self.stop:
            cut = self._find_stop(full)
            if cut is not None:
                self.stopped = True
                return self._release(full[:cut])
        # an incomplete character (U+FFFD for now) waits, and so does any tail that could
        # still grow into a stop string (checked on the text before that character)
        base = full.rstrip(_REPLACEMENT)
        return self._release(base[: len(base) - self._stop_prefix(base)])

    def finish(self) -> str:
        """The text still held back, released at the end of generation."""
        if self.stopped:
            return ""
        return self._release(self._decode())

    def _release(self, upto: str) -> str:
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta

    def _find_stop(self, full: str) -> int | None:
        # search only where a stop string could newly end: from just before the released text
        longest = max(len(s) for s in self.stop)
        start = max(0, len(self.text) - longest)
        hits = [i for s in self.stop if (i := full.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _stop_prefix(self, full: str) -> int:
        """Length of the longest tail of ``full`` that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:k]):
                    best = k
                    break
        return best
