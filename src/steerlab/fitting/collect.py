"""The one positive/negative collection path: render a data set, run it through the model
and read the activations a :class:`~steerlab.methods.reading.Reading` asks for.

A contrastive set gives prompt + positive / prompt + negative completion (rendered with the
chat template), read at the recipe's position, rows paired; a labelled set gives its texts as
they are (label 1 positive, 0 negative), read at the last token. Everything a method collects
(CAA's class activations, the LFS family's block inputs, ODESteer's last tokens, ITI's head
outputs and tuning rows, ActAdd's prompt pair) goes through :func:`class_activations` or
:func:`collect_reading`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import torch

from steerlab.activations import Position, Sample, collect, token_activations
from steerlab.data import ContrastiveSet, LabeledSet, Renderer
from steerlab.errors import DataError
from steerlab.methods.lfs import jacobian_texts as jacobian_texts
from steerlab.methods.reading import Classes, Collected, Reading, concept_sets
from steerlab.models import LoadedModel
from steerlab.sites import Site

_RECIPE_POSITION = {
    "ab": Position.answer_letter(),
    "last": Position.last(),
    "mean": Position.completion_mean(),
}

_ANSWER = re.compile(r"^\s*(\(\s*[A-Za-z0-9]\s*\)|[A-Za-z0-9](\s*$|[).:]))")

_concept_sets = concept_sets  # its name before the fit driver


def check_answer_letters(data: ContrastiveSet) -> None:
    """Recipe ``ab`` reads the answer letter of each completion: refuse a set whose
    completions are not answer choices ("(A)", "(B) text", "A)", "B.", a bare letter), where
    it would read the first letter of free text instead."""
    for i, pair in enumerate(data):
        for side, text in (("positive", pair.positive), ("negative", pair.negative)):
            if not _ANSWER.match(text):
                raise DataError(
                    f"recipe 'ab' reads an answer letter such as '(A)', but pair {i}'s {side} "
                    f"completion {text[:40]!r} is not an answer choice; use recipe 'last' or "
                    f"'mean' for free-text completions")


def contrastive_samples(
    data: ContrastiveSet, renderer: Renderer
) -> tuple[list[Sample], list[Sample]]:
    """Rendered (prompt, completion) samples of the positive and negative sides."""
    pos, neg = [], []
    for pair in data:
        prompt = renderer.prompt(pair.prompt)
        sep = "" if renderer.mode == "chat" else " "
        pos.append(Sample(prompt, sep + pair.positive))
        neg.append(Sample(prompt, sep + pair.negative))
    return pos, neg


def class_activations(
    lm: LoadedModel,
    data: ContrastiveSet | LabeledSet,
    sites: Sequence[Site],
    recipe: str = "last",
    *,
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor], str]:
    """Activations at ``sites`` of the positive and the negative class, and the position read.

    A contrastive set gives prompt + positive / prompt + negative completion (rendered with
    the chat template), read at ``recipe``'s position (rows stay paired); a labelled set gives
    its texts as they are (label 1 positive, 0 negative), read at the last token (``recipe``
    must then be ``"last"``).
    """
    if recipe not in _RECIPE_POSITION:
        raise DataError(f"unknown recipe {recipe!r}; use ab, last or mean")
    kw: dict[str, Any] = {}
    if isinstance(data, LabeledSet):
        data.validate()
        if recipe != "last":
            raise DataError(f"a labelled set has no prompt/completion split, so recipe "
                            f"{recipe!r} cannot be read on it; use recipe 'last'")
        pos_s: list[Sample | str] = [t.text for t in data if t.label == 1]
        neg_s: list[Sample | str] = [t.text for t in data if t.label == 0]
        kw["rendered"] = False
    else:
        data.validate(min_size=1)
        if recipe == "ab":
            check_answer_letters(data)
        p, n = contrastive_samples(data, renderer or Renderer(lm.tokenizer))
        pos_s, neg_s = list(p), list(n)
    position = _RECIPE_POSITION[recipe]
    pos = collect(lm, pos_s, list(sites), position, batch_size=batch_size, cache=cache,
                  progress=progress, desc="positive activations", **kw)
    neg = collect(lm, neg_s, list(sites), position, batch_size=batch_size, cache=cache,
                  progress=progress, desc="negative activations", **kw)
    return pos, neg, str(position)


def lfs_activations(
    lm: LoadedModel,
    data: ContrastiveSet | LabeledSet,
    *,
    recipe: str = "last",
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-input activations of every block for both classes of a set.

    Returns ``(positive, negative)``, each ``(N, L, d)``: ``resid_pre.k`` for k = 0 … L−1 at
    the recipe's position (``last``: the last token, the reference's; ``mean``: completion
    mean; ``ab``: answer letter). A contrastive set gives prompt + positive / prompt +
    negative completion (rendered); a labelled set (the paper's unpaired D+ and D− prompt
    sets) gives its texts as they are, read at the last token (other recipes are refused).
    """
    sites = [Site("resid_pre", k) for k in range(lm.info.num_layers)]
    pos, neg, _ = class_activations(lm, data, sites, recipe, renderer=renderer,
                                    batch_size=batch_size, cache=cache, progress=progress)
    return (torch.stack([pos[s] for s in sites], dim=1),
            torch.stack([neg[s] for s in sites], dim=1))


