"""The ODESteer and StepODESteer controllers, their paper presets and the barrier along a
steering path. See :mod:`steerlab.methods.ode` for the equations."""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch

from steerlab.errors import SteeringError
from steerlab.methods.base import Controller, Preset, StepContext
from steerlab.methods.cast_cache import CastCache, cached
from steerlab.methods.checks import (
    check_batch_strengths,
    check_count,
    check_positive,
    check_rows,
    check_site_kind,
    check_times,
    check_width,
    two_class_rows,
)
from steerlab.methods.ode.barrier import SOLVERS, Barrier, SolverName, integrate
from steerlab.methods.ode.features import (
    FEATURE_KINDS,
    FeatureKind,
    FeatureMap,
    PolyCountSketch,
    RandomFourierFeatures,
    median_gamma,
)
from steerlab.methods.reading import (
    Collected,
    ModelLayout,
    Reading,
    check_fraction,
    check_options,
    split_classes,
)
from steerlab.models import ModelInfo
from steerlab.sites import Site

# The reference code: github.com/ZhaoHongjue/odesteer at 08cbc11 (file:line below).
REFERENCE = "ZhaoHongjue/odesteer@08cbc11"
_SKETCH_SOURCE = (
    "n_components 8000, degree 2, gamma 0.1, coef0 1.0, lin_clf_type lr: {yaml}; "
    "LogisticRegression(max_iter=1000), sklearn's C=1: "
    "src/odesteer/utils/kernels/_kernel_clf.py:88; layer_idx 13 (Llama-3.1-8B-Base; "
    "Falcon-7B 14, Mistral-7B 15, Qwen2.5-7B 13: data/toxicity.sh:19-22): confs/detox.yaml:9, "
    "confs/truthfulqa.yaml:9, confs/ultrafeedback.yaml:9; seed 42 (seed_everything before the "
    "unseeded torch.randint hashes): confs/detox.yaml:11, scripts/toxicity/detox_generate.py:21, "
    "src/odesteer/utils/kernels/_poly_cnt_sketch.py:40-49; block output, last position of each "
    "forward pass: src/odesteer/lm/_huggingface_lm.py:91,258,336; barrier fitted on all the "
    "training activations: scripts/toxicity/detox_generate.py:46-47, "
    "scripts/ultrafeedback/ultrafeedback_generate.py:50-51, "
    "scripts/truthfulqa/truthfulqa_generate.py:62-63"
)
PAPER_ODESTEER = Preset(
    hyperparameters={"layer": 13, "site": "resid_post", "n_components": 8000, "degree": 2,
                     "gamma": 0.1, "coef0": 1.0, "features": "poly", "solver": "euler",
                     "steps": 10, "seed": 42, "C": 1.0, "scope": "last"},
    fit={"test_fraction": 0.0},
    source=f"{REFERENCE}: solver euler, steps 10: confs/steer/ODESteer.yaml:3-4; "
           + _SKETCH_SOURCE.format(yaml="confs/steer/ODESteer.yaml:5-9"),
)
PAPER_STEP_ODESTEER = Preset(
    hyperparameters={"layer": 13, "site": "resid_post", "n_components": 8000, "degree": 2,
                     "gamma": 0.1, "coef0": 1.0, "features": "poly", "seed": 42, "C": 1.0,
                     "scope": "last"},
    fit={"test_fraction": 0.0},
    source=f"{REFERENCE}: " + _SKETCH_SOURCE.format(yaml="confs/steer/StepODESteer.yaml:3-7"),
)


