"""Activation sources for SAE training and evaluation: one (N, d) tensor, a re-iterable of
(n, d) chunks, or a callable returning a fresh iterable, read chunk by chunk and validated; and
streaming moments (count, mean, centred sum of squares) over them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from steerlab.errors import DataError

# An activation source: one (N, d) tensor, a re-iterable of such chunks (a list, or
# steerlab.corpus.ActivationShards), or a callable returning a fresh iterable of chunks.
Activations = torch.Tensor | Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]

_STAT_ROWS = 65536  # rows per float64 block in the statistics pass


def _reader(activations: Activations, name: str) -> Callable[[], Iterator[torch.Tensor]]:
    """A function giving a fresh iterator over the raw chunks of ``activations``."""
    if isinstance(activations, torch.Tensor):
        tensor = activations
        return lambda: iter((tensor,))
    if callable(activations):
        fn = activations

        def call() -> Iterator[torch.Tensor]:
            got = fn()
            if isinstance(got, torch.Tensor):
                return iter((got,))
            try:
                return iter(got)
            except TypeError as exc:
                raise DataError(f"the {name} callable must return an iterable of tensors, "
                                f"got {type(got).__name__}") from exc
        return call
    try:
        first = iter(activations)
    except TypeError as exc:
        raise DataError(f"{name} must be an (N, d) tensor, an iterable of (n, d) chunks or a "
                        f"callable returning one, got {type(activations).__name__}") from exc
    if first is activations:
        raise DataError(f"{name} is a one-shot iterator, but it is read several times; pass "
                        f"a list of chunks or a callable returning a fresh iterator")
    src = activations
    return lambda: iter(src)


def _chunks(read: Callable[[], Iterator[torch.Tensor]], d_in: int,
            name: str) -> Iterator[torch.Tensor]:
    """Validated (n, d_in) chunks, empty ones skipped."""
    for i, chunk in enumerate(read()):
        where = f"{name} chunk {i}"
        if not isinstance(chunk, torch.Tensor):
            raise DataError(f"{where} is a {type(chunk).__name__}, not a tensor")
        if chunk.ndim < 2:
            raise DataError(f"{where} must have shape (N, {d_in}), got {tuple(chunk.shape)}")
        if chunk.shape[-1] != d_in:
            raise DataError(f"{where} has width {chunk.shape[-1]} but the SAE reads d_in = "
                            f"{d_in}")
        if not chunk.is_floating_point():
            raise DataError(f"{where} must be a floating-point tensor, got {chunk.dtype}")
        rows = chunk.reshape(-1, d_in)
        if rows.shape[0] == 0:
            continue
        for s in range(0, rows.shape[0], _STAT_ROWS):
            if not bool(torch.isfinite(rows[s:s + _STAT_ROWS]).all()):
                raise DataError(f"{where} has non-finite values (NaN or inf)")
        yield rows


@dataclass
class _Moments:
    """Streaming count, mean and centred sum of squares (Chan et al.'s pairwise update)."""

    n: int = 0
    mean: torch.Tensor | None = None  # float64 (d,)
    m2: float = 0.0  # Σ‖x − mean‖²

    def add(self, x: torch.Tensor) -> None:
        for s in range(0, x.shape[0], _STAT_ROWS):
            b = x[s:s + _STAT_ROWS].to(torch.float64)
            nb = b.shape[0]
            mb = b.mean(0)
            m2b = float(((b - mb) ** 2).sum())
            if self.mean is None:
                self.n, self.mean, self.m2 = nb, mb, m2b
                continue
            n = self.n + nb
            delta = mb - self.mean.to(mb.device)
            self.m2 += m2b + float((delta ** 2).sum()) * self.n * nb / n
            self.mean = self.mean.to(mb.device) + delta * (nb / n)
            self.n = n


__all__ = ["Activations"]
