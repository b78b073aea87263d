"""Probe direction: the unit weight of a logistic-regression probe as a steering direction.

The "ITI-style" baseline of the ODESteer code base (ZhaoHongjue/odesteer, ``steer/_iti.py``):
Li et al., "Inference-Time Intervention: Eliciting Truthful Answers from a Language Model"
(NeurIPS 2023; reference code likenneth/honest_llama) train a logistic-regression probe per
attention head and, in one variant, steer along its weight; the baseline applies that to the
residual stream instead of single heads. (steerlab's head-wise ITI is a separate method.)

At each site, a probe p(+ | a) = σ(wᵀa + b) is fitted with scikit-learn's
``LogisticRegression`` (L2 penalty, ``C=1``, lbfgs, ``max_iter=1000``, as both reference codes)
on the positive (label 1) and negative (label 0) activations, and

    θ̂ = w / ‖w‖

(the positive class lies on the side θ̂ points to, by the labels). With ``standardize=True``
the probe is fitted on z-scored features, x̃ = (a − μ)/σ, and its weight is mapped back to
activation space, w = w̃ / σ (the normal of the same decision boundary in raw coordinates), so
the direction always lives in the raw activation space. Off by default: the references fit on
raw activations.

Steering adds v at strength m, h' = h + m·v, with ``scale="projected"`` (default;
v = θ̂ ((μ₊ − μ₋)·θ̂), the class-mean gap along θ̂, comparable with CAA's strength) or
``scale="unit"`` (v = θ̂, the ODESteer baseline's unit-norm vector). ``fit_info`` records the
probe's training accuracy, whether lbfgs converged, and the cosine of θ̂ with the mean
difference, per site.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from steerlab.errors import DataError
from steerlab.methods.additive import DirectionController, Recipe, Scale, SiteKind
from steerlab.methods.checks import check_positive, check_positive_int
from steerlab.sites import Site


class ProbeDirection(DirectionController):
    """Logistic-regression probe direction; see the module docstring for the equations.

    Args:
        layers: block index or indices to steer.
        site: ``"resid_post"`` (block output) or ``"resid_pre"`` (block input).
        recipe: ``"ab"``, ``"last"`` or ``"mean"`` (which token the fit reads, as CAA's).
        C: inverse L2 regularisation strength of the probe (scikit-learn's ``C``).
        max_iter: lbfgs iteration limit.
        standardize: fit on z-scored features and map the weight back (default off).
        scale: ``"projected"`` (v = θ̂ ((μ₊ − μ₋)·θ̂), default) or ``"unit"`` (v = θ̂).
        scope: default token scope.
    """

    method: ClassVar[str] = "probe"
    _name: ClassVar[str] = "probe direction"

    def __init__(
        self,
        layers: int | Sequence[int] = 15,
        *,
        site: SiteKind = "resid_post",
        recipe: Recipe = "last",
        C: float = 1.0,
        max_iter: int = 1000,
        standardize: bool = False,
        scale: Scale = "projected",
        scope: str = "last",
    ) -> None:
        super().__init__(layers, site=site, recipe=recipe, scale=scale, scope=scope)
        self.C = check_positive("C", C)
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.standardize = bool(standardize)

    def fit(
        self, positive: dict[Site, torch.Tensor], negative: dict[Site, torch.Tensor]
    ) -> ProbeDirection:
        """Fit one probe per site on positive (N₊, d) and negative (N₋, d) activations."""
        self._fit_directions(positive, negative)
        return self

    def direction(
        self, site: Site, pos: torch.Tensor, neg: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        x = torch.cat([pos, neg]).to(torch.float64).numpy()
        y = np.concatenate([np.ones(pos.shape[0]), np.zeros(neg.shape[0])])
        mu, sigma = np.zeros(x.shape[1]), np.ones(x.shape[1])
        if self.standardize:
            mu = x.mean(0)
            sigma = x.std(0)
            sigma[sigma == 0] = 1.0
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit((x - mu) / sigma, y)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        w = clf.coef_.reshape(-1) / sigma
        norm = float(np.linalg.norm(w))
        if not np.isfinite(norm) or norm == 0.0:
            raise DataError(
                f"the probe at {site} learned a zero weight (C={self.C:g} regularises it away, "
                f"or the classes do not differ); raise C"
            )
        theta = torch.from_numpy(w / norm).to(torch.float32)
        accuracy = float((clf.predict((x - mu) / sigma) == y).mean())
        return theta, {"train_accuracy": round(accuracy, 4), "converged": converged}
