"""ODESteer's barrier h (a log-density ratio, a linear classifier on random features) and
the integration of its normalised gradient flow. See :mod:`steerlab.methods.ode`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torchdiffeq import odeint

from steerlab.errors import DataError, SteeringError
from steerlab.methods.checks import (
    check_count,
    check_positive,
    check_rows,
    check_times,
    two_class_rows,
)
from steerlab.methods.ode.features import FEATURE_MAPS, FeatureMap, _rowwise, normalise

SolverName = Literal["euler", "midpoint", "rk4"]
GradMethod = Literal["analytic", "autograd"]
SOLVERS: tuple[str, ...] = ("euler", "midpoint", "rk4")
FIELD_EPS = 1e-10  # v = ∇h/(‖∇h‖ + FIELD_EPS)


# -- the barrier: a log-density-ratio estimator ------------------------------------------------
class Barrier:
    """h(a) = wᵀφ(a) + b + log((1 − π)/π): a probabilistic linear classifier on φ(a).

    ``fit`` labels positives 1 and negatives 0 and fits ``LogisticRegression(C, max_iter=1000)``
    unless another sklearn-like classifier with ``coef_`` and ``intercept_`` is given.
    """

    def __init__(self, features: FeatureMap) -> None:
        self.features = features
        self.w = torch.empty(0)
        self.b = torch.empty(0)
        self.prior = torch.empty(0)

    @property
    def is_fitted(self) -> bool:
        return self.w.numel() > 0

    @property
    def in_features(self) -> int:
        return self.features.in_features

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise SteeringError("this Barrier is not fitted: call fit() or load its state")

    def fit(self, positive: torch.Tensor, negative: torch.Tensor, *, classifier: Any = None,
            C: float = 1.0) -> Barrier:
        """Fit on positive (N₊, d) and negative (N₋, d) activations."""
        pos, neg = two_class_rows(positive, negative, "ODESteer", width=self.in_features)
        x = torch.cat([pos, neg], dim=0)
        phi = self.features(x).numpy()
        y = np.concatenate([np.ones(pos.shape[0]), np.zeros(neg.shape[0])]).astype(np.int64)
        if classifier is None:
            from sklearn.linear_model import LogisticRegression

            classifier = LogisticRegression(C=check_positive("C", C), max_iter=1000)
        classifier.fit(phi, y)
        classes = getattr(classifier, "classes_", None)
        if classes is not None and [float(c) for c in classes] != [0.0, 1.0]:
            raise DataError(f"the classifier learned classes {list(classes)}, expected [0, 1]")
        coef = np.asarray(classifier.coef_, dtype=np.float64).reshape(-1)
        if coef.shape[0] != self.features.n_components:
            raise DataError(
                f"the classifier's coef_ has {coef.shape[0]} weights for "
                f"{self.features.n_components} features (a binary linear classifier is needed)"
            )
        intercept = np.asarray(getattr(classifier, "intercept_", 0.0), dtype=np.float64)
        pi = pos.shape[0] / x.shape[0]
        self.set_parameters(torch.from_numpy(coef), float(intercept.reshape(-1)[0]),
                            math.log((1.0 - pi) / pi))
        return self

    def set_parameters(self, w: torch.Tensor, b: float, prior: float) -> None:
        """Set the classifier weights ``w`` (n_components,), bias and log prior odds ratio."""
        w = w.detach().to(torch.float32).reshape(-1).cpu()
        if w.shape[0] != self.features.n_components:
            raise SteeringError(
                f"w has {w.shape[0]} weights for {self.features.n_components} features"
            )
        for name, t in (("w", w), ("b", torch.tensor(b)), ("prior", torch.tensor(prior))):
            if not bool(torch.isfinite(t).all()):
                raise DataError(f"the fitted barrier's {name} has NaN or inf values")
        self.w = w
        self.b = torch.tensor([b], dtype=torch.float32)
        self.prior = torch.tensor([prior], dtype=torch.float32)

    def _logit(self, a: torch.Tensor) -> torch.Tensor:
        # no validation: also traced by torch.func.grad
        w, b = self.w.to(a.device, a.dtype), self.b.to(a.device, a.dtype)
        return _rowwise(lambda c: self.features.transform_unit(normalise(c)[0]) @ w + b, a,
                        self.features.row_width)

    def logit(self, a: torch.Tensor) -> torch.Tensor:
        """The classifier's log-odds wᵀφ(a) + b, rows (N, d) → (N,)."""
        self._check_fitted()
        check_rows("the activation", a, self.in_features)
        return self._logit(a)

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """h(a) = log p₊(a)/p₋(a), rows (N, d) → (N,)."""
        return self.logit(a) + self.prior.to(a.device, a.dtype)

    def grad(self, a: torch.Tensor, *, method: GradMethod = "analytic") -> torch.Tensor:
        """∇h(a) for rows (N, d) → (N, d): analytic (the VJP above) or by autograd."""
        self._check_fitted()
        check_rows("the activation", a, self.in_features)
        if method == "analytic":
            return self.features.vjp(a, self.w.to(a.device, a.dtype))
        if method == "autograd":
            return torch.func.grad(lambda x: self._logit(x).sum())(a)
        raise SteeringError(f"unknown gradient method {method!r}; use analytic or autograd")

    def velocity(self, a: torch.Tensor) -> torch.Tensor:
        """v(a) = ∇h/(‖∇h‖ + 1e-10); zero where the barrier is flat (∇h = 0)."""
        g = self.grad(a)
        return g / (torch.linalg.vector_norm(g, dim=-1, keepdim=True) + FIELD_EPS)

    def score(self, positive: torch.Tensor, negative: torch.Tensor) -> float:
        """Accuracy of the classifier (log-odds > 0 means positive) on labelled rows."""
        self._check_fitted()
        pos = positive.detach().to(self.w.device, torch.float32)
        neg = negative.detach().to(self.w.device, torch.float32)
        hits = int((self.logit(pos) > 0).sum()) + int((self.logit(neg) <= 0).sum())
        total = pos.shape[0] + neg.shape[0]
        if total == 0:
            raise DataError("score needs at least one labelled activation")
        return hits / total

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        out = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        out.update({"barrier.w": self.w.contiguous(), "barrier.b": self.b.contiguous(),
                    "barrier.prior": self.prior.contiguous()})
        return out

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], kind: str) -> Barrier:
        if kind not in FEATURE_MAPS:
            raise SteeringError(f"unknown feature map {kind!r}; use {' or '.join(FEATURE_MAPS)}")
        sub = {k[len("features."):]: v for k, v in tensors.items() if k.startswith("features.")}
        out = cls(FEATURE_MAPS[kind].from_state(sub))
        out.set_parameters(tensors["barrier.w"], float(tensors["barrier.b"].reshape(-1)[0]),
                           float(tensors["barrier.prior"].reshape(-1)[0]))
        return out

    def to(self, device: torch.device | str) -> Barrier:
        out = Barrier(self.features.to(device))
        out.w, out.b, out.prior = self.w.to(device), self.b.to(device), self.prior.to(device)
        return out