def ode_activations(
    lm: LoadedModel,
    data: ContrastiveSet | LabeledSet,
    site: Site,
    *,
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-token activations at ``site`` of the positive and negative class (ODESteer's data).

    A contrastive set gives prompt + positive / prompt + negative completion (rendered); a
    labelled set gives its texts as they are (label 1 positive, 0 negative), unrendered.
    """
    pos, neg, _ = class_activations(lm, data, [site], "last", renderer=renderer,
                                    batch_size=batch_size, cache=cache, progress=progress)
    return pos[site], neg[site]


def describe_data(data: Any) -> tuple[str | list[str] | None, str | None]:
    """The name(s) and fingerprint an artifact records of the data a fit was given: a set's
    own; for several concept sets, their names and their fingerprints' first 16 characters
    joined by ``+``; ``(None, None)`` without data."""
    if data is None:
        return None, None
    sets = concept_sets(data)
    if len(sets) == 1:
        return sets[0].name, sets[0].fingerprint()
    return [s.name for s in sets], "+".join(s.fingerprint()[:16] for s in sets)


def _data_sets(reading: Reading, data: Any, method: str) -> list[ContrastiveSet | LabeledSet]:
    """The sets to read for the reading's data kind (refusing data of another kind)."""
    if reading.sets is not None:
        return list(reading.sets)
    if reading.data == "concepts":
        return concept_sets(data)
    if isinstance(data, LabeledSet) and reading.data == "pairs":
        raise DataError(f"{method} needs contrastive pairs, but {data.name!r} is a labelled "
                        f"set")
    if not isinstance(data, (ContrastiveSet, LabeledSet)):
        raise DataError(f"{method} is fitted on a contrastive or labelled set, got "
                        f"{type(data).__name__}")
    return [data]


def _prompt_pair(lm: LoadedModel, reading: Reading) -> tuple[Classes, Classes]:
    """A method's own prompt pair at its site, unrendered: every token (recipe ``tokens``)
    or the last token."""
    if reading.prompts is None:
        raise DataError("a reading of kind 'prompts' names its prompt pair")
    site = reading.sites[0]
    if reading.recipe == "tokens":
        return ({site: token_activations(lm, reading.prompts[0], site)},
                {site: token_activations(lm, reading.prompts[1], site)})
    pos, neg = (collect(lm, [text], [site], Position.last(), rendered=False, cache=False,
                        progress=False)[site] for text in reading.prompts)
    return {site: pos}, {site: neg}


def collect_reading(
    lm: LoadedModel,
    reading: Reading,
    data: Any,
    *,
    method: str = "this method",
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> Collected:
    """Collect everything ``reading`` asks for (see :mod:`steerlab.methods.reading`)."""
    renderer = renderer or Renderer(lm.tokenizer)
    name, fingerprint = describe_data(data) if reading.data not in ("prompts", "none") \
        else (None, None)
    if reading.data in ("prompts", "none") and data is not None:
        raise DataError(f"{method} reads no data set; pass data=None")
    out = Collected(reading=reading, render_mode=renderer.mode, data_name=name,
                    fingerprint=fingerprint, progress=progress)
    kw: dict[str, Any] = {"renderer": renderer, "batch_size": batch_size, "cache": cache,
                          "progress": progress}
    start = time.perf_counter()
    if reading.data == "prompts":
        out.positive, out.negative = _prompt_pair(lm, reading)
    elif reading.data != "none":
        for s in _data_sets(reading, data, method):
            pos, neg, out.position = class_activations(lm, s, reading.sites, reading.recipe,
                                                       **kw)
            out.concepts.append((pos, neg))
        out.positive, out.negative = out.concepts[0]
    for key, extra in reading.tuning_sets.items():
        pos, neg, _ = class_activations(lm, extra, reading.sites, reading.recipe, **kw)
        out.extra[key] = (pos, neg)
    for key, texts in reading.texts.items():
        out.extra[key] = collect(lm, texts, reading.sites, _RECIPE_POSITION["last"],
                                 batch_size=batch_size, cache=cache, progress=progress,
                                 desc=f"{key} activations", rendered=False)
    out.seconds["collect"] = time.perf_counter() - start
    if reading.jacobians is not None:
        from steerlab.control.jacobians import block_jacobians

        t0 = time.perf_counter()
        jac = block_jacobians(lm, reading.jacobians.texts, max_tokens=reading.jacobians.max_tokens,
                              rendered=False, progress=progress)
        out.extra["jacobians"] = jac.A
        out.seconds["jacobians"] = time.perf_counter() - t0
    return out
