"""Fit controllers on a model from data: render, collect activations, call ``fit``.

The controllers' ``fit`` methods are pure estimators on activation tensors; these helpers do
the model-side work around them and record what an artifact needs (the model, the data
fingerprint, fit time and figures).
"""

from __future__ import annotations

import time

from steerlab.activations import Position, Sample, collect, token_activations
from steerlab.data import ContrastiveSet, Renderer
from steerlab.errors import DataError
from steerlab.methods.actadd import ActAdd
from steerlab.methods.caa import CAA
from steerlab.models import LoadedModel
from steerlab.sites import find_layers

_RECIPE_POSITION = {
    "ab": Position.answer_letter(),
    "last": Position.last(),
    "mean": Position.completion_mean(),
}


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


def fit_caa(
    lm: LoadedModel,
    data: ContrastiveSet,
    controller: CAA | None = None,
    *,
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> CAA:
    """Fit a CAA controller on a contrastive set (collects activations, then ``fit``)."""
    controller = controller or CAA(layers=lm.info.num_layers // 2)
    data.validate(min_size=1)
    renderer = renderer or Renderer(lm.tokenizer)
    layers = find_layers(lm.model)
    sites = [layers.resolve(s) for s in controller.fit_sites()]
    controller.layers = [s.layer for s in sites]
    start = time.perf_counter()
    pos_s, neg_s = contrastive_samples(data, renderer)
    position = _RECIPE_POSITION[controller.recipe]
    pos = collect(lm, pos_s, sites, position, batch_size=batch_size, cache=cache,
                  progress=progress, desc="positive activations")
    neg = collect(lm, neg_s, sites, position, batch_size=batch_size, cache=cache,
                  progress=progress, desc="negative activations")
    controller.fit(pos, neg)
    controller.model_info = lm.info
    controller.data_fingerprint = data.fingerprint()
    controller.fit_info.update(
        data=data.name,
        fit_seconds=round(time.perf_counter() - start, 3),
        render_mode=renderer.mode,
        position=str(position),
    )
    return controller


def fit_actadd(lm: LoadedModel, controller: ActAdd | None = None) -> ActAdd:
    """Fit ActAdd from its prompt pair, read without a chat template as in the paper."""
    controller = controller or ActAdd(layer=lm.info.num_layers // 5)
    layers = find_layers(lm.model)
    site = layers.resolve(controller.fit_sites()[0])
    controller.layer = site.layer
    start = time.perf_counter()
    if controller.mode == "positional":
        pos = token_activations(lm, controller.positive, site)
        neg = token_activations(lm, controller.negative, site)
    else:
        pos = collect(lm, [controller.positive], [site], Position.last(), rendered=False,
                      cache=False, progress=False)[site]
        neg = collect(lm, [controller.negative], [site], Position.last(), rendered=False,
                      cache=False, progress=False)[site]
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise DataError("ActAdd prompts produced no tokens")
    controller.fit(pos, neg)
    controller.model_info = lm.info
    controller.fit_info["fit_seconds"] = round(time.perf_counter() - start, 3)
    return controller
