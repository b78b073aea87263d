"""The fit driver: one function fits every method on a model from data.

:func:`fit` asks the controller what to read (:meth:`~steerlab.methods.base.Controller.reading`),
collects it along the one collection path (:func:`steerlab.fitting.collect.collect_reading`),
lets the controller learn from it
(:meth:`~steerlab.methods.base.Controller.fit_collected`, which calls the method's
model-free ``fit`` on tensors) and records what an artifact needs of the fit
(:meth:`~steerlab.methods.base.Controller.record_fit`: the model, the data fingerprint, the
fit figures and times).
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

from steerlab.data import Renderer
from steerlab.fitting.collect import collect_reading
from steerlab.methods.base import Controller
from steerlab.methods.reading import ModelLayout
from steerlab.models import LoadedModel
from steerlab.sites import find_layers

C = TypeVar("C", bound=Controller)


def fit(
    lm: LoadedModel,
    data: Any,
    controller: C,
    *,
    renderer: Renderer | None = None,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
    contract: type[Any] | None = None,
    **options: Any,
) -> C:
    """Fit ``controller`` on ``lm`` from ``data`` and return it.

    ``data`` is what the method reads (:mod:`steerlab.methods.reading`): a contrastive or
    labelled set, one set per concept (the A-LQR family), or ``None`` (ActAdd reads its own
    prompt pair). ``renderer`` renders contrastive pairs (default: the model's chat template
    where it has one); activations are collected in batches of ``batch_size`` and cached on
    disk with ``cache``. ``options`` are the method's fit options (e.g. ITI's ``tuning``,
    ODESteer's ``test_fraction``); one the method does not take raises. ``contract`` is the
    class whose fit side (``reading``, ``fit_collected``, ``record_fit``) is used, one that
    ``controller`` is an instance of (default: its own class; see :func:`fit_with`).
    """
    contract = type(controller) if contract is None else contract
    if not isinstance(controller, contract):
        raise TypeError(f"{type(controller).__name__} is not a {contract.__name__}")
    model = ModelLayout(lm.info, find_layers(lm.model))
    reading = contract.reading(controller, model, data, **options)
    collected = collect_reading(lm, reading, data, method=controller.method, renderer=renderer,
                                batch_size=batch_size, cache=cache, progress=progress)
    start = time.perf_counter()
    contract.fit_collected(controller, collected)
    estimator = collected.seconds.get("estimator", time.perf_counter() - start)
    contract.record_fit(controller, lm.info, collected, estimator)
    return controller


def fit_with(contract: type[Any], lm: LoadedModel, data: Any, controller: C,
             **kwargs: Any) -> C:
    """:func:`fit` with the fit side of ``contract``, a class ``controller`` is an instance
    of: :func:`~steerlab.fitting.fit_contrastive` uses the base class's generic one (class
    activations at the controller's sites and recipe). ``kwargs`` as :func:`fit`'s."""
    return fit(lm, data, controller, contract=contract, **kwargs)
