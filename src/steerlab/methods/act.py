"""AcT: Activation Transport, the Mean-AcT and Linear-AcT maps.

Rodriguez, Blaas, Klein, Zappella, Apostoloff, Cuturi, Suau, "Controlling Language and
Diffusion Models by Transporting Activations", ICLR 2025 (reference code: apple/ml-act,
``act/hooks/transport.py``, ``act/optimal_transport/{ot_maps,archs}.py``).

AcT moves the activations of a source distribution (here the **negative** class, the
behaviour to steer away from) onto a target distribution (the **positive** class) with an
independent 1-D transport map per dimension j, ``T_j(x) = ω_j x + β_j``.

**Linear-AcT** (ml-act's ``LinearOTHook``, ``intervention_params=linear_ot``). Take n source
values a_1..a_n and n target values b_1..b_n of dimension j and sort each. Between two
empirical measures of n equal-weight points on the line, the optimal coupling pairs the order
statistics a_(i) ↔ b_(i). AcT fits the affine map by least squares on these pairs (closed form,
``LinearProj.optimize``):

    ω_j = Σ_i (a_(i) − m_a)(b_(i) − m_b) / Σ_i (a_(i) − m_a)²,     β_j = m_b − ω_j m_a

with m_a, m_b the sample means. For Gaussian classes ω_j → σ₊/σ₋ and β_j → μ₊ − ω_j μ₋, the
1-D OT map between N(μ₋, σ₋²) and N(μ₊, σ₊²).

*Support.* ml-act's Linear-AcT configuration (``quantiles_src: q_0_100``) applies the map only
where the value lies strictly inside the range of the source samples, min_i a_i < h_j < max_i
a_i, dimension by dimension, and leaves the other values alone (``support=True``, the
default here). Mean-AcT's configuration uses the whole line (``q_all``; ``support=False``).

*Unequal sample counts.* ml-act's ``solve_ot_1d`` asserts equal counts; its pipeline makes
them equal by randomly subsampling the larger class to the size of the smaller
(``label_src_dst_subsets(balanced=True, seed)``). ``balance="subsample"`` (default) does the
same with a seeded generator (the same rows at every site); ``balance="quantile"`` keeps every
row instead, evaluating the larger class's empirical quantile function (linear interpolation)
at the n levels i/(n−1) of the smaller one's order statistics.

**Mean-AcT** (ml-act's ``OnlyMeanHook``, ``intervention_params=mean_ot``): the Gaussian map
with the scale forced to one, ω = 1 and β_j = μ₊,j − μ₋,j (class means), on the dimensions
where both classes' standard deviations exceed ``std_eps`` (1e-4, as ml-act); β_j = 0 on the
others. For unpaired data this is the mean difference of CAA, fitted from unpaired samples.

**Strength.** AcT's strength λ interpolates between the identity and the map, z′ = λ T(z) +
(1 − λ) z, i.e.

    h′ = h + λ (T(h) − h) = h + λ ((ω − 1) ⊙ h + β)      (inside the support, if any)

so λ = 1 is the full transport, λ = 0 the identity (bit-exact), and λ < 0 extrapolates away
from the target.

**Where steerlab differs from ml-act.** ml-act fits on activations mean-pooled over every token
of each sentence at the output of every LayerNorm (Gemma-2: ``post_attention_layernorm`` and
``post_feedforward_layernorm``) and intervenes on all positions; steerlab fits at the chosen
residual blocks (``resid_post``/``resid_pre``) with the recipe's token (``last``, ``mean`` or the
A/B ``ab`` letter, as CAA) and steers its token scope (default ``last``). Linear-AcT: dimensions
whose source standard deviation is at most ``std_eps`` are left as the identity (ω = 1,
β = 0), where ml-act adds N(0, 10⁻¹⁶) noise to avoid a division by zero (its support then
excludes them anyway, a constant's open range being empty); the support bounds come from
every negative row, not only the subsampled ones. Mean-AcT uses every row of both classes
(its means need no pairing) rather than the balanced subsample.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from steerlab.errors import DataError, SteeringError
from steerlab.methods.additive import Recipe as Recipe
from steerlab.methods.additive import SiteKind as SiteKindArg
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.cast_cache import CastCache, cached
from steerlab.methods.checks import (
    check_finite,
    check_positive,
    check_recipe,
    check_site_kind,
    check_width,
    two_class_rows,
)

# The argument and data checks AcT shared with MiMiC live in methods/checks.py; they keep
# this import path.
from steerlab.methods.checks import check_strength_rows as check_strength_rows
from steerlab.methods.checks import layers_arg as layers_arg
from steerlab.methods.checks import paired_sites as paired_sites
from steerlab.sites import Site

Balance = Literal["subsample", "quantile"]


def check_common(method: str, site: str, recipe: str) -> None:
    """The recipe and the residual site kind of an AcT or MiMiC controller."""
    check_recipe(recipe, method)
    check_site_kind(site, f"{method} steers")


# -- estimators ------------------------------------------------------------------------------
def match_counts(source: torch.Tensor, target: torch.Tensor, balance: Balance = "subsample",
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Make (N₋, d) source and (N₊, d) target samples the same size n = min(N₋, N₊).

    ``"subsample"``: a seeded random subset of the larger class's rows (ml-act). ``"quantile"``:
    the larger class's per-dimension empirical quantiles (linear interpolation) at the levels
    i/(n−1), i = 0..n−1, returned sorted; the smaller class is returned as is.
    """
    n_s, n_t = source.shape[0], target.shape[0]
    if n_s == n_t:
        return source, target
    n = min(n_s, n_t)
    big = source if n_s > n_t else target
    if balance == "subsample":
        g = torch.Generator().manual_seed(int(seed))
        reduced = big[torch.randperm(big.shape[0], generator=g)[:n]]
    elif balance == "quantile":
        srt = torch.sort(big, dim=0).values
        level = torch.arange(n, dtype=torch.float64) * ((big.shape[0] - 1) / (n - 1))
        lo = level.floor().to(torch.long).clamp(max=big.shape[0] - 2)
        frac = (level - lo.to(torch.float64)).to(srt.dtype)[:, None]
        reduced = srt[lo] * (1 - frac) + srt[lo + 1] * frac
    else:
        raise SteeringError(f"unknown balance {balance!r}; use subsample or quantile")
    return (reduced, target) if n_s > n_t else (source, reduced)


