"""One memo for learned state converted for the run time.

Learned tensors are kept in float32 on the CPU; at a write the runtime needs them in the
activation's dtype and on its device. A controller converts them once per key (typically
``(site, dtype, device)``, or just the device for state that is moved as a whole) and keeps
the result in a plain dict, its :data:`CastCache`; fitting or loading new state clears it
(``cache.clear()``, or assigning a new ``{}``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, MutableMapping
from typing import TypeAlias, TypeVar

import torch

T = TypeVar("T")

CastCache: TypeAlias = dict[Hashable, T]


def cached(cache: MutableMapping[Hashable, T], key: Hashable, make: Callable[[], T]) -> T:
    """The value stored under ``key`` in ``cache``, made by ``make()`` (and stored) on first
    use; ``make`` may raise, and then nothing is stored."""
    try:
        return cache[key]
    except KeyError:
        value = make()
        cache[key] = value
        return value


def cast_like(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``t`` in ``h``'s dtype and on its device."""
    return t.to(device=h.device, dtype=h.dtype)
