"""RepE: the first principal component of contrastive activations as a steering direction.

Zou et al., "Representation Engineering: A Top-Down Approach to AI Transparency" (2023;
reference code andyzoujm/representation-engineering, ``rep_reading_pipeline.py`` and
``rep_readers.py``), and repeng's ``pca_diff`` / ``pca_center`` (vgel/repeng, ``extract.py``).

For a site with positive rows a⁺_i and negative rows a⁻_j (``(N, d)`` each), class means μ₊, μ₋,
the direction θ̂ (unit norm) is the first principal axis of

* ``variant="pca_diff"`` (default; needs paired rows, N₊ = N₋): the pair differences
  d_i = a⁺_i − a⁻_i, each taken in both orders (d_i and −d_i). That set has mean exactly 0,
  so centring, which every PCA does, cannot erase the class gap, and θ̂ is the top right
  singular vector of the uncentred D = [d_i]. RepE itself puts each pair in one random order
  (``random.shuffle`` of each pair in its data helpers), differences consecutive rows, then
  centres and runs PCA: ``seed=<int>`` does exactly that (signs s_i = ±1 drawn with the
  seed; PCA of the centred s_i d_i). Both orders at once is the deterministic limit of that
  shuffle: Σ (s_i d_i)(s_i d_i)ᵀ = Σ d_i d_iᵀ for any signs, only RepE's small random mean
  term differs. (repeng neither shuffles nor skips the centring, so its ``pca_diff`` finds
  the top axis of the differences' variance *about their mean* instead; ODESteer's RepE
  baseline does the same. We follow RepE.)
* ``variant="pca_center"``: the activations centred per pair, a⁺_i − c_i and a⁻_i − c_i with
  c_i = (a⁺_i + a⁻_i)/2 (repeng's ``pca_center``). With paired rows these are ±d_i/2, so
  this equals ``pca_diff`` with ``seed=None`` exactly. Unpaired rows (N₊ ≠ N₋, e.g. a
  labelled set) are centred on the midpoint of the class means m = (μ₊ + μ₋)/2 instead, and
  each class gets equal weight: θ̂ is the top eigenvector of ½(S₊ + S₋) with
  S_± = mean over the class of (a − m)(a − m)ᵀ, i.e. within-class scatter plus ¼ΔΔᵀ.

Rows count as paired when N₊ = N₋ (row i of each side from the same prompt, as the fitting
helpers give for contrastive sets). The sign is fixed so that the positive class projects
higher on average: (μ₊ − μ₋)·θ̂ ≥ 0 (RepE and repeng fix it by the majority of pairwise
comparisons; the two agree on all but degenerate data).

Steering adds v_site at strength m, h' = h + m·v (as CAA), with

* ``scale="projected"`` (default): v = θ̂ ((μ₊ − μ₋)·θ̂), the class-mean gap along θ̂, so
  strength 1 moves an activation by the component of the mean difference that lies on θ̂
  (strengths comparable with CAA's);
* ``scale="unit"``: v = θ̂ (strength in activation units, as the ODESteer and ITI baselines).

``fit_info`` records, per site, the explained-variance ratio of the component (σ₁²/Σσ²) and
its cosine with the mean difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch

from steerlab.errors import DataError, SteeringError

# The direction base class and its literals live in methods/additive.py; they keep this path.
from steerlab.methods.additive import DirectionController as DirectionController
from steerlab.methods.additive import Recipe
from steerlab.methods.additive import Scale as Scale
from steerlab.methods.additive import SiteKind as SiteKind
from steerlab.sites import Site

Variant = Literal["pca_diff", "pca_center"]


def top_component(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The top right singular vector of ``x`` (N, d), uncentred, and σ₁²/Σσ² (float64 SVD)."""
    s_vals, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)[1:]
    total = float((s_vals**2).sum())
    ratio = float(s_vals[0] ** 2) / total if total > 0 else 0.0
    return vh[0].to(torch.float32), ratio


def pair_flips(n: int, seed: int) -> torch.Tensor:
    """RepE's random pair order as signs s_i = ±1 (``n`` pairs, seeded torch generator)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1


class RepE(DirectionController):
    """RepE / repeng PCA direction; see the module docstring for the equations.

    Args:
        layers: block index or indices to steer.
        site: ``"resid_post"`` (block output) or ``"resid_pre"`` (block input).
        recipe: ``"ab"``, ``"last"`` or ``"mean"`` (which token the fit reads, as CAA's).
        variant: ``"pca_diff"`` (pair differences, default) or ``"pca_center"``.
        seed: ``None`` (default) takes every pair in both orders (deterministic); an integer
            reproduces RepE's one random order per pair with that seed (``pca_diff`` only).
        scale: ``"projected"`` (v = θ̂ ((μ₊ − μ₋)·θ̂), default) or ``"unit"`` (v = θ̂).
        scope: default token scope.
    """

    method: ClassVar[str] = "repe"
    _name: ClassVar[str] = "RepE"

    def __init__(
        self,
        layers: int | Sequence[int] = 15,
        *,
        site: SiteKind = "resid_post",
        recipe: Recipe = "last",
        variant: Variant = "pca_diff",
        seed: int | None = None,
        scale: Scale = "projected",
        scope: str = "all",
    ) -> None:
        super().__init__(layers, site=site, recipe=recipe, scale=scale, scope=scope)
        if variant not in ("pca_diff", "pca_center"):
            raise SteeringError(f"unknown RepE variant {variant!r}; use pca_diff or pca_center")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise SteeringError(f"seed must be an integer or None, got {seed!r}")
        if seed is not None and variant != "pca_diff":
            raise SteeringError("seed (RepE's random pair order) applies to pca_diff only")
        self.variant: Variant = variant
        self.seed = seed

    def fit(
        self, positive: dict[Site, torch.Tensor], negative: dict[Site, torch.Tensor]
    ) -> RepE:
        """Learn θ̂ per site from positive (N₊, d) and negative (N₋, d) activations."""
        self._fit_directions(positive, negative)
        self.fit_info.update(variant=self.variant, seed=self.seed)
        return self

    def direction(
        self, site: Site, pos: torch.Tensor, neg: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        paired = pos.shape == neg.shape
        if self.variant == "pca_diff":
            if not paired:
                raise DataError(
                    f"RepE pca_diff needs paired rows (as many positive as negative, row i of "
                    f"each from the same prompt); got {pos.shape[0]} positive and "
                    f"{neg.shape[0]} negative at {site}. Use variant='pca_center' (or the "
                    f"probe direction) for unpaired data"
                )
            diff = pos - neg
            if self.seed is not None:
                flipped = diff * pair_flips(diff.shape[0], self.seed)[:, None]
                train = flipped - flipped.mean(0)
            else:
                train = diff
        elif paired:
            center = (pos + neg) / 2
            train = torch.cat([pos - center, neg - center])
        else:
            mid = (pos.mean(0) + neg.mean(0)) / 2
            train = torch.cat([(pos - mid) / pos.shape[0] ** 0.5,
                               (neg - mid) / neg.shape[0] ** 0.5])
        if not bool(train.abs().amax() > 0):
            raise DataError(f"RepE: no variation to analyse at {site} (every pair is identical)")
        theta, ratio = top_component(train)
        if float((pos.mean(0) - neg.mean(0)) @ theta) < 0:
            theta = -theta
        return theta, {"explained_variance_ratio": round(ratio, 4), "paired": paired}