# -- controllers -------------------------------------------------------------------------------
class _ODEBase(Controller):
    """Shared estimator and state of ODESteer and StepODESteer (see the module docstring)."""

    def __init__(
        self,
        layer: int = 13,
        *,
        site: Literal["resid_post", "resid_pre"] = "resid_post",
        n_components: int = 8000,
        degree: int = 2,
        gamma: float = 0.1,
        coef0: float = 1.0,
        features: FeatureKind = "poly",
        rff_gamma: float | None = None,
        solver: SolverName = "euler",
        steps: int = 10,
        seed: int = 0,
        C: float = 1.0,
        scope: str = "last",
    ) -> None:
        super().__init__()
        check_site_kind(site, f"{self.method} steers")
        if features not in FEATURE_KINDS:
            raise SteeringError(f"unknown features {features!r}; use poly or rff")
        if solver not in SOLVERS:
            raise SteeringError(f"unknown solver {solver!r}; use {', '.join(SOLVERS)}")
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
            raise SteeringError(f"layer must be an integer, got {layer!r}")
        self.layer = int(layer)
        self.site = site
        self.n_components = check_count("n_components", n_components)
        self.degree = check_count("degree", degree)
        self.gamma = check_positive("gamma", gamma)
        self.coef0 = check_positive("coef0", coef0, allow_zero=True)
        self.features: FeatureKind = features
        self.rff_gamma = None if rff_gamma is None else check_positive("rff_gamma", rff_gamma)
        self.solver: SolverName = solver
        self.steps = check_count("steps", steps)
        self.seed = int(seed)
        self.C = check_positive("C", C)
        self._set_scope(scope)
        self.barrier: Barrier | None = None
        self._on_device: CastCache[Barrier] = {}

    # -- estimator -----------------------------------------------------------------------------
    def make_features(self, in_features: int, data: torch.Tensor | None = None) -> FeatureMap:
        """The (unfitted, random) feature map for activations of width ``in_features``."""
        if self.features == "poly":
            return PolyCountSketch(in_features, self.n_components, self.degree, self.gamma,
                                   self.coef0, seed=self.seed)
        gamma = self.rff_gamma
        if gamma is None:
            gamma = median_gamma(data, seed=self.seed) if data is not None else 1.0
        return RandomFourierFeatures(in_features, self.n_components, gamma, seed=self.seed)

    def fit(self, positive: torch.Tensor, negative: torch.Tensor, *,
            classifier: Any = None) -> Self:
        """Fit the barrier on positive (N₊, d) and negative (N₋, d) activations at the site."""
        start = time.perf_counter()
        pos, neg = two_class_rows(positive, negative, "ODESteer")
        fmap = self.make_features(pos.shape[1], torch.cat([pos, neg]))
        barrier = Barrier(fmap).fit(pos, neg, classifier=classifier, C=self.C)
        self._set_barrier(barrier, self.fit_sites())
        self.fit_info.update(
            fit_seconds=round(time.perf_counter() - start, 3),
            train_accuracy=round(barrier.score(pos, neg), 4),
            n_positive=int(pos.shape[0]),
            n_negative=int(neg.shape[0]),
            log_prior_ratio=round(float(barrier.prior[0]), 6),
            classifier=type(classifier).__name__ if classifier is not None
            else "LogisticRegression",
        )
        if isinstance(fmap, RandomFourierFeatures):
            self.fit_info["rff_gamma"] = fmap.gamma
        return self

    def fit_sites(self) -> list[Site]:
        """The one site whose activations :meth:`fit` expects (and :meth:`steer` steers)."""
        return [Site(self.site, self.layer)]

    # -- the fit side --------------------------------------------------------------------------
    def reading(self, model: ModelLayout, data: Any, *, test_fraction: float | None = None,
                seed: int = 0, **options: Any) -> Reading:
        """Last-token activations of both classes at the site. Fit options:
        ``test_fraction`` of each class (default: the preset's, else 0.2) held out by a
        split seeded with ``seed`` for ``fit_info["heldout_accuracy"]``; with 0 every row is
        fitted on, in order (the ``paper`` preset's)."""
        check_options(self.method, options, ("test_fraction", "seed"))
        fraction = check_fraction("test_fraction",
                                  self.fit_option("test_fraction", test_fraction, 0.2))
        return Reading(sites=self.bind_sites(model, write_back=False), recipe="last",
                       data="labelled", options={"test_fraction": fraction, "seed": seed})

    def fit_collected(self, collected: Collected) -> Self:
        """``fit`` on the train rows; the held-out rows' accuracy goes to ``figures``."""
        site = collected.reading.sites[0]
        fraction = collected.reading.options["test_fraction"]
        pos, neg = collected.positive[site], collected.negative[site]
        if fraction == 0.0:
            (pos_tr, pos_te), (neg_tr, neg_te) = (pos, pos[:0]), (neg, neg[:0])
        else:
            (pos_tr, pos_te), (neg_tr, neg_te) = split_classes(
                pos, neg, fraction, collected.reading.options["seed"])
        t0 = time.perf_counter()
        self.fit(pos_tr, neg_tr)
        collected.seconds["estimator"] = time.perf_counter() - t0
        figures = collected.figures
        figures.update(test_fraction=fraction,
                       n_train=[int(pos_tr.shape[0]), int(neg_tr.shape[0])])
        if pos_te.shape[0] and neg_te.shape[0]:
            figures["heldout_accuracy"] = round(float(self.barrier_accuracy(pos_te, neg_te)), 4)
            figures["n_heldout"] = [int(pos_te.shape[0]), int(neg_te.shape[0])]
        return self

    def record_fit(self, info: ModelInfo, collected: Collected,
                   estimator_seconds: float) -> None:
        figures = dict(collected.figures)
        self.record_data(
            info, collected,
            collect_seconds=round(collected.seconds.get("collect", 0.0), 3),
            barrier_fit_seconds=round(estimator_seconds, 3),
            test_fraction=figures.pop("test_fraction"), n_train=figures.pop("n_train"))
        for key in ("heldout_accuracy", "n_heldout"):
            self.fit_info.pop(key, None)
        self.fit_info.update(figures)

    def _set_barrier(self, barrier: Barrier, sites: list[Site]) -> None:
        self.barrier = barrier
        self.sites = list(sites)
        self._on_device.clear()

    def _barrier(self, device: torch.device) -> Barrier:
        self.check_fitted()
        barrier = self.barrier
        assert barrier is not None
        if device == torch.device("cpu"):
            return barrier
        return cached(self._on_device, device, lambda: barrier.to(device))

    @property
    def hidden_size(self) -> int:
        self.check_fitted()
        assert self.barrier is not None
        return self.barrier.in_features

    def score(self, positive: torch.Tensor, negative: torch.Tensor) -> float:
        """Classifier accuracy on (held-out) positive and negative activations."""
        return self._barrier(torch.device("cpu")).score(positive, negative)

    barrier_accuracy = score

    # -- run time ------------------------------------------------------------------------------
    @abstractmethod
    def transport(self, barrier: Barrier, a: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """Move float32 rows ``a`` (N, d) for times ``T`` (N,)."""

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        self.check_fitted()
        d = self.hidden_size
        check_width(f"{self.method} at {site} was fitted on width", d, h)
        T = strength.to(device=h.device, dtype=torch.float32).reshape(-1)
        check_times(T)
        check_batch_strengths(T, h)
        if not bool((T != 0).any()):
            return h
        rows = h.reshape(-1, d)
        T_rows = T.reshape(-1, *([1] * (h.ndim - 2))).expand(h.shape[:-1]).reshape(-1)
        moved = self.transport(self._barrier(h.device), rows.to(torch.float32), T_rows)
        out = torch.where((T_rows == 0)[:, None], rows, moved.to(h.dtype))
        return out.reshape(h.shape)

    def velocity(self, a: torch.Tensor) -> torch.Tensor:
        """The unit vector field v(a) for rows (N, d), in float32."""
        return self._barrier(a.device).velocity(a.to(torch.float32))

    # -- artifacts -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        self.check_fitted()
        assert self.barrier is not None
        return self.barrier.state_dict()

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        if len(sites) != 1:
            raise SteeringError(f"{self.method} steers one site, got {[str(s) for s in sites]}")
        barrier = Barrier.from_state(tensors, self.features)
        fmap = barrier.features
        if fmap.n_components != self.n_components:
            raise SteeringError(
                f"saved feature map has {fmap.n_components} components, the hyper-parameters "
                f"say {self.n_components}"
            )
        if isinstance(fmap, PolyCountSketch) and (
            fmap.degree != self.degree
            or not math.isclose(fmap.gamma, self.gamma)
            or not math.isclose(fmap.coef0, self.coef0)
        ):
            raise SteeringError(
                "the saved sketch's degree/gamma/coef0 differ from the hyper-parameters"
            )
        self._set_barrier(barrier, list(sites))


class ODESteer(_ODEBase):
    """ODESteer: integrate da/dt = v(a) over [0, T] (see the module docstring).

    Args:
        layer: block whose output (``site="resid_post"``) or input (``"resid_pre"``) is steered.
        n_components, degree, gamma, coef0: the polynomial sketch (reference: 8000, 2, 0.1, 1).
        features: ``"poly"`` (the paper's) or ``"rff"`` (the ablation; RBF bandwidth
            ``rff_gamma``, by default the median heuristic on the training activations).
        solver: ``"euler"`` (default), ``"midpoint"`` or ``"rk4"``; ``steps`` fixed steps.
        seed: seed of the random features.
        C: inverse L2 regularisation of the logistic regression.
        scope: default token scope (``"last"``, as the reference).

    **The reference's values** (``ZhaoHongjue/odesteer`` at ``08cbc11``; files under
    ``src/odesteer/`` are named from there), which ``ODESteer.from_preset("paper")`` sets
    (``PAPER_ODESTEER``):

    * ``solver="euler"``, ``steps=10`` (``confs/steer/ODESteer.yaml:3-4``; the class defaults
      of ``steer/_ode_steer.py:20-21`` agree); ``n_components=8000``, ``degree=2``,
      ``gamma=0.1``, ``coef0=1.0``, logistic regression (``confs/steer/ODESteer.yaml:5-9``;
      the classifier's own defaults 100, 2, 1.0, 0.1 in ``utils/kernels/_kernel_clf.py:124-134``
      are not what the scripts run); ``LogisticRegression(max_iter=1000)`` with sklearn's
      ``C=1`` (``_kernel_clf.py:88``); x̂ = x/(‖x‖ + 1e-12)
      (``utils/kernels/_poly_cnt_sketch.py:345,356-357``); v = ∇h/(‖∇h‖ + 1e-10)
      (``steer/_ode_steer.py:47``).
    * ``layer=13``, the conf's Llama-3.1-8B-Base (``confs/detox.yaml:9``, also
      ``truthfulqa.yaml:9``, ``ultrafeedback.yaml:9``); the data scripts use 14 for Falcon-7B,
      15 for Mistral-7B, 13 for Qwen2.5-7B (``data/toxicity.sh:19-22``): pass ``layer=`` to
      ``from_preset`` for those. The block output (``hidden_states[L + 1]`` for the data,
      ``lm/_huggingface_lm.py:245``; a forward hook on ``model.layers[L]``, ``:258,336``), the
      last position of each forward pass (``:91``) and the last token of each text (``:247``).
    * ``seed=42`` (``confs/detox.yaml:11``, ``seed_everything`` in
      ``scripts/toxicity/detox_generate.py:21``): the reference draws the sketch hashes from
      the global torch RNG (``_poly_cnt_sketch.py:40-49``); steerlab's ``seed=42`` draws the same
      hashes as a global RNG freshly seeded with 42 (checked), but whether anything in the
      reference consumes that RNG between seeding and the fit (model loading) is not checked.
    * fit options ``{"test_fraction": 0.0}``: the reference fits the barrier on all of its
      training activations (``scripts/toxicity/detox_generate.py:46-47``,
      ``ultrafeedback/ultrafeedback_generate.py:50-51``; TruthfulQA on the other half of a
      2-fold split, ``truthfulqa/truthfulqa_generate.py:62-63``).

    **Where steerlab's defaults differ** (steerlab's defaults are kept):

    * ``fit_odesteer`` holds out ``test_fraction=0.2`` for a held-out accuracy by default (the
      preset: 0); without a controller it uses block ``num_layers // 2`` (the reference's
      fallback, unused by its scripts, is ``num_layers // 2 - 1``, ``_huggingface_lm.py:242``).
    * ``seed=0`` by default (the preset: 42, see above).
    * The strength T is not a hyper-parameter but the run-time strength (``Steer(c, T)``), so no
      preset carries it: the reference's yaml default is T = 1.0
      (``confs/steer/ODESteer.yaml:10``), its README runs ODESteer with T = 5.0
      (``README.md:62,113``).
    * T < 0: the reference's ``odeint`` with ``step_size=T/steps`` raises for T < 0
      (``_ode_steer.py:37-42``); steerlab flows down the gradient.
    * The step grid: the reference lets torchdiffeq build it from ``step_size=T/steps``, which
      for some T (e.g. 0.3, 2.4, 4.8; not 1 or 5) rounds to an 11th step of length at most
      1.2e-7·T; steerlab always takes exactly ``steps`` steps.
    * Magnitudes of ∇h (no effect on v): the reference's batched VJP omits the √γ factor
      (``_poly_cnt_sketch.py:334``, its single-row one has it, ``:278``) and multiplies by
      (1 − π)/π (``_kernel_clf.py:62``); the normalisation's VJP divides the projection term by
      ‖x‖ + ε, steerlab by ‖x‖ (``_poly_cnt_sketch.py:419-424``), a 1e-12 relative difference.
    * The RFF ablation (``features="rff"``, the reference's ``RFFODESteer``, for which it ships
      no config): the reference applies RFF to the raw activations, not to x̂
      (``utils/kernels/_rff.py:38-39``), with W ~ N(0, σ⁻²I), σ = median/√2 of the raw pairwise
      distances (``_rff.py:28-31,88-94``), i.e. γ = 1/median²; steerlab uses x̂ and
      γ = 1/(2·median²) of the normalised distances. RFF on raw activations cannot be expressed
      in steerlab (``rff_gamma`` sets only the bandwidth).
    """

    method = "odesteer"
    presets: ClassVar[dict[str, Preset]] = {"paper": PAPER_ODESTEER}

    def transport(self, barrier: Barrier, a: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        return integrate(barrier.velocity, a, T, solver=self.solver, steps=self.steps)


class StepODESteer(_ODEBase):
    """StepODESteer, the one-step ablation: ã = a + T·v(a). ``solver``/``steps`` are unused.

    ``StepODESteer.from_preset("paper")`` (``PAPER_STEP_ODESTEER``) sets the reference's values
    (``confs/steer/StepODESteer.yaml:3-7``: the same sketch and classifier as ODESteer's; T = 1.0
    at ``:8``; ``steer/_step_ode_steer.py:23-25``), as :class:`ODESteer`'s preset without
    ``solver``/``steps``, and fits on all rows; the differences listed for :class:`ODESteer`
    apply here too (T < 0 works in the reference's one step as in steerlab's).
    """

    method = "step_odesteer"
    presets: ClassVar[dict[str, Preset]] = {"paper": PAPER_STEP_ODESTEER}

    def transport(self, barrier: Barrier, a: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        return a + T.to(a.dtype)[:, None] * barrier.velocity(a)


def barrier_along_path(controller: ODESteer | StepODESteer, a: torch.Tensor, T: float,
                       steps: int | None = None) -> torch.Tensor:
    """h at each point of the steering path of rows ``a`` (N, d): (N, steps + 1).

    For :class:`ODESteer`, the ``controller.solver`` path with ``steps`` steps (default
    ``controller.steps``) from a(0) = a to a(T); for :class:`StepODESteer`, ``steps + 1``
    evenly spaced points on its single straight step a + s·T·v(a), s ∈ [0, 1].
    """
    controller.check_fitted()
    steps = check_count("steps", controller.steps if steps is None else steps)
    barrier = controller._barrier(a.device)
    check_rows("the activation", a, barrier.in_features)
    x = a.detach().to(torch.float32)
    times = torch.full((x.shape[0],), float(T), dtype=torch.float32, device=x.device)
    check_times(times)
    if isinstance(controller, StepODESteer):
        v = barrier.velocity(x)
        fractions = torch.linspace(0.0, 1.0, steps + 1, device=x.device)
        path = torch.stack([x + (s * times)[:, None] * v for s in fractions])
    else:
        path = integrate(barrier.velocity, x, times, solver=controller.solver, steps=steps,
                         path=True)
    return torch.stack([barrier(p) for p in path], dim=1)
