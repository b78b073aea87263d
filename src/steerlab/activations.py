"""Batched activation collection at chosen sites and token positions, with an on-disk cache.

A sample is a rendered prompt text plus an optional completion; the model reads
``prompt + completion``. The position picks which token's activation is kept:

* ``Position.last()``: the last real token of the text (the last prompt token when there is
  no completion);
* ``Position.index(i)``: the i-th real token (negative counts from the end; CAA's -2);
* ``Position.answer_letter()``: the token that holds the first letter or digit of the
  completion (the "A" of CAA's "(A)", wherever the tokenizer splits it);
* ``Position.completion_mean()``: the mean over the completion's tokens.

Left padding is handled (positions count real tokens only, and the model is given position
ids that skip the padding); outputs are float32 ``(N, width)``
tensors keyed by :class:`~steerlab.sites.Site`. The forward pass stops after the deepest
block that is needed, so collection costs at most one forward pass. Results are cached in
``$STEERLAB_CACHE/activations`` under a key made of the model's fingerprint, the texts, the
sites and the position; the cache file is written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from steerlab.errors import DataError, SteerlabError
from steerlab.hooks import HookSet, at_site, at_sites, post_hook
from steerlab.models import LoadedModel, cache_root
from steerlab.sites import LayerMap, Site, find_layers, hook_is_pre

PositionKind = Literal["last", "index", "answer_letter", "completion_mean"]


@dataclass(frozen=True)
class Position:
    """Which token of each sample to read; see the module docstring."""

    kind: PositionKind
    index: int = -1

    @classmethod
    def last(cls) -> Position:
        return cls("last")

    @classmethod
    def at(cls, index: int) -> Position:
        return cls("index", index)

    @classmethod
    def answer_letter(cls) -> Position:
        return cls("answer_letter")

    @classmethod
    def completion_mean(cls) -> Position:
        return cls("completion_mean")

    def __str__(self) -> str:
        return f"index:{self.index}" if self.kind == "index" else self.kind


@dataclass(frozen=True)
class Sample:
    """A rendered prompt and an optional completion appended to it."""

    prompt: str
    completion: str = ""

    @property
    def text(self) -> str:
        return self.prompt + self.completion


class _StopForward(Exception):
    """Raised inside a hook once every needed site has been read."""


def model_fingerprint(lm: LoadedModel) -> str:
    """A short hash of the model id, shape and a sample of its weights."""
    h = hashlib.sha256(json.dumps(lm.info.as_dict(), sort_keys=True).encode())
    params = list(lm.model.parameters())
    for p in (params[0], params[len(params) // 2], params[-1]):
        flat = p.detach().reshape(-1)[:4096].to(torch.float32).cpu()
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]


def _token_spans(
    lm: LoadedModel, samples: Sequence[Sample], add_special: bool
) -> list[tuple[list[int], int, int]]:
    """Per sample: token ids, index of the first completion token, index of the answer letter."""
    tok = lm.tokenizer
    out: list[tuple[list[int], int, int]] = []
    fast = bool(getattr(tok, "is_fast", False))
    for s in samples:
        if fast:
            enc = tok(s.text, add_special_tokens=add_special, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            offsets = [tuple(o) for o in enc["offset_mapping"]]
            cut = len(s.prompt)
            first = next(
                (i for i, (a, b) in enumerate(offsets) if b > cut and b > a), len(ids)
            )
            letter_char = next(
                (cut + k for k, ch in enumerate(s.completion) if ch.isalnum()), None
            )
            letter = -1
            if letter_char is not None:
                letter = next(
                    (i for i, (a, b) in enumerate(offsets) if a <= letter_char < b), -1
                )
        else:
            ids = list(tok(s.text, add_special_tokens=add_special)["input_ids"])
            n_prompt = len(tok(s.prompt, add_special_tokens=add_special)["input_ids"])
            first, letter = min(n_prompt, len(ids)), min(n_prompt, len(ids) - 1)
        out.append((ids, first, letter))
    return out


def _select_index(kind: Position, n: int, first: int, letter: int, i: int) -> tuple[int, int]:
    """(start, end) range of token indices (within the real tokens) to average."""
    if kind.kind == "last":
        return n - 1, n
    if kind.kind == "index":
        j = kind.index + n if kind.index < 0 else kind.index
        if not 0 <= j < n:
            raise DataError(f"sample {i}: token index {kind.index} is outside its {n} tokens")
        return j, j + 1
    if kind.kind == "answer_letter":
        if letter < 0:
            raise DataError(
                f"sample {i}: its completion has no letter or digit to read (answer_letter "
                f"position); use Position.last() or check the data"
            )
        return letter, letter + 1
    if first >= n:
        raise DataError(
            f"sample {i} has an empty completion; completion_mean needs completion tokens"
        )
    return first, n


def collect(
    lm: LoadedModel,
    samples: Sequence[Sample | str],
    sites: Sequence[Site | str],
    position: Position | None = None,
    *,
    batch_size: int = 16,
    rendered: bool = True,
    cache: bool | str | os.PathLike[str] = True,
    progress: bool = True,
    desc: str = "collecting activations",
) -> dict[Site, torch.Tensor]:
    """Run the model on ``samples`` and return float32 activations at ``sites``.

    Args:
        lm: the model.
        samples: :class:`Sample` objects (prompt + completion) or plain strings.
        sites: sites to read, e.g. ``["resid_post.12"]``.
        position: which token to keep (default: the last one).
        batch_size: rows per forward pass.
        rendered: whether the texts come from a chat template, which holds its own special
            tokens (then the tokenizer adds none).
        cache: True for the default cache folder, a folder path, or False.
        progress: show a progress bar.
    """
    position = position or Position.last()
    items = [s if isinstance(s, Sample) else Sample(str(s)) for s in samples]
    if not items:
        raise DataError("no samples to collect activations from")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    layers = find_layers(lm.model)
    resolved = sorted({layers.resolve(s) for s in sites})
    if not resolved:
        raise DataError("no sites given to collect from")
    add_special = not (rendered and lm.info.is_chat)

    cache_path: Path | None = None
    if cache is not False:
        folder = cache_root() / "activations" if cache is True else Path(cache)
        key = hashlib.sha256(
            json.dumps(
                {
                    "model": model_fingerprint(lm),
                    "texts": [[s.prompt, s.completion] for s in items],
                    "sites": [str(s) for s in resolved],
                    "position": str(position),
                    "add_special": add_special,
                    "v": 1,
                }
            ).encode()
        ).hexdigest()[:24]
        cache_path = folder / f"{key}.safetensors"
        if cache_path.is_file():
            try:
                stored = load_file(str(cache_path))
                return {s: stored[str(s)] for s in resolved}
            except Exception:  # a corrupt cache entry is recomputed, never trusted
                cache_path.unlink(missing_ok=True)

    spans = _token_spans(lm, items, add_special)
    result = _run(lm, layers, spans, resolved, position, batch_size, progress, desc)
    for site, t in result.items():
        if not bool(torch.isfinite(t).all()):
            raise SteerlabError(
                f"activations at {site} contain NaN or inf; load the model in float32 "
                f"(dtype='float32') or check its weights"
            )
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({str(k): v.contiguous() for k, v in result.items()}, tmp)
            os.replace(tmp, cache_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return result


def _run(
    lm: LoadedModel,
    layers: LayerMap,
    spans: list[tuple[list[int], int, int]],
    sites: list[Site],
    position: Position,
    batch_size: int,
    progress: bool,
    desc: str,
) -> dict[Site, torch.Tensor]:
    model = lm.model
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    device = lm.device
    widths = {s: layers.width(s) for s in sites}
    out = {s: torch.empty(len(spans), widths[s], dtype=torch.float32) for s in sites}
    # The deepest block whose output we need; the forward stops after it.
    deepest = max(s.layer for s in sites)
    stop_site = Site("resid_post", deepest)
    state: dict[str, Any] = {}
    # Left padding must not shift positions: give the model position ids counted over the
    # real tokens (as transformers' generate does), or models with absolute position
    # embeddings (GPT-2) would see a padded row at other positions than the row alone.
    accepts_position_ids = "position_ids" in inspect.signature(model.forward).parameters

    def record(site: Site, h: torch.Tensor) -> None:
        sel: torch.Tensor = state["select"]  # (batch, seq) float weights
        vals = torch.einsum("bt,btd->bd", sel.to(h.dtype), h).to(torch.float32)
        out[site][state["rows"]] = vals.cpu()

    def stop(mod: Any, args: Any, output: Any) -> None:
        raise _StopForward

    # reads first, so that a read at the stop site's output runs before the stop
    hooks = at_sites(layers, {site: functools.partial(record, site) for site in sites})
    hooks.append(post_hook(layers.module(stop_site), stop))
    with HookSet(hooks):
        starts = range(0, len(spans), batch_size)
        iterator: Any = starts
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(starts, desc=desc, unit="batch", leave=False)
        for start in iterator:
            chunk = spans[start : start + batch_size]
            length = max(len(ids) for ids, _, _ in chunk)
            ids_t = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            select = torch.zeros((len(chunk), length), dtype=torch.float32)
            for r, (ids, first, letter) in enumerate(chunk):
                n = len(ids)
                pad = length - n
                ids_t[r, pad:] = torch.tensor(ids, dtype=torch.long)
                mask[r, pad:] = 1
                a, b = _select_index(position, n, first, letter, start + r)
                select[r, pad + a : pad + b] = 1.0 / (b - a)
            state["select"] = select.to(device)
            state["rows"] = slice(start, start + len(chunk))
            extra: dict[str, torch.Tensor] = {}
            if accepts_position_ids:
                extra["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0).to(device)
            try:
                with torch.no_grad():
                    model(input_ids=ids_t.to(device), attention_mask=mask.to(device),
                          use_cache=False, **extra)
            except _StopForward:
                pass
    return out


def token_activations(
    lm: LoadedModel, text: str, site: Site | str, *, rendered: bool = False
) -> torch.Tensor:
    """Every token's float32 activation at one site for one text: ``(n_tokens, width)``."""
    layers = find_layers(lm.model)
    s = layers.resolve(site)
    add_special = not (rendered and lm.info.is_chat)
    ids = lm.tokenizer(text, add_special_tokens=add_special, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise DataError(f"{text!r} has no tokens")
    got: dict[str, torch.Tensor] = {}
    # a block output is the last thing needed: the forward stops there
    stop = not hook_is_pre(s)

    def read(h: torch.Tensor) -> None:
        got["h"] = h
        if stop:
            raise _StopForward

    try:
        with HookSet([at_site(layers, s, read)]), torch.no_grad():
            lm.model(input_ids=ids.to(lm.device), use_cache=False)
    except _StopForward:
        pass
    return got["h"][0].to(torch.float32).cpu()