def linear_act_map(source: torch.Tensor, target: torch.Tensor, *,
                   std_eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear-AcT's per-dimension (ω, β) from equal-size (n, d) source and target samples.

    Sorts each dimension of both (the 1-D OT coupling), then least squares on the sorted
    pairs: ω = Σ ã b̃ / Σ ã², β = m_b − ω m_a (ã, b̃ centred). Dimensions whose source standard
    deviation is at most ``std_eps`` get the identity (ω = 1, β = 0). Returns float32 ω, β and
    the boolean mask of those identity dimensions.
    """
    if source.shape != target.shape:
        raise DataError(
            f"linear_act_map needs equal-size samples, got {tuple(source.shape)} and "
            f"{tuple(target.shape)}; use match_counts first"
        )
    a = torch.sort(source.to(torch.float64), dim=0).values
    b = torch.sort(target.to(torch.float64), dim=0).values
    m_a, m_b = a.mean(0), b.mean(0)
    a_c, b_c = a - m_a, b - m_b
    den = (a_c * a_c).sum(0)
    flat = a.std(dim=0) <= std_eps
    omega = torch.where(flat, torch.ones_like(den),
                        (a_c * b_c).sum(0) / torch.where(flat, torch.ones_like(den), den))
    beta = torch.where(flat, torch.zeros_like(den), m_b - omega * m_a)
    return omega.to(torch.float32), beta.to(torch.float32), flat


def mean_act_shift(source: torch.Tensor, target: torch.Tensor, *,
                   std_eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-AcT's β = μ_target − μ_source on dimensions where both standard deviations exceed
    ``std_eps`` (0 elsewhere), and the boolean mask of the dimensions left alone."""
    a, b = source.to(torch.float64), target.to(torch.float64)
    flat = (a.std(dim=0) <= std_eps) | (b.std(dim=0) <= std_eps)
    beta = torch.where(flat, torch.zeros(a.shape[1], dtype=torch.float64),
                       b.mean(0) - a.mean(0))
    return beta.to(torch.float32), flat


# -- the controllers -------------------------------------------------------------------------
class _AcT(Controller):
    """Per-dimension affine transport h ↦ h + λ((ω − 1) ⊙ h + β), optionally on the support
    lo < h < hi only. Subclasses implement ``fit``."""

    omega: dict[Site, torch.Tensor]
    beta: dict[Site, torch.Tensor]
    lo: dict[Site, torch.Tensor]
    hi: dict[Site, torch.Tensor]

    def __init__(self, layers: int | Sequence[int], *, site: SiteKindArg, recipe: Recipe,
                 scope: str, support: bool, std_eps: float) -> None:
        super().__init__()
        check_common(type(self).__name__, site, recipe)
        self.layers = layers_arg(layers)
        self.site: SiteKindArg = site
        self.recipe: Recipe = recipe
        self._set_scope(scope)
        self.support = bool(support)
        self.std_eps = check_positive("std_eps", std_eps, allow_zero=True)
        self.omega, self.beta, self.lo, self.hi = {}, {}, {}, {}
        self._cast: CastCache[tuple[torch.Tensor, ...]] = {}

    def fit_sites(self) -> list[Site]:
        return [Site(self.site, layer) for layer in self.layers]

    def _set_maps(self, omega: dict[Site, torch.Tensor], beta: dict[Site, torch.Tensor],
                  lo: dict[Site, torch.Tensor], hi: dict[Site, torch.Tensor]) -> None:
        for name, group in (("omega", omega), ("beta", beta)):
            for s, t in group.items():
                check_finite(f"{name} at {s}", t)
        self.omega = {s: t.to(torch.float32) for s, t in omega.items()}
        self.beta = {s: t.to(torch.float32) for s, t in beta.items()}
        self.lo = {s: t.to(torch.float32) for s, t in lo.items()}
        self.hi = {s: t.to(torch.float32) for s, t in hi.items()}
        self.sites = sorted(self.omega)
        self._cast.clear()

    # -- run time ------------------------------------------------------------------------------
    def _params(self, site: Site, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ω − 1, β, lo, hi) at ``site`` in ``h``'s dtype and device, cached."""
        def make() -> tuple[torch.Tensor, ...]:
            self.check_site(site)
            scale = self.omega[site] - 1
            return tuple(t.to(device=h.device, dtype=h.dtype)
                         for t in (scale, self.beta[site], self.lo[site], self.hi[site]))

        p = cached(self._cast, (site, h.dtype, h.device), make)
        check_width(f"{type(self).__name__} at {site} maps width", p[1].shape[-1], h)
        return p

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        self.check_fitted()
        # Half-precision activations are mapped in float32 (as ml-act's hooks do), so the
        # support test compares the same numbers as a float32 model would; cheap, elementwise.
        x = h if h.dtype in (torch.float32, torch.float64) else h.to(torch.float32)
        scale, beta, lo, hi = self._params(site, x)
        lam = check_strength_rows(strength, x)
        delta = torch.addcmul(beta, x, scale)  # T(h) − h = (ω − 1) ⊙ h + β
        if self.support:
            delta = torch.where((x > lo) & (x < hi), delta, torch.zeros_like(delta))
        return (x + lam * delta).to(h.dtype)

    def transport(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        """The full map T at ``site`` (λ = 1) on (…, d) activations, support included."""
        lam = torch.ones(x.reshape(-1, x.shape[-1]).shape[0], dtype=torch.float32)
        flat = x.reshape(-1, 1, x.shape[-1])
        ctx = StepContext(positions=torch.zeros(flat.shape[0], 1, dtype=torch.long),
                          prompt_len=torch.ones(flat.shape[0], dtype=torch.long))
        return self.steer(site, flat, lam, ctx).reshape(x.shape)

    # -- artifacts -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        self.check_fitted()
        out: dict[str, torch.Tensor] = {}
        for s in self.sites:
            out.update({f"{s}.omega": self.omega[s].contiguous(),
                        f"{s}.beta": self.beta[s].contiguous(),
                        f"{s}.lo": self.lo[s].contiguous(),
                        f"{s}.hi": self.hi[s].contiguous()})
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        if not sites:
            raise SteeringError(f"the saved {type(self).__name__} state names no sites")
        parts: dict[str, dict[Site, torch.Tensor]] = {k: {} for k in ("omega", "beta", "lo",
                                                                       "hi")}
        for s in sites:
            for k, group in parts.items():
                if f"{s}.{k}" not in tensors:
                    raise KeyError(f"{s}.{k}")
                group[s] = tensors[f"{s}.{k}"].to(torch.float32)
            shapes = {tuple(parts[k][s].shape) for k in parts}
            if len(shapes) != 1 or len(next(iter(shapes))) != 1:
                raise SteeringError(f"the saved {type(self).__name__} tensors at {s} have "
                                    f"shapes {sorted(shapes)}, expected four (d,) vectors")
        self._set_maps(parts["omega"], parts["beta"], parts["lo"], parts["hi"])


class LinearAcT(_AcT):
    """Linear-AcT: per-dimension affine optimal transport from the negative to the positive
    class, fitted on sorted samples (see the module docstring for the equations).

    Args:
        layers: block index or indices to steer.
        site: ``"resid_post"`` (block output) or ``"resid_pre"`` (block input).
        recipe: which token the fit reads (``"ab"``, ``"last"``, ``"mean"``), as CAA.
        scope: default token scope (``"all"``: AcT maps every token's activations).
        support: apply the map only strictly inside the negative samples' [min, max] range,
            per dimension (ml-act's Linear-AcT default, ``q_0_100``).
        balance: unequal class sizes: ``"subsample"`` the larger class at random (ml-act) or
            match ``"quantile"``s of the larger class.
        seed: seed of the subsample.
        std_eps: dimensions whose negative-class standard deviation is at most this are left
            alone.

    Learned (per site, float32 (d,) tensors): ``omega``, ``beta``, and the support bounds
    ``lo``, ``hi``.
    """

    method: ClassVar[str] = "linear_act"

    def __init__(
        self,
        layers: int | Sequence[int] = 15,
        *,
        site: SiteKindArg = "resid_post",
        recipe: Recipe = "last",
        scope: str = "all",
        support: bool = True,
        balance: Balance = "subsample",
        seed: int = 0,
        std_eps: float = 1e-4,
    ) -> None:
        super().__init__(layers, site=site, recipe=recipe, scope=scope, support=support,
                         std_eps=std_eps)
        if balance not in ("subsample", "quantile"):
            raise SteeringError(f"unknown balance {balance!r}; use subsample or quantile")
        self.balance: Balance = balance
        self.seed = int(seed)

    def fit(self, positive: dict[Site, torch.Tensor],
            negative: dict[Site, torch.Tensor]) -> LinearAcT:
        """Fit (ω, β) per site from unpaired positive (N₊, d) and negative (N₋, d) rows."""
        start = time.perf_counter()
        sites = paired_sites(positive, negative, "LinearAcT")
        omega, beta, lo, hi = {}, {}, {}, {}
        identity: dict[str, int] = {}
        n_pos = n_neg = n_used = 0
        for s in sites:
            pos, neg = two_class_rows(positive[s], negative[s], "Linear-AcT")
            src, tgt = match_counts(neg, pos, self.balance, self.seed)
            omega[s], beta[s], flat = linear_act_map(src, tgt, std_eps=self.std_eps)
            lo[s], hi[s] = neg.amin(0), neg.amax(0)
            identity[str(s)] = int(flat.sum())
            n_pos, n_neg, n_used = pos.shape[0], neg.shape[0], src.shape[0]
        self._set_maps(omega, beta, lo, hi)
        self.fit_info.update(
            fit_seconds=round(time.perf_counter() - start, 3),
            n_positive=int(n_pos), n_negative=int(n_neg), n_matched=int(n_used),
            balance=self.balance, identity_dims=identity,
            omega_median={str(s): round(float(w.median()), 4) for s, w in omega.items()},
            beta_norm={str(s): round(float(b.norm()), 4) for s, b in beta.items()},
        )
        return self


class MeanAcT(_AcT):
    """Mean-AcT: ω = 1, β = μ₊ − μ₋ per dimension (ml-act's ``OnlyMeanHook``); see the module
    docstring.

    Args:
        layers, site, recipe, scope: as :class:`LinearAcT`.
        support: restrict to the negative samples' range (off by default, ml-act's ``q_all``).
        std_eps: dimensions where either class's standard deviation is at most this are left
            alone (ml-act's mask).

    Learned (per site, float32 (d,)): ``omega`` (all ones), ``beta``, ``lo``, ``hi``.
    """

    method: ClassVar[str] = "mean_act"

    def __init__(
        self,
        layers: int | Sequence[int] = 15,
        *,
        site: SiteKindArg = "resid_post",
        recipe: Recipe = "last",
        scope: str = "all",
        support: bool = False,
        std_eps: float = 1e-4,
    ) -> None:
        super().__init__(layers, site=site, recipe=recipe, scope=scope, support=support,
                         std_eps=std_eps)

    def fit(self, positive: dict[Site, torch.Tensor],
            negative: dict[Site, torch.Tensor]) -> MeanAcT:
        """Fit β = μ₊ − μ₋ per site from unpaired positive and negative rows."""
        start = time.perf_counter()
        sites = paired_sites(positive, negative, "MeanAcT")
        omega, beta, lo, hi = {}, {}, {}, {}
        masked: dict[str, int] = {}
        n_pos = n_neg = 0
        for s in sites:
            pos, neg = two_class_rows(positive[s], negative[s], "Mean-AcT")
            beta[s], flat = mean_act_shift(neg, pos, std_eps=self.std_eps)
            omega[s] = torch.ones_like(beta[s])
            lo[s], hi[s] = neg.amin(0), neg.amax(0)
            masked[str(s)] = int(flat.sum())
            n_pos, n_neg = pos.shape[0], neg.shape[0]
        self._set_maps(omega, beta, lo, hi)
        self.fit_info.update(
            fit_seconds=round(time.perf_counter() - start, 3),
            n_positive=int(n_pos), n_negative=int(n_neg), identity_dims=masked,
            beta_norm={str(s): round(float(b.norm()), 4) for s, b in beta.items()},
        )
        return self

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        if self.support:
            return super().steer(site, h, strength, ctx)
        self.check_fitted()
        _, beta, _, _ = self._params(site, h)
        return h + check_strength_rows(strength, h) * beta  # ω = 1: a constant shift, as CAA

    def vectors_by_layer(self) -> dict[int, torch.Tensor] | None:
        if self.support or any(s.kind != "resid_post" for s in self.beta):
            return None
        return {s.layer: v for s, v in self.beta.items()}
