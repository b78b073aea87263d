"""The controller contract every steering method follows.

A controller is an estimator in the scikit-learn sense: the constructor takes
hyper-parameters only; ``fit`` learns its state from collected activations; learned
attributes are plain tensors. At run time, the steering context calls
``steer(site, h, strength, ctx)`` at each of the controller's ``sites``; it must be a pure
function of its inputs and learned state, batched over rows, with ``strength`` a ``(batch,)``
float32 tensor. The runtime applies the result only on the positions the token scope selects,
so a controller never needs to know about padding or the KV cache.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from steerlab.errors import SteeringError

# The validators used to live here; they keep this import path.
from steerlab.methods.checks import check_finite as check_finite
from steerlab.methods.checks import check_positive as check_positive
from steerlab.methods.checks import check_strength as check_strength
from steerlab.methods.checks import two_class_rows as two_class_rows
from steerlab.methods.reading import Collected, ModelLayout, Reading, check_options
from steerlab.models import ModelInfo
from steerlab.scope import LAST, TokenScope, parse_scope
from steerlab.sites import Site


@dataclass
class StepContext:
    """What a controller may look at besides the tensor it steers, for one forward pass."""

    positions: torch.Tensor  # (batch, seq) absolute positions, -1 on padding
    prompt_len: torch.Tensor  # (batch,)
    reads: dict[Site, torch.Tensor] = field(default_factory=dict)  # tensors at read_sites
    # Per-forward-pass working memory of controllers that carry state across layers (S-PID),
    # keyed by id(controller); a new context object per forward pass, so nothing leaks.
    scratch: dict[Any, Any] = field(default_factory=dict)
    # Per-row memory that survives from one forward pass to the next of the same rows (one
    # dict per row of this pass, keyed by id(controller)): S-PID's derivative at block 0
    # uses the previous pass's last-block error. The steering context makes new dicts at
    # ``__enter__`` (so nothing leaks between generate calls); the server keeps one per
    # request, so rows joining or leaving a continuous batch never see each other's state.
    carry: list[dict[Any, Any]] | None = None
    # (batch, seq) bool: the positions where the runtime writes this controller's result
    # (None: every position); set by the runtime before each ``steer`` call.
    steered: torch.Tensor | None = None


@dataclass(frozen=True)
class Preset:
    """A named configuration of a method: constructor hyper-parameters and the keyword
    arguments its fit helper takes (``fit``), with the source of the values."""

    hyperparameters: Mapping[str, Any]
    fit: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


C = TypeVar("C", bound="Controller")


class Controller(ABC):
    """Base class of steering methods. Subclasses set ``method`` and implement the rest."""

    method: ClassVar[str]
    # Named configurations (``"paper"``: the paper's values as its reference code uses them).
    presets: ClassVar[dict[str, Preset]] = {}

    sites: list[Site]
    model_info: ModelInfo | None
    fit_info: dict[str, Any]
    data_fingerprint: str | None
    default_scope: TokenScope

    def __init__(self) -> None:
        self.sites = []
        self.model_info = None
        self.fit_info = {}
        self.data_fingerprint = None
        self.default_scope = LAST
        # keyword arguments for the fit helper that a preset chose (not hyper-parameters)
        self.fit_options: dict[str, Any] = {}

    def _set_scope(self, scope: str, *, steers: str | None = None) -> None:
        """Record the ``scope`` hyper-parameter and parse it, once, into ``default_scope``
        (``steers``: the scope actually steered, when the method overrides the given one)."""
        self.scope = scope
        self.default_scope = parse_scope(scope if steers is None else steers)

    @classmethod
    def from_preset(cls: type[C], name: str, **overrides: Any) -> C:
        """Construct with the preset's hyper-parameters, ``overrides`` winning; the fit helper
        then uses the preset's fit options, and the artifact records the preset
        (``fit.preset``: its name, source and the overridden hyper-parameters)."""
        if name not in cls.presets:
            known = ", ".join(sorted(cls.presets)) or "none"
            raise SteeringError(f"{cls.method} has no preset {name!r} (presets: {known})")
        preset = cls.presets[name]
        obj = cls(**{**preset.hyperparameters, **overrides})
        obj.fit_options = dict(preset.fit)
        obj.fit_info["preset"] = {"name": name, "source": preset.source,
                                  "overrides": sorted(overrides)}
        return obj

    def fit_option(self, name: str, given: Any, default: Any) -> Any:
        """A fit helper's keyword: what the caller gave, else the preset's, else ``default``."""
        if given is not None:
            return given
        return self.fit_options.get(name, default)

    # -- the fit side: what to collect, and learning from it -------------------------------------
    def fit_sites(self) -> list[Site]:
        """The sites the fit reads (block indices as given: negative ones count from the end
        of the model); a method that reads others overrides :meth:`reading`."""
        raise SteeringError(f"{type(self).__name__} does not say which sites it reads: "
                            f"override fit_sites() or reading()")

    def bind_sites(self, model: ModelLayout, *, write_back: bool = True) -> list[Site]:
        """:meth:`fit_sites` resolved against the model (a negative block index counts from
        the end; SiteError when out of range). With ``write_back``, the resolved indices
        replace the ``layers`` (or ``layer``) hyper-parameter, as the artifact records them."""
        sites = model.resolve(self.fit_sites())
        if write_back and hasattr(self, "layers"):
            setattr(self, "layers", [s.layer for s in sites])  # noqa: B010 - not every method has it
        elif write_back and hasattr(self, "layer") and sites:
            setattr(self, "layer", sites[0].layer)  # noqa: B010
        return sites

    def reading(self, model: ModelLayout, data: Any, **options: Any) -> Reading:
        """What to collect (see :mod:`steerlab.methods.reading`): by default, the positive
        and negative class (a contrastive or a labelled set) at :meth:`bind_sites`, at the
        ``recipe`` hyper-parameter's position (``last`` without one); no fit options."""
        check_options(self.method, options)
        return Reading(sites=self.bind_sites(model), recipe=getattr(self, "recipe", "last"),
                       data="labelled")

    def fit_collected(self: C, collected: Collected) -> C:
        """Learn from what the driver collected: by default the model-free
        ``fit(positive, negative)`` on the per-site class activations."""
        fit = getattr(self, "fit", None)
        if fit is None:
            raise SteeringError(f"{type(self).__name__} has no fit(positive, negative): "
                                f"override fit_collected()")
        fit(collected.positive, collected.negative)
        return self

    def record_fit(self, info: ModelInfo, collected: Collected,
                   estimator_seconds: float) -> None:
        """What an artifact needs of a fit: the model, the data fingerprint, and in
        ``fit_info`` the data's name, the position read and the times."""
        t_collect = collected.seconds.get("collect", 0.0)
        self.record_data(
            info, collected, position=collected.position,
            collect_seconds=round(t_collect, 3), estimator_seconds=round(estimator_seconds, 3),
            fit_seconds=round(t_collect + estimator_seconds, 3))

    def record_data(self, info: ModelInfo, collected: Collected, **fit_info: Any) -> None:
        """The part of :meth:`record_fit` every method shares: the model, the data
        fingerprint and the data's name, plus the method's own ``fit_info`` entries."""
        self.model_info = info
        self.data_fingerprint = collected.fingerprint
        self.fit_info.update(data=collected.data_name, **fit_info)

    # -- what the runtime needs ----------------------------------------------------------------
    @property
    def read_sites(self) -> list[Site]:
        """Sites whose tensors the controller reads at run time (closed-loop methods)."""
        return []

    @property
    def is_fitted(self) -> bool:
        return bool(self.sites)

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise SteeringError(
                f"this {type(self).__name__} is not fitted: call fit() or load an artifact"
            )

    def check_site(self, site: Site) -> None:
        """Fail clearly when asked to steer a site this controller was not fitted at."""
        self.check_fitted()
        if site not in self.sites:
            raise SteeringError(
                f"this {type(self).__name__} was fitted at {[str(s) for s in self.sites]}, "
                f"not at {site}"
            )

    @abstractmethod
    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        """Return the steered tensor at ``site`` (same shape and dtype as ``h``)."""

    # -- artifacts -----------------------------------------------------------------------------
    @classmethod
    def hyperparameter_names(cls) -> list[str]:
        """The constructor's parameter names, as scikit-learn's ``_get_param_names`` finds
        them: the signature of ``__init__`` without ``self`` and ``*args``/``**kwargs``. A
        constructor that takes ``**kwargs`` and passes them on (``ALQRPlus``) also takes its
        base class's parameters, which come after its own."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            names += [p.name for p in params if p.name != "self" and p.name not in names
                      and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return names

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor's arguments, JSON-serialisable: each one's value is the attribute
        of the same name (so a constructor stores every argument as given, validated and
        normalised; a method that does not overrides this and says why)."""
        return {name: getattr(self, name) for name in self.hyperparameter_names()}

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Learned tensors, keyed by name, for safetensors."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        """Restore learned state saved by :meth:`state_dict`."""

    def vectors_by_layer(self) -> dict[int, torch.Tensor] | None:
        """For linear additive methods: the vector added to ``resid_post.L`` at strength 1.

        Used for llama.cpp GGUF control-vector export; ``None`` where the method is not a
        constant additive vector on the block outputs.
        """
        return None

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        state = f", sites={[str(s) for s in self.sites]}" if self.sites else ", unfitted"
        return f"{type(self).__name__}({hp}{state})"
