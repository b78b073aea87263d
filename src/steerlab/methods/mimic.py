"""MiMiC: mean and covariance matching by the Gaussian (linear) optimal-transport map.

Singh, Ravfogel, Herzig, Aharoni, Cotterell, Kumaraguru, "Representation Surgery: Theory and
Practice of Affine Steering", ICML 2024 (reference code: shauli-ravfogel/affine-steering,
``controlled_generation/counterfactuals/algos.py`` and
``controlled_generation/scripts_infra/classify_linear_intervention.py``); spec
``specs/methods.md``, "Baselines": linear OT (``ot.da.LinearTransport``, reg 10⁻²) applied only
to the samples a classifier predicts negative.

**Map.** With the negative class as source and the positive class as target, estimate
μ₋, μ₊ and the (biased, 1/N) covariances, regularised on the diagonal as POT's
``ot.da.LinearTransport`` does, Σ₋ = Ĉ₋ + reg·I and Σ₊ = Ĉ₊ + reg·I. The optimal transport map
between N(μ₋, Σ₋) and N(μ₊, Σ₊) is affine,

    T(x) = μ₊ + A (x − μ₋) = A x + b,
    A = Σ₋^{-1/2} (Σ₋^{1/2} Σ₊ Σ₋^{1/2})^{1/2} Σ₋^{-1/2}      (symmetric, positive definite)
    b = μ₊ − A μ₋,

the affine map of least expected squared displacement that matches the target's mean and
covariance (the paper's MiMiC). It is computed with ``ot.gaussian.empirical_bures_wasserstein_
mapping`` (what ``LinearTransport.fit`` calls) in float64, and A is symmetrised.

**Gate** (``only_negative=True``, the spec's and the reference's protocol). A logistic
regression (sklearn, L2, C = 1, lbfgs, ``max_iter=1000``), fitted on positive (label 1) vs
negative (label 0) rows, gives s(h) = w·h + b₀; the map is applied only where s(h) < 0 (the
classifier predicts negative: the reference moves a vector when the classifier's probability
of the source class exceeds ½), independently at every row and position. Elsewhere the
activation is returned bit for bit.

**Strength.** h′ = h + λ (T(h) − h) = h + λ ((A − I) h + b) on gated positions; λ = 1 is the
paper's intervention, λ = 0 the identity, λ < 0 extrapolates away. One (d × d) matmul per
steered token.

**Singular covariances.** With N ≤ d rows a sample covariance is singular (so is a
rank-deficient one with ``reg=0``), and the map on the unseen directions is set by the
regulariser alone. The fit warns (``warnings.warn``), records the site and the regulariser used
in ``fit_info["regularised"]``, and raises ``reg`` to the floor 10⁻³ · v̄ when it is below it,
with v̄ = (tr Ĉ₋ + tr Ĉ₊)/(2d) the mean per-dimension variance (10⁻⁶ if both are constant).

**Where steerlab differs.** The paper intervenes on the last hidden layer (before the LM head)
at every position; steerlab steers the chosen residual blocks on its token scope (default
``last``), with activations read by the recipe (as CAA). The reference's own code adds its
ε = 10⁻⁷ to every covariance entry rather than the diagonal; steerlab follows POT (diagonal),
as the spec asks.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from steerlab.errors import SteeringError
from steerlab.methods.act import check_common
from steerlab.methods.additive import Recipe
from steerlab.methods.additive import SiteKind as SiteKindArg
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.cast_cache import CastCache, cached
from steerlab.methods.checks import (
    check_finite,
    check_positive,
    check_positive_int,
    check_strength_rows,
    check_width,
    layers_arg,
    paired_sites,
    two_class_rows,
)
from steerlab.sites import Site

REG_FLOOR = 1e-3  # relative to the mean per-dimension variance


def covariance_is_singular(x: torch.Tensor, reg: float) -> bool:
    """Whether the (biased) sample covariance of (N, d) rows plus reg·I is numerically singular.

    N ≤ d always is (rank ≤ N − 1) when reg = 0; otherwise a Cholesky factorisation in float64
    decides (a pivot below 10⁻¹² of the mean variance counts as singular).
    """
    n, d = x.shape
    if n <= d:
        return True
    xc = x.to(torch.float64) - x.to(torch.float64).mean(0)
    cov = xc.T @ xc / n + reg * torch.eye(d, dtype=torch.float64)
    scale = float(torch.diagonal(cov).mean())
    if scale <= 0:
        return True
    L, info = torch.linalg.cholesky_ex(cov)
    return int(info) != 0 or float(torch.diagonal(L).min()) ** 2 <= 1e-12 * scale


def gaussian_ot_map(source: torch.Tensor, target: torch.Tensor,
                    reg: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, b) of the Gaussian OT map x ↦ A x + b from (N₋, d) source to (N₊, d) target rows,
    covariances regularised by ``reg``·I (POT's ``LinearTransport``); float64, A symmetric."""
    from ot.gaussian import empirical_bures_wasserstein_mapping

    xs = source.to(torch.float64).cpu().numpy()
    xt = target.to(torch.float64).cpu().numpy()
    A, b = empirical_bures_wasserstein_mapping(xs, xt, reg=float(reg), bias=True)
    A = np.asarray(A, dtype=np.float64)
    A_t = torch.from_numpy(0.5 * (A + A.T))
    # POT's b = μ₊ − μ₋ A (row convention); with A symmetric that is μ₊ − A μ₋.
    b_t = torch.from_numpy(np.asarray(b, dtype=np.float64).reshape(-1))
    return A_t, b_t


