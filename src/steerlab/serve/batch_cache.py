"""A left-padded KV cache for a batch whose rows come and go (continuous batching).

Every row of the running batch shares one :class:`transformers.DynamicCache` of length ``S``
and one ``(B, S)`` attention mask; row ``r`` holds its real tokens at the right and ``0``s
(padding) at the left, exactly the layout of a left-padded ``generate`` batch. Rows join by
padding the shorter of the two caches on the left and concatenating along the batch; rows
leave by index selection; columns that are padding in every remaining row are trimmed from
the left. Padding shifts no position (the runtime and the model's position ids count real
tokens only) and attention masks it out, so a row computes the same thing wherever it sits.

The cache is created *without* the model's config, so every layer is a plain full-length
``DynamicLayer``: sliding-window models then keep their whole history (their masks still
apply the window), which keeps the layout uniform across layers at some memory cost. Models
whose cache holds anything else (linear-attention or other recurrent state) cannot be
re-batched this way; :func:`check_layers` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from steerlab.errors import SteeringError


def new_cache() -> DynamicCache:
    """An empty cache whose every layer is a full-length ``DynamicLayer``."""
    return DynamicCache()


def check_layers(cache: DynamicCache) -> None:
    """Fail clearly when a cache holds layers the batch operations cannot re-batch."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise SteeringError(
                f"cache layer {i} is a {type(layer).__name__}; continuous batching needs plain "
                f"key/value layers (this model keeps recurrent or sliding state)"
            )


def _layers(cache: DynamicCache) -> list[Any]:
    """The layers holding key/value tensors (others are uninitialised or KV-sharing)."""
    out: list[Any] = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if getattr(layer, "is_initialized", False) and keys is not None and keys.numel() > 0:
            out.append(layer)
    return out


@dataclass
class BatchCache:
    """The running batch's cache and its ``(B, S)`` long attention mask (1 = real token)."""

    cache: DynamicCache
    mask: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def pad_left(self, n: int) -> None:
        """Prepend ``n`` padding columns to every row."""
        if n <= 0:
            return
        for layer in _layers(self.cache):
            layer.keys = F.pad(layer.keys, (0, 0, n, 0))
            layer.values = F.pad(layer.values, (0, 0, n, 0))
        self.mask = F.pad(self.mask, (n, 0))

    def extend(self, other: BatchCache) -> None:
        """Append ``other``'s rows after this batch's rows (``other`` is consumed)."""
        if self.rows == 0:
            self.cache, self.mask = other.cache, other.mask
            return
        mine, theirs = _layers(self.cache), _layers(other.cache)
        if len(mine) != len(theirs):
            raise SteeringError(
                f"cannot merge caches with {len(mine)} and {len(theirs)} filled layers"
            )
        width = max(self.length, other.length)
        pa, pb = width - self.length, width - other.length

        def join(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([F.pad(a, (0, 0, pa, 0)), F.pad(b, (0, 0, pb, 0))], dim=0)

        # all new tensors first, then swap them in: a failure (out of memory) leaves this
        # batch as it was
        merged = [(join(a.keys, b.keys), join(a.values, b.values))
                  for a, b in zip(mine, theirs, strict=True)]
        mask = torch.cat([F.pad(self.mask, (pa, 0)), F.pad(other.mask, (pb, 0))], dim=0)
        for layer, (keys, values) in zip(mine, merged, strict=True):
            layer.keys, layer.values = keys, values
        self.mask = mask

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (in that order), then trim all-padding columns."""
        if len(keep) == self.rows and list(keep) == list(range(self.rows)):
            return
        if not keep:
            self.cache, self.mask = new_cache(), self.mask[:0]
            return
        idx = torch.tensor(list(keep), dtype=torch.long)
        for layer in _layers(self.cache):
            on = idx.to(layer.keys.device)
            layer.keys = layer.keys.index_select(0, on)
            layer.values = layer.values.index_select(0, on)
        self.mask = self.mask.index_select(0, idx.to(self.mask.device))
        self.trim()

    def trim(self) -> None:
        """Drop the leading columns that are padding in every row."""
        if self.rows == 0:
            return
        real_cols = self.mask.any(dim=0).nonzero()
        first = int(real_cols[0]) if real_cols.numel() else self.length
        if first == 0:
            return
        for layer in _layers(self.cache):
            layer.keys = layer.keys[:, :, first:, :]
            layer.values = layer.values[:, :, first:, :]
        self.mask = self.mask[:, first:]

    def append_step(self) -> None:
        """Extend the mask by one real column for the token every row is about to feed."""
        self.mask = F.pad(self.mask, (0, 1), value=1)

    def next_positions(self) -> torch.Tensor:
        """``(B, 1)`` position ids of the token each row feeds next (its real-token count)."""
        return self.mask.sum(dim=1, keepdim=True) - 1
