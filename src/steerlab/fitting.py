"""Fit controllers on a model from data: render, collect activations, call ``fit``.

The controllers' ``fit`` methods are pure estimators on activation tensors; these helpers do
the model-side work around them and record what an artifact needs (the model, the data
fingerprint, fit time and figures).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from steerlab.activations import Position, Sample, collect, token_activations
from steerlab.data import ContrastiveSet, LabeledSet, Renderer
from steerlab.errors import DataError, SiteError
from steerlab.methods.actadd import ActAdd
from steerlab.methods.alqr import ALQR, SPID, ActAddLFS
from steerlab.methods.caa import CAA
from steerlab.models import LoadedModel
from steerlab.sites import Site, find_layers

if TYPE_CHECKING:
    from steerlab.methods.angular import AngularSteering
    from steerlab.methods.inn import INNSteer
    from steerlab.methods.iti import ITI
    from steerlab.methods.ode import ODESteer, StepODESteer
    from steerlab.methods.sas import SAS

_RECIPE_POSITION = {
    "ab": Position.answer_letter(),
    "last": Position.last(),
    "mean": Position.completion_mean(),
}


_ANSWER = re.compile(r"^\s*(\(\s*[A-Za-z0-9]\s*\)|[A-Za-z0-9](\s*$|[).:]))")


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


def fit_caa(
    lm: LoadedModel,
    data: ContrastiveSet | LabeledSet,
    controller: CAA | None = None,
    *,
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> CAA:
    """Fit a CAA controller on a contrastive set (collects activations, then ``fit``); a
    labelled set gives mean(positive) − mean(negative) of its texts' last tokens."""
    controller = controller or CAA(layers=lm.info.num_layers // 2)
    if isinstance(data, LabeledSet):
        controller.recipe = "last"
    renderer = renderer or Renderer(lm.tokenizer)
    layers = find_layers(lm.model)
    sites = [layers.resolve(s) for s in controller.fit_sites()]
    controller.layers = [s.layer for s in sites]
    start = time.perf_counter()
    pos, neg, position = class_activations(lm, data, sites, controller.recipe,
                                           renderer=renderer, batch_size=batch_size,
                                           cache=cache, progress=progress)
    controller.fit(pos, neg)
    controller.model_info = lm.info
    controller.data_fingerprint = data.fingerprint()
    controller.fit_info.update(
        data=data.name,
        fit_seconds=round(time.perf_counter() - start, 3),
        render_mode=renderer.mode,
        position=position,
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


def jacobian_texts(data: ContrastiveSet | LabeledSet, n: int) -> list[str]:
    """Positive-class texts for the Jacobians: the first ``n`` "prompt + positive completion"
    (or positive texts of a labelled set), unrendered (the paper linearises along raw
    positive-class text, e.g. concept sentences; with a chat template, 24 tokens would be
    almost all template)."""
    if isinstance(data, LabeledSet):
        return [t.text for t in data if t.label == 1][:n]
    return [f"{p.prompt} {p.positive}" for p in list(data)[:n]]


def _concept_sets(
    data: ContrastiveSet | LabeledSet | Sequence[ContrastiveSet | LabeledSet],
) -> list[ContrastiveSet | LabeledSet]:
    """One set per concept: a single set, or a sequence of them."""
    sets = [data] if isinstance(data, (ContrastiveSet, LabeledSet)) else list(data)
    if not sets:
        raise DataError("give at least one contrastive or labelled set")
    for s in sets:
        if not isinstance(s, (ContrastiveSet, LabeledSet)):
            raise DataError(f"expected contrastive or labelled sets, got {type(s).__name__}")
    return sets


def fit_alqr(
    lm: LoadedModel,
    data: ContrastiveSet | LabeledSet | Sequence[ContrastiveSet | LabeledSet],
    controller: ALQR | None = None,
    *,
    jacobian_data: Sequence[str] | None = None,
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> ALQR:
    """Fit A-LQR (or A-LQR+): LFS per concept, block Jacobians, Riccati gains.

    ``data`` is one set per concept, contrastive pairs or labelled (unpaired) texts; the
    Jacobians are taken along ``jacobian_data`` (default: the first concept's positive
    texts). ``fit_info`` records the time of each step.
    """
    from steerlab.control.jacobians import block_jacobians

    controller = controller or ALQR()
    sets = _concept_sets(data)
    start = time.perf_counter()
    concepts = [lfs_activations(lm, s, recipe=controller.recipe, renderer=renderer,
                                batch_size=batch_size, cache=cache, progress=progress)
                for s in sets]
    t_collect = time.perf_counter() - start
    texts = list(jacobian_data) if jacobian_data is not None else jacobian_texts(
        sets[0], controller.n_jacobian_prompts)
    t0 = time.perf_counter()
    jac = block_jacobians(lm, texts, max_tokens=controller.max_tokens, rendered=False,
                          progress=progress)
    t_jac = time.perf_counter() - t0
    controller.fit(concepts, jac.A)
    controller.model_info = lm.info
    controller.data_fingerprint = sets[0].fingerprint() if len(sets) == 1 else \
        "+".join(s.fingerprint()[:16] for s in sets)
    controller.fit_info.update(
        data=[s.name for s in sets] if len(sets) > 1 else sets[0].name,
        collect_seconds=round(t_collect, 3),
        jacobian_seconds=round(t_jac, 3),
        jacobian_prompts=len(texts),
        fit_seconds=round(time.perf_counter() - start, 3),
    )
    return controller


def fit_lfs_baseline(
    lm: LoadedModel,
    data: ContrastiveSet | LabeledSet | Sequence[ContrastiveSet | LabeledSet],
    controller: SPID | ActAddLFS,
    *,
    renderer: Renderer | None = None,
    cache: bool = True,
    progress: bool = True,
) -> SPID | ActAddLFS:
    """Fit S-PID or ActAdd-LFS: the LFS only (no Jacobians); sets as in :func:`fit_alqr`."""
    sets = _concept_sets(data)
    start = time.perf_counter()
    concepts = [lfs_activations(lm, s, recipe=controller.recipe, renderer=renderer, cache=cache,
                                progress=progress) for s in sets]
    controller.fit(concepts)
    controller.model_info = lm.info
    controller.data_fingerprint = sets[0].fingerprint() if len(sets) == 1 else \
        "+".join(s.fingerprint()[:16] for s in sets)
    controller.fit_info.update(data=[s.name for s in sets] if len(sets) > 1 else sets[0].name,
                               fit_seconds=round(time.perf_counter() - start, 3))
    return controller


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
    if isinstance(data, LabeledSet):
        data.validate()
        pos_t = [t.text for t in data if t.label == 1]
        neg_t = [t.text for t in data if t.label == 0]
        kw: dict[str, Any] = {"rendered": False}
        pos_s: list[Sample | str] = list(pos_t)
        neg_s: list[Sample | str] = list(neg_t)
    else:
        data.validate(min_size=1)
        p, n = contrastive_samples(data, renderer or Renderer(lm.tokenizer))
        pos_s, neg_s = list(p), list(n)
        kw = {}
    pos = collect(lm, pos_s, [site], Position.last(), batch_size=batch_size, cache=cache,
                  progress=progress, desc="positive activations", **kw)[site]
    neg = collect(lm, neg_s, [site], Position.last(), batch_size=batch_size, cache=cache,
                  progress=progress, desc="negative activations", **kw)[site]
    return pos, neg


def fit_odesteer(
    lm: LoadedModel,
    data: ContrastiveSet | LabeledSet,
    controller: ODESteer | StepODESteer | None = None,
    *,
    test_fraction: float | None = None,
    seed: int = 0,
    renderer: Renderer | None = None,
    cache: bool = True,
    progress: bool = True,
) -> ODESteer | StepODESteer:
    """Fit ODESteer (or StepODESteer) on last-token activations; report held-out accuracy.

    ``test_fraction`` (default: the controller's preset's, else 0.2) of each class is held
    out by a seeded split, the barrier is fitted on the rest and
    ``fit_info["heldout_accuracy"]`` is the classifier's accuracy on the held-out rows. With
    ``test_fraction=0`` (the ``paper`` preset's: the reference fits the barrier on all of its
    training activations) every row is used, in order, and no held-out accuracy is reported.
    ``fit_info`` records ``test_fraction``, ``n_train`` (positive, negative rows fitted on)
    and ``train_accuracy`` (the classifier on those same rows, not a held-out figure).
    """
    from steerlab.methods.ode import ODESteer

    controller = controller or ODESteer(layer=lm.info.num_layers // 2)
    fraction = controller.fit_option("test_fraction", test_fraction, 0.2)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) \
            or not 0.0 <= float(fraction) < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {fraction!r}")
    fraction = float(fraction)
    layers = find_layers(lm.model)
    site = layers.resolve(controller.fit_sites()[0])
    if fraction == 0.0:
        start = time.perf_counter()
        pos_tr, neg_tr = ode_activations(lm, data, site, renderer=renderer, cache=cache,
                                         progress=progress)
        t_collect = time.perf_counter() - start
        pos_te, neg_te = pos_tr[:0], neg_tr[:0]
    else:
        (pos_tr, pos_te), (neg_tr, neg_te), t_collect = _train_test_activations(
            lm, data, site, fraction, seed, renderer=renderer, cache=cache, progress=progress)
    t0 = time.perf_counter()
    controller.fit(pos_tr, neg_tr)
    t_fit = time.perf_counter() - t0
    controller.model_info = lm.info
    controller.data_fingerprint = data.fingerprint()
    controller.fit_info.update(
        data=data.name,
        collect_seconds=round(t_collect, 3),
        barrier_fit_seconds=round(t_fit, 3),
        test_fraction=fraction,
        n_train=[int(pos_tr.shape[0]), int(neg_tr.shape[0])],
    )
    for key in ("heldout_accuracy", "n_heldout"):
        controller.fit_info.pop(key, None)
    if pos_te.shape[0] and neg_te.shape[0]:
        controller.fit_info["heldout_accuracy"] = round(
            float(controller.barrier_accuracy(pos_te, neg_te)), 4)
        controller.fit_info["n_heldout"] = [int(pos_te.shape[0]), int(neg_te.shape[0])]
    return controller


def fit_innsteer(
    lm: LoadedModel,
    data: ContrastiveSet | LabeledSet,
    controller: INNSteer | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    renderer: Renderer | None = None,
    cache: bool = True,
    progress: bool = True,
) -> INNSteer:
    """Fit INNSteer on last-token activations; report held-out separability raw vs latent.

    The flow is trained on a seeded train split (it holds out its own validation part for
    early stopping); on the rest (``test_fraction`` of each class), ``fit_info`` records the
    held-out accuracy of the same scikit-learn logistic-regression probe fitted on the raw
    activations (``heldout_raw_probe_accuracy``) and on the latents z = φ(h)
    (``heldout_latent_probe_accuracy``), and of the jointly trained latent probe
    (``heldout_joint_probe_accuracy``).
    """
    from steerlab.methods.inn import INNSteer, linear_probe_accuracy

    controller = controller or INNSteer(layer=lm.info.num_layers // 2)
    layers = find_layers(lm.model)
    site = layers.resolve(controller.fit_sites()[0])
    (pos_tr, pos_te), (neg_tr, neg_te), t_collect = _train_test_activations(
        lm, data, site, test_fraction, seed, renderer=renderer, cache=cache, progress=progress)
    t0 = time.perf_counter()
    controller.fit(pos_tr, neg_tr, progress=progress)
    t_fit = time.perf_counter() - t0
    controller.model_info = lm.info
    controller.data_fingerprint = data.fingerprint()
    controller.fit_info.update(
        data=data.name,
        collect_seconds=round(t_collect, 3),
        flow_fit_seconds=round(t_fit, 3),
        n_train=[int(pos_tr.shape[0]), int(neg_tr.shape[0])],
    )
    if pos_te.shape[0] and neg_te.shape[0]:
        fi = controller.fit_info
        fi["n_heldout"] = [int(pos_te.shape[0]), int(neg_te.shape[0])]
        fi["heldout_raw_probe_accuracy"] = round(
            linear_probe_accuracy(pos_tr, neg_tr, pos_te, neg_te, seed=seed), 4)
        zs = [controller.encode(x) for x in (pos_tr, neg_tr, pos_te, neg_te)]
        fi["heldout_latent_probe_accuracy"] = round(linear_probe_accuracy(*zs, seed=seed), 4)
        if controller.probe_weight is not None:
            fi["heldout_joint_probe_accuracy"] = round(
                controller.probe_accuracy(pos_te, neg_te), 4)
    return controller


Pair = tuple[torch.Tensor, torch.Tensor]


def _train_test_activations(
    lm: LoadedModel, data: ContrastiveSet | LabeledSet, site: Site, test_fraction: float,
    seed: int, *, renderer: Renderer | None, cache: bool, progress: bool,
) -> tuple[Pair, Pair, float]:
    """Last-token activations of each class (:func:`ode_activations`), split into seeded
    (train, test) parts (no test rows for classes under 5 rows); and the collection time."""
    start = time.perf_counter()
    pos, neg = ode_activations(lm, data, site, renderer=renderer, cache=cache,
                               progress=progress)
    t_collect = time.perf_counter() - start
    g = torch.Generator().manual_seed(seed)

    def split(x: torch.Tensor) -> Pair:
        idx = torch.randperm(x.shape[0], generator=g)
        n_test = round(x.shape[0] * test_fraction) if x.shape[0] >= 5 else 0
        return x[idx[n_test:]], x[idx[:n_test]]

    return split(pos), split(neg), t_collect


def fit_sas(
    lm: LoadedModel,
    data: ContrastiveSet,
    controller: SAS,
    *,
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> SAS:
    """Fit an SAS vector: the positive and negative examples' activations at the controller's
    site (at its recipe's position, as CAA), encoded by its SAE."""
    data.validate(min_size=1)
    renderer = renderer or Renderer(lm.tokenizer)
    site = find_layers(lm.model).resolve(controller.fit_sites()[0])
    sae = controller._require_sae()
    if sae.config.d_in != lm.info.hidden_size:
        raise DataError(f"the SAE reads width {sae.config.d_in} but {lm.info.model_id} has "
                        f"hidden size {lm.info.hidden_size}")
    start = time.perf_counter()
    pos_s, neg_s = contrastive_samples(data, renderer)
    if controller.recipe == "ab":
        check_answer_letters(data)
    position = _RECIPE_POSITION[controller.recipe]
    pos = collect(lm, pos_s, [site], position, batch_size=batch_size, cache=cache,
                  progress=progress, desc="positive activations")[site]
    neg = collect(lm, neg_s, [site], position, batch_size=batch_size, cache=cache,
                  progress=progress, desc="negative activations")[site]
    t_collect = time.perf_counter() - start
    controller.fit(pos, neg)
    controller.model_info = lm.info
    controller.data_fingerprint = data.fingerprint()
    controller.fit_info.update(data=data.name, collect_seconds=round(t_collect, 3))
    return controller


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


def _record_fit(controller: Any, lm: LoadedModel, data: ContrastiveSet | LabeledSet,
                position: str, t_collect: float, t_fit: float) -> Any:
    """What an artifact needs of a fit: the model, the data fingerprint, the times."""
    controller.model_info = lm.info
    controller.data_fingerprint = data.fingerprint()
    controller.fit_info.update(
        data=data.name, position=position, collect_seconds=round(t_collect, 3),
        estimator_seconds=round(t_fit, 3), fit_seconds=round(t_collect + t_fit, 3))
    return controller


def fit_contrastive(
    lm: LoadedModel,
    data: ContrastiveSet | LabeledSet,
    controller: Any,
    *,
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> Any:
    """Fit any controller whose ``fit(positive, negative)`` takes per-site class activations
    read at its ``recipe``'s position: RepE, probe directions, Mean-/Linear-AcT, MiMiC (and
    CAA, which :func:`fit_caa` also does). Records collection and estimator times."""
    layers = find_layers(lm.model)
    sites = [layers.resolve(s) for s in controller.fit_sites()]
    if hasattr(controller, "layers"):
        controller.layers = [s.layer for s in sites]
    start = time.perf_counter()
    pos, neg, position = class_activations(lm, data, sites, controller.recipe,
                                           renderer=renderer, batch_size=batch_size,
                                           cache=cache, progress=progress)
    t_collect = time.perf_counter() - start
    t0 = time.perf_counter()
    controller.fit(pos, neg)
    t_fit = time.perf_counter() - t0
    return _record_fit(controller, lm, data, position, t_collect, t_fit)


DEFAULT_ITI_TUNING_FRACTION = 0.2


def _iti_hold_out(
    data: ContrastiveSet | LabeledSet, fraction: float, seed: int,
) -> tuple[ContrastiveSet | LabeledSet, ContrastiveSet | LabeledSet | None, int]:
    """``fit_iti``'s default tuning set: (probe part, held-out part or None, questions held
    out). The units are questions (a pair's prompt, a labelled item's ``group``; an item
    without one is its own unit); round(fraction·U) of the U units (at least 1, leaving at
    least 2), drawn by ``numpy.random.default_rng(seed).permutation(U)``, are held out, each
    part keeping the data's order. With fewer than 3 units nothing is held out."""
    import numpy as np

    if isinstance(data, ContrastiveSet):
        keys: list[Any] = [("q", p.prompt) for p in data]
    else:
        keys = [("q", t.group) if t.group is not None else ("row", i)
                for i, t in enumerate(data)]
    number: dict[Any, int] = {}
    for key in keys:
        number.setdefault(key, len(number))
    n_units = len(number)
    if n_units < 3:
        return data, None, 0
    n_held = min(max(round(n_units * fraction), 1), n_units - 2)
    held = {int(u) for u in np.random.default_rng(seed).permutation(n_units)[:n_held]}
    out = [number[key] in held for key in keys]
    if isinstance(data, ContrastiveSet):
        pairs = list(data)
        return (ContrastiveSet([p for p, o in zip(pairs, out, strict=True) if not o], data.name),
                ContrastiveSet([p for p, o in zip(pairs, out, strict=True) if o], data.name),
                n_held)
    items = list(data)
    return (LabeledSet([t for t, o in zip(items, out, strict=True) if not o], data.name),
            LabeledSet([t for t, o in zip(items, out, strict=True) if o], data.name), n_held)


def _iti_groups(data: ContrastiveSet | LabeledSet) -> tuple[list[Any], list[Any]] | None:
    """Question ids of the positive and the negative rows :func:`class_activations` gives:
    a pair's prompt (both completions answer it), a labelled item's ``group``; ``None`` for a
    labelled set without groups (ITI then splits by row)."""
    if isinstance(data, ContrastiveSet):
        prompts = [p.prompt for p in data]
        return prompts, list(prompts)
    have = [t.group is not None for t in data]
    if not any(have):
        return None
    if not all(have):
        raise DataError(f"labelled set {data.name!r}: {have.count(False)} of {len(have)} items "
                        f"have no group; give every item a group (question id) or none")
    return ([t.group for t in data if t.label == 1], [t.group for t in data if t.label == 0])


def fit_iti(
    lm: LoadedModel,
    data: ContrastiveSet | LabeledSet,
    controller: ITI | None = None,
    *,
    tuning: ContrastiveSet | LabeledSet | Sequence[str] | None = None,
    tuning_fraction: float | None = None,
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> ITI:
    """Fit ITI: per-head attention outputs (``heads.L``, before the output projection) of
    every chosen layer (all layers when ``layers`` is None), one probe per head, top-K heads.

    The rows are split by question (a pair's prompt; a labelled item's ``group``, which
    :func:`~steerlab.data.load_truthfulqa_labeled` sets), as the reference does. σ comes from
    tuning rows apart from the probe rows (honest_llama ``validate_2fold.py`` L126-130,
    L172-174): the activations of ``tuning`` (a contrastive set: both completions; a labelled
    set or plain strings: the texts as they are, read at the last token; labels unused) at the
    same position, else of a held-out slice of ``data``: ``tuning_fraction`` (default: the
    controller's preset's, else 0.2) of its questions, drawn with the controller's seed (see
    :func:`_iti_hold_out`), which the probes never see. ``tuning_fraction=0``, or data of
    fewer than 3 questions (with a warning), takes σ from the probe rows instead.
    ``fit_info`` records ``tuning`` (``"given"``, ``"held-out"`` or ``"probe rows"``),
    ``tuning_fraction``, ``n_tuning_questions`` and ``n_tuning`` (rows).

    Raises :class:`~steerlab.errors.SiteError` for a model whose attention output projection
    cannot be found or does not take the concatenated heads.
    """
    import warnings

    from steerlab.methods.iti import ITI

    controller = controller or ITI()
    if tuning is not None and tuning_fraction is not None:
        raise DataError("give tuning= (a tuning set) or tuning_fraction= (a held-out slice of "
                        "the data), not both")
    fraction = controller.fit_option("tuning_fraction", tuning_fraction,
                                     DEFAULT_ITI_TUNING_FRACTION)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) \
            or not 0.0 <= float(fraction) < 1.0:
        raise DataError(f"tuning_fraction must be in [0, 1), got {fraction!r}")
    fraction = float(fraction)
    if isinstance(tuning, str) or (tuning is not None and not isinstance(
            tuning, (ContrastiveSet, LabeledSet, Sequence))):
        raise DataError(f"tuning must be a contrastive set, a labelled set or a list of texts, "
                        f"got {type(tuning).__name__}")
    layers = find_layers(lm.model)
    if controller.layers is None:
        controller.layers = list(range(lm.info.num_layers))
    sites = [layers.resolve(s) for s in controller.fit_sites()]  # SiteError: no heads
    if layers.head_dim is None:
        raise SiteError(f"{lm.info.model_id}: the head width is unknown, so ITI cannot "
                        f"address single heads")
    controller.layers = [s.layer for s in sites]
    probe_data: ContrastiveSet | LabeledSet = data
    held: ContrastiveSet | LabeledSet | Sequence[str] | None = tuning
    n_held = 0
    if tuning is None and fraction > 0.0:
        probe_data, held, n_held = _iti_hold_out(data, fraction, controller.seed)
        if held is None:
            warnings.warn(f"ITI: {data.name!r} has too few questions to hold out a tuning set "
                          f"for σ; σ comes from the probe rows (give tuning= to avoid this)",
                          stacklevel=2)
    groups = _iti_groups(probe_data)
    kw: dict[str, Any] = {"renderer": renderer, "batch_size": batch_size, "cache": cache,
                          "progress": progress}
    start = time.perf_counter()
    pos, neg, position = class_activations(lm, probe_data, sites, controller.recipe, **kw)
    tune: dict[Site, torch.Tensor] | None = None
    if held is not None:
        if isinstance(held, ContrastiveSet):
            tp, tn, _ = class_activations(lm, held, sites, controller.recipe, **kw)
            tune = {s: torch.cat([tp[s], tn[s]]) for s in sites}
        else:
            texts = [t.text for t in held] if isinstance(held, LabeledSet) else \
                [str(t) for t in held]
            if controller.recipe != "last":
                raise DataError(f"tuning texts have no prompt/completion split, so recipe "
                                f"{controller.recipe!r} cannot be read on them; use recipe "
                                f"'last' or a contrastive tuning set")
            if not texts:
                raise DataError("the tuning set is empty")
            tune = collect(lm, texts, sites, _RECIPE_POSITION["last"], batch_size=batch_size,
                           cache=cache, progress=progress, desc="tuning activations",
                           rendered=False)
    t_collect = time.perf_counter() - start
    t0 = time.perf_counter()
    controller.fit(pos, neg, head_dim=layers.head_dim, tuning=tune, groups=groups)
    t_fit = time.perf_counter() - t0
    controller.fit_info.update(
        tuning="given" if tuning is not None else "held-out" if held is not None
        else "probe rows",
        tuning_fraction=None if tuning is not None else fraction,
        n_tuning_questions=n_held if tuning is None and held is not None else None,
    )
    return _record_fit(controller, lm, data, position, t_collect, t_fit)


def fit_angular(
    lm: LoadedModel,
    data: ContrastiveSet | LabeledSet,
    controller: AngularSteering,
    *,
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> AngularSteering:
    """Fit angular steering: the feature direction at the controller's sites, and the plane's
    second axis from the mean differences of every layer (read in the same pass)."""
    layers = find_layers(lm.model)
    sites = [layers.resolve(s) for s in controller.fit_sites()]
    controller.layers = [s.layer for s in sites]
    kind = sites[0].kind
    all_sites = [Site(kind, i) for i in range(lm.info.num_layers)]
    start = time.perf_counter()
    pos, neg, position = class_activations(lm, data, all_sites, controller.recipe,
                                           renderer=renderer, batch_size=batch_size,
                                           cache=cache, progress=progress)
    t_collect = time.perf_counter() - start
    contrast = torch.stack([pos[s].mean(0) - neg[s].mean(0) for s in all_sites])
    t0 = time.perf_counter()
    controller.fit({s: pos[s] for s in sites}, {s: neg[s] for s in sites}, contrast=contrast)
    t_fit = time.perf_counter() - t0
    return _record_fit(controller, lm, data, position, t_collect, t_fit)


def _fit_actadd_by_name(lm: LoadedModel, data: Any, controller: ActAdd, **kw: Any) -> ActAdd:
    """ActAdd reads only its own prompt pair: a data set given to it would be silently
    ignored, so it is refused."""
    if data is not None:
        raise DataError(
            "ActAdd is fitted from its own prompt pair (ActAdd(positive=..., negative=...)), "
            "not from a data set: pass data=None (or fit CAA on the set)")
    return fit_actadd(lm, controller)


def _fitter(method: str) -> Any:
    """The fitting function of a method (the generic one unless the method needs its own)."""
    table: dict[str, Any] = {
        "caa": fit_caa, "actadd": _fit_actadd_by_name,
        "alqr": fit_alqr, "alqr_plus": fit_alqr, "spid": fit_lfs_baseline,
        "actadd_lfs": fit_lfs_baseline, "odesteer": fit_odesteer,
        "step_odesteer": fit_odesteer, "innsteer": fit_innsteer, "sas": fit_sas,
        "iti": fit_iti, "angular": fit_angular,
    }
    return table.get(method, fit_contrastive)


def build_controller(method: str, lm: LoadedModel, *, layer: int | None = None,
                     recipe: str | None = None, scope: str | None = None,
                     preset: str | None = None, **hyperparameters: Any) -> Any:
    """Construct ``METHODS[method]`` with the hyper-parameters its constructor takes: the
    block goes to ``layer`` or ``layers`` (whichever it has; a negative index counts from
    the end), ``recipe`` and ``scope`` where accepted. Unknown hyper-parameters raise. With
    ``preset`` (e.g. ``"paper"``), the preset's values fill everything not given here."""
    import inspect

    from steerlab.errors import SteeringError
    from steerlab.methods import METHODS

    if method not in METHODS:
        raise SteeringError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:  # a subclass passing **kwargs on (ALQRPlus) takes its base's
        own = inspect.signature(klass.__init__).parameters  # type: ignore[misc]
        params.update({k: p for k, p in own.items() if p.kind not in (
            inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)})
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            break
    kw: dict[str, Any] = {}
    if layer is not None:
        layer = layer + lm.info.num_layers if layer < 0 else layer
        if "layers" in params:
            kw["layers"] = layer
        elif "layer" in params:
            kw["layer"] = layer
    for name, value in (("recipe", recipe), ("scope", scope)):
        if value is not None and name in params:
            kw[name] = value
    unknown = [k for k in hyperparameters if k not in params]
    if unknown:
        raise SteeringError(f"{method} takes no hyper-parameter {', '.join(unknown)}; it "
                            f"takes {', '.join(p for p in params if p != 'self')}")
    kw.update(hyperparameters)  # an explicit hyper-parameter (e.g. ITI's layers=None) wins
    if preset is not None:
        return cls.from_preset(preset, **kw)
    return cls(**kw)


def fit_method(lm: LoadedModel, method: str, data: ContrastiveSet | LabeledSet | None, *,
               layer: int | None = None, recipe: str | None = None,
               scope: str | None = None, preset: str | None = None, cache: bool = True,
               progress: bool = False, auto: bool = False, budget: float = 0.25,
               **hyperparameters: Any) -> Any:
    """Fit any registered method by name: build it (:func:`build_controller`) and run its
    fitting function (the generic :func:`fit_contrastive` unless the method has its own).
    A method added to ``steerlab.methods.METHODS`` whose ``fit(positive, negative)`` takes
    per-site class activations needs nothing more to be fitted here, by the CLI and by the
    evaluation harness.

    ``auto=True`` chooses the block (among a few depths, or ``layer`` alone if given) and a
    strength on a validation slice of ``data`` within a next-token KL ``budget``
    (:func:`steerlab.autotune.auto_fit`, the same rule for every method) and records the
    choice in ``fit_info["auto"]``."""
    if auto:
        from steerlab.autotune import auto_fit

        if data is None:
            raise DataError("auto=True chooses the block and strength on a validation slice "
                            "of the data: give a data set")
        return auto_fit(lm, method, data, layers=[layer] if layer is not None else None,
                        budget=budget, progress=progress, recipe=recipe, scope=scope,
                        preset=preset, cache=cache, **hyperparameters)
    controller = build_controller(method, lm, layer=layer, recipe=recipe, scope=scope,
                                  preset=preset, **hyperparameters)
    fitter = _fitter(method)
    start = time.perf_counter()
    kw: dict[str, Any] = {"progress": progress, "cache": cache}
    fitted = fitter(lm, data, controller, **kw)
    fitted.fit_info.setdefault("fit_seconds", round(time.perf_counter() - start, 3))
    return fitted