class MiMiC(Controller):
    """MiMiC affine steering (Gaussian optimal transport, optionally gated by a classifier);
    see the module docstring for the equations.

    Args:
        layers: block index or indices to steer.
        site: ``"resid_post"`` (block output) or ``"resid_pre"``.
        recipe: which token the fit reads (``"ab"``, ``"last"``, ``"mean"``), as CAA.
        scope: default token scope (``"last"``).
        reg: diagonal regularisation of both covariances (POT's ``LinearTransport`` reg).
        only_negative: apply the map only where the logistic classifier predicts negative.
        C: inverse L2 strength of the logistic regression (sklearn's ``C``).
        max_iter: iterations of the logistic regression's solver.

    Learned (per site): ``A`` (d, d), ``b`` (d,), and with the gate the classifier ``w`` (d,)
    and ``b0`` (1,), all float32; ``mu_neg``, ``mu_pos`` (d,) for inspection.
    """

    method: ClassVar[str] = "mimic"

    A: dict[Site, torch.Tensor]
    b: dict[Site, torch.Tensor]
    w: dict[Site, torch.Tensor]
    b0: dict[Site, torch.Tensor]

    def __init__(
        self,
        layers: int | Sequence[int] = 15,
        *,
        site: SiteKindArg = "resid_post",
        recipe: Recipe = "last",
        scope: str = "last",
        reg: float = 1e-2,
        only_negative: bool = True,
        C: float = 1.0,
        max_iter: int = 1000,
    ) -> None:
        super().__init__()
        check_common("MiMiC", site, recipe)
        self.layers = layers_arg(layers)
        self.site: SiteKindArg = site
        self.recipe: Recipe = recipe
        self._set_scope(scope)
        self.reg = check_positive("reg", reg, allow_zero=True)
        self.only_negative = bool(only_negative)
        self.C = check_positive("C", C)
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.A, self.b, self.w, self.b0 = {}, {}, {}, {}
        self.mu_neg: dict[Site, torch.Tensor] = {}
        self.mu_pos: dict[Site, torch.Tensor] = {}
        self._cast: CastCache[tuple[torch.Tensor, ...]] = {}

    def fit_sites(self) -> list[Site]:
        return [Site(self.site, layer) for layer in self.layers]

    # -- estimator -----------------------------------------------------------------------------
    def fit(self, positive: dict[Site, torch.Tensor],
            negative: dict[Site, torch.Tensor]) -> MiMiC:
        """Fit the map (and the gate) per site from unpaired positive (N₊, d) and negative
        (N₋, d) rows."""
        start = time.perf_counter()
        sites = paired_sites(positive, negative, "MiMiC")
        A, b, w, b0, mu_neg, mu_pos = {}, {}, {}, {}, {}, {}
        regularised: dict[str, float] = {}
        gate_info: dict[str, dict[str, float]] = {}
        n_pos = n_neg = 0
        for s in sites:
            pos, neg = two_class_rows(positive[s], negative[s], "MiMiC")
            n_pos, n_neg, d = pos.shape[0], neg.shape[0], pos.shape[1]
            reg = self.reg
            if covariance_is_singular(neg, reg) or covariance_is_singular(pos, reg):
                v_bar = float((neg.var(0, unbiased=False).sum()
                               + pos.var(0, unbiased=False).sum()) / (2 * d))
                floor = REG_FLOOR * v_bar if v_bar > 0 else 1e-6
                reg = max(reg, floor)
                regularised[str(s)] = reg
                warnings.warn(
                    f"MiMiC at {s}: a class covariance is singular ({n_neg} negative and "
                    f"{n_pos} positive rows for width {d}); the map on the unseen directions is "
                    f"set by the regulariser, reg = {reg:.3g}. Collect more rows than the width "
                    f"for a meaningful covariance match.",
                    stacklevel=2,
                )
            A64, b64 = gaussian_ot_map(neg, pos, reg)
            A[s], b[s] = A64.to(torch.float32), b64.to(torch.float32)
            mu_neg[s], mu_pos[s] = neg.mean(0), pos.mean(0)
            if self.only_negative:
                w[s], b0[s], gate_info[str(s)] = self._fit_gate(pos, neg)
        self._set_state(A, b, w, b0)
        self.mu_neg, self.mu_pos = mu_neg, mu_pos
        self.fit_info.update(
            fit_seconds=round(time.perf_counter() - start, 3),
            n_positive=int(n_pos), n_negative=int(n_neg), reg=self.reg,
            regularised=regularised,
        )
        if self.only_negative:
            self.fit_info["gate"] = gate_info
        return self

    def _fit_gate(self, pos: torch.Tensor, neg: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        from sklearn.linear_model import LogisticRegression

        X = torch.cat([pos, neg]).to(torch.float64).numpy()
        y = np.concatenate([np.ones(pos.shape[0]), np.zeros(neg.shape[0])])
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter)
        clf.fit(X, y)
        w = torch.from_numpy(np.asarray(clf.coef_, dtype=np.float64).reshape(-1))
        b0 = torch.from_numpy(np.asarray(clf.intercept_, dtype=np.float64).reshape(1))
        score = torch.from_numpy(X) @ w + b0
        pred_neg = score < 0
        info = {
            "train_accuracy": round(float((pred_neg == torch.from_numpy(y == 0)).double()
                                          .mean()), 4),
            "negatives_moved": round(float(pred_neg[pos.shape[0]:].double().mean()), 4),
            "positives_moved": round(float(pred_neg[: pos.shape[0]].double().mean()), 4),
        }
        return w.to(torch.float32), b0.to(torch.float32), info

    def _set_state(self, A: dict[Site, torch.Tensor], b: dict[Site, torch.Tensor],
                   w: dict[Site, torch.Tensor], b0: dict[Site, torch.Tensor]) -> None:
        for name, group in (("A", A), ("b", b), ("w", w), ("b0", b0)):
            for s, t in group.items():
                check_finite(f"MiMiC {name} at {s}", t)
        self.A = {s: t.to(torch.float32) for s, t in A.items()}
        self.b = {s: t.to(torch.float32) for s, t in b.items()}
        self.w = {s: t.to(torch.float32) for s, t in w.items()}
        self.b0 = {s: t.to(torch.float32).reshape(1) for s, t in b0.items()}
        self.sites = sorted(self.A)
        self._cast.clear()

    # -- run time ------------------------------------------------------------------------------
    def _params(self, site: Site, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        def make() -> tuple[torch.Tensor, ...]:
            self.check_site(site)
            A = self.A[site].to(torch.float64)
            M = A - torch.eye(A.shape[0], dtype=torch.float64)  # T(x) − x = M x + b
            # M is symmetric, so x M = (M x)ᵀ for row vectors x.
            p = tuple(t.to(device=h.device, dtype=h.dtype) for t in (M, self.b[site]))
            if self.only_negative:  # the gate's score in float32 (or float64) at least
                gd = torch.float64 if h.dtype == torch.float64 else torch.float32
                p += tuple(t.to(device=h.device, dtype=gd) for t in (self.w[site],
                                                                      self.b0[site]))
            return p

        p = cached(self._cast, (site, h.dtype, h.device), make)
        check_width(f"MiMiC at {site} maps width", p[1].shape[-1], h)
        return p

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        self.check_fitted()
        p = self._params(site, h)
        lam = check_strength_rows(strength, h)
        moved = h + lam * torch.addmm(p[1], h.reshape(-1, h.shape[-1]), p[0]).reshape(h.shape)
        if not self.only_negative:
            return moved
        gate = (h.to(p[2].dtype) @ p[2] + p[3]) < 0  # the classifier predicts negative
        return torch.where(gate[..., None], moved, h)

    def transport(self, site: Site, x: torch.Tensor, *, gated: bool = True) -> torch.Tensor:
        """The map at λ = 1 on (…, d) activations (gated like ``steer`` unless told not)."""
        self.check_fitted()
        if site not in self.A:
            raise SteeringError(f"this MiMiC was not fitted at {site}")
        A, b = self.A[site].to(x.dtype), self.b[site].to(x.dtype)
        out = x @ A + b
        if gated and self.only_negative:
            gate = (x @ self.w[site].to(x.dtype) + self.b0[site].to(x.dtype)) < 0
            out = torch.where(gate[..., None], out, x)
        return out

    # -- artifacts -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        self.check_fitted()
        out: dict[str, torch.Tensor] = {}
        for s in self.sites:
            out[f"{s}.A"] = self.A[s].contiguous()
            out[f"{s}.b"] = self.b[s].contiguous()
            if self.only_negative:
                out[f"{s}.w"] = self.w[s].contiguous()
                out[f"{s}.b0"] = self.b0[s].contiguous()
            if s in self.mu_neg and s in self.mu_pos:
                out[f"{s}.mu_neg"] = self.mu_neg[s].contiguous()
                out[f"{s}.mu_pos"] = self.mu_pos[s].contiguous()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        if not sites:
            raise SteeringError("the saved MiMiC state names no sites")
        A, b, w, b0 = {}, {}, {}, {}
        for s in sites:
            A[s], b[s] = tensors[f"{s}.A"], tensors[f"{s}.b"]
            d = b[s].shape[-1]
            if A[s].shape != (d, d) or b[s].ndim != 1:
                raise SteeringError(f"the saved MiMiC map at {s} has shapes "
                                    f"{tuple(A[s].shape)} and {tuple(b[s].shape)}")
            if self.only_negative:
                w[s], b0[s] = tensors[f"{s}.w"], tensors[f"{s}.b0"]
                if w[s].shape != (d,) or b0[s].numel() != 1:
                    raise SteeringError(f"the saved MiMiC classifier at {s} has shapes "
                                        f"{tuple(w[s].shape)} and {tuple(b0[s].shape)}")
        self._set_state(A, b, w, b0)
        self.mu_neg = {s: tensors[f"{s}.mu_neg"].to(torch.float32) for s in sites
                       if f"{s}.mu_neg" in tensors}
        self.mu_pos = {s: tensors[f"{s}.mu_pos"].to(torch.float32) for s in sites
                       if f"{s}.mu_pos" in tensors}
