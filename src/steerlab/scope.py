"""Token scopes: which positions of a sequence a controller steers, in absolute coordinates.

Positions count the real (non-padding) tokens of a row from 0; left padding has position -1
and is never steered. ``prompt_len`` is the number of real tokens of the row's prompt (the
input of the first forward pass of a steering context). Because every scope is a predicate on
absolute positions, a chunked prefill, a KV-cached decode step and a full re-computation
without cache all steer the same tokens, so greedy generation gives the same output with and
without KV cache.

==================  ===============================================================
scope               steers positions ``p`` with
==================  ===============================================================
``last``            ``p >= prompt_len - 1``: the last prompt token, then each
                    generated token (the last position of each cached forward pass)
``all``             ``p >= 0``: every real token
``generated``       ``p >= prompt_len``: generated tokens only
``from:P``          ``p >= P`` (``P >= 0``), or ``p >= prompt_len + P`` for ``P < 0``
                    (CAA's "from the end of the instruction" is ``from:-1``)
==================  ===============================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from steerlab.errors import SteeringError

ScopeKind = Literal["last", "all", "generated", "from"]
MAX_START = 2**31 - 1  # positions are int64 tensors; no context comes near this


@dataclass(frozen=True)
class TokenScope:
    """A token scope; build one with :func:`parse_scope` or the constants below."""

    kind: ScopeKind
    start: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("last", "all", "generated", "from"):
            raise SteeringError(
                f"unknown token scope {self.kind!r}; use last, all, generated or from:P"
            )
        if not isinstance(self.start, int) or abs(self.start) > MAX_START:
            raise SteeringError(
                f"scope position {self.start!r} is out of range (|P| <= {MAX_START})"
            )

    def __str__(self) -> str:
        return f"from:{self.start}" if self.kind == "from" else self.kind

    def mask(self, positions: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
        """Boolean ``(batch, seq)`` mask of the steered positions.

        Args:
            positions: ``(batch, seq)`` absolute positions, -1 for padding.
            prompt_len: ``(batch,)`` real prompt length of each row.
        """
        real = positions >= 0
        pl = prompt_len.to(positions.device)[:, None]
        if self.kind == "all":
            return real
        if self.kind == "last":
            return real & (positions >= pl - 1)
        if self.kind == "generated":
            return real & (positions >= pl)
        if self.start >= 0:
            return real & (positions >= self.start)
        return real & (positions >= pl + self.start)


LAST = TokenScope("last")
ALL = TokenScope("all")
GENERATED = TokenScope("generated")


def parse_scope(text: str | TokenScope) -> TokenScope:
    """Parse ``last``, ``all``, ``generated`` or ``from:P``."""
    if isinstance(text, TokenScope):
        return text
    t = text.strip().lower()
    if t in ("last", "all", "generated"):
        return TokenScope(t)  # type: ignore[arg-type]
    if t.startswith("from:"):
        try:
            start = int(t[5:])
        except ValueError:
            start = None
        if start is not None:
            return TokenScope("from", start)  # checks the range
    raise SteeringError(
        f"unknown token scope {text!r}; use last, all, generated or from:P (P an integer)"
    )
