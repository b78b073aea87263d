"""Fitting a method by its registered name: :func:`build_controller` constructs
``METHODS[name]`` from hyper-parameters, :func:`fit_method` builds and fits it with the fit
driver (or chooses its block and strength with ``auto=True``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from steerlab.data import ContrastiveSet, LabeledSet
from steerlab.errors import DataError
from steerlab.fitting.driver import fit
from steerlab.models import LoadedModel


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
               progress: bool = False, auto: bool = False, budget: float | None = None,
               objective: str = "auto",
               fit_options: Mapping[str, Any] | None = None,
               **hyperparameters: Any) -> Any:
    """Fit any registered method by name: build it (:func:`build_controller`) and fit it
    with the fit driver (:func:`steerlab.fitting.fit`, passing ``fit_options``, e.g. ITI's
    ``tuning``). A method added to ``steerlab.methods.METHODS`` needs nothing more to be
    fitted here, by the CLI and by the evaluation harness: by default it reads per-site
    class activations for its ``fit(positive, negative)``, and it overrides ``reading`` /
    ``fit_collected`` where it needs more (see :mod:`steerlab.methods.reading`).

    ``auto=True`` chooses the block (among a few depths, or ``layer`` alone if given), the
    scope and a strength on a validation slice of ``data`` by the ``objective``
    (``"generate"``: greedy validation answers within a perplexity-ratio ``budget``, default
    1.5; ``"teacher"``: teacher-forced within a next-token KL ``budget``, default 0.25 nats;
    ``"auto"`` picks by the data) with :func:`steerlab.autotune.auto_fit`, the same rule for
    every method, and records the choice in ``fit_info["auto"]``."""
    if auto:
        from steerlab.autotune import auto_fit

        if data is None:
            raise DataError("auto=True chooses the block and strength on a validation slice "
                            "of the data: give a data set")
        if fit_options:
            raise DataError(f"auto=True takes no fit options (got {', '.join(fit_options)})")
        return auto_fit(lm, method, data, layers=[layer] if layer is not None else None,
                        objective=objective, budget=budget, progress=progress,
                        recipe=recipe, scope=scope,
                        preset=preset, cache=cache, **hyperparameters)
    controller = build_controller(method, lm, layer=layer, recipe=recipe, scope=scope,
                                  preset=preset, **hyperparameters)
    start = time.perf_counter()
    fitted = fit(lm, data, controller, progress=progress, cache=cache, **(fit_options or {}))
    fitted.fit_info.setdefault("fit_seconds", round(time.perf_counter() - start, 3))
    return fitted