# -- integration -------------------------------------------------------------------------------
def integrate(velocity: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor,
              T: torch.Tensor, *, solver: str = "euler", steps: int = 10,
              path: bool = False) -> torch.Tensor:
    """Solve da/dt = v(a) from 0 to T_row for every row of ``a`` (N, d) with ``torchdiffeq``.

    Integrates the rescaled field da/ds = T_row·v(a) over s ∈ [0, 1] in ``steps`` fixed steps
    of 1/steps (= steps of T/steps in t). Returns a(T) (N, d), or with ``path=True`` the
    whole path (steps + 1, N, d). No special case for T = 0 here (see the controllers).
    """
    if solver not in SOLVERS:
        raise SteeringError(f"unknown solver {solver!r}; use {', '.join(SOLVERS)}")
    steps = check_count("steps", steps)
    check_times(T)
    scale = T.to(a.device, a.dtype).reshape(-1, 1)
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=a.dtype, device=a.device)

    def field(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scale * velocity(y)

    if path:
        return odeint(field, a, grid, method=solver)
    if solver == "euler":
        # torchdiffeq's fixed-grid Euler, operation for operation (y ← y + Δt·f(t, y) with
        # Δt = t₁ − t₀ from the grid), without its per-step bookkeeping and host syncs: the
        # same numbers (checked in tests/test_ode.py).
        y = a
        dts = grid[1:] - grid[:-1]
        for i in range(steps):
            y = y + dts[i] * field(grid[i], y)
        return y
    ends = grid[[0, -1]]
    sol = odeint(field, a, ends, method=solver,
                 options={"grid_constructor": lambda f, y0, t: grid})
    return sol[-1]
