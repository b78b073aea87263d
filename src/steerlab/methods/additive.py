"""Additive controllers: a fixed vector per site added at the steering strength.

:class:`AdditiveController` is h' = h + strength · v_site (CAA, ActAdd, ITI and the direction
methods); :class:`DirectionController` is an additive controller whose vector is a learned
unit direction θ̂ times a scale (RepE, the probe direction). ``Recipe`` names which token of
each example the fit helpers read.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch

from steerlab.errors import SteeringError
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.cast_cache import CastCache, cached, cast_like
from steerlab.methods.checks import (
    check_finite,
    check_recipe,
    check_site_kind,
    check_width,
    covered_sites,
    layers_arg,
    two_class_rows,
)
from steerlab.sites import Site

Recipe = Literal["ab", "last", "mean"]  # checks.RECIPES
SiteKind = Literal["resid_post", "resid_pre"]
Scale = Literal["projected", "unit"]


class AdditiveController(Controller):
    """A controller that adds a fixed vector per site: h' = h + strength · v_site."""

    vectors: dict[Site, torch.Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.vectors = {}
        self._cast: CastCache[torch.Tensor] = {}

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        v = cached(self._cast, (site, h.dtype, h.device), lambda: cast_like(self.vectors[site], h))
        check_width(f"vector at {site} has width", v.shape[-1], h)
        return h + strength.to(h.dtype)[:, None, None] * v

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(s): v.contiguous() for s, v in self.vectors.items()}

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        self.vectors = {s: tensors[str(s)].to(torch.float32) for s in sites}
        self.sites = list(sites)
        self._cast.clear()

    def set_vectors(self, vectors: dict[Site, torch.Tensor]) -> None:
        for s, v in vectors.items():
            check_finite(f"steering vector at {s}", v)
        self.vectors = {s: v.to(torch.float32) for s, v in vectors.items()}
        self.sites = sorted(self.vectors)
        self._cast.clear()

    def vectors_changed(self) -> None:
        """Call after editing ``vectors`` in place: the prepared casts are stale."""
        self._cast.clear()

    def vectors_by_layer(self) -> dict[int, torch.Tensor] | None:
        if any(s.kind != "resid_post" for s in self.vectors):
            return None
        return {s.layer: v for s, v in self.vectors.items()}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


class DirectionController(AdditiveController):
    """An additive controller whose vector is a learned unit direction θ̂ times a scale.

    Subclasses implement :meth:`direction`; this class handles the sites, the sign convention,
    the ``scale`` option and the artifact state (vectors and directions).
    """

    directions: dict[Site, torch.Tensor]
    _name: ClassVar[str] = "direction"

    def __init__(
        self,
        layers: int | Sequence[int],
        *,
        site: SiteKind,
        recipe: Recipe,
        scale: Scale,
        scope: str,
    ) -> None:
        super().__init__()
        check_recipe(recipe)
        check_site_kind(site, f"{self._name} steers")
        if scale not in ("projected", "unit"):
            raise SteeringError(f"unknown scale {scale!r}; use projected or unit")
        self.layers = layers_arg(layers)
        self.site: SiteKind = site
        self.recipe: Recipe = recipe
        self.scale: Scale = scale
        self._set_scope(scope)
        self.directions = {}

    def fit_sites(self) -> list[Site]:
        return [Site(self.site, layer) for layer in self.layers]

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        if not self.vectors:
            self.check_fitted()
        return super().steer(site, h, strength, ctx)

    @abstractmethod
    def direction(
        self, site: Site, pos: torch.Tensor, neg: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The unit direction at ``site`` from validated float32 rows, and fit figures."""

    def _fit_directions(
        self, positive: dict[Site, torch.Tensor], negative: dict[Site, torch.Tensor]
    ) -> None:
        directions: dict[Site, torch.Tensor] = {}
        vectors: dict[Site, torch.Tensor] = {}
        per_site: dict[str, dict[str, Any]] = {}
        for site in covered_sites(positive, negative, self._name):
            pos, neg = two_class_rows(positive[site], negative[site], self._name)
            theta, info = self.direction(site, pos, neg)
            gap = pos.mean(0) - neg.mean(0)
            along = float(gap @ theta)
            vectors[site] = theta * along if self.scale == "projected" else theta.clone()
            directions[site] = theta
            info.update(cos_to_mean_difference=round(_cosine(theta, gap), 4),
                        gap_along_direction=round(along, 4))
            per_site[str(site)] = info
        self.set_vectors(vectors)
        self.directions = directions
        self.fit_info.update(
            n_positive=int(next(iter(positive.values())).shape[0]),
            n_negative=int(next(iter(negative.values())).shape[0]),
            per_site=per_site,
        )

    # -- artifacts -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        self.check_fitted()
        out = super().state_dict()
        out.update({f"direction.{s}": d.contiguous() for s, d in self.directions.items()})
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        super().load_state(tensors, sites)
        directions = {}
        for s in sites:
            d = tensors[f"direction.{s}"].to(torch.float32)
            if d.shape != self.vectors[s].shape:
                raise ValueError(f"direction at {s} has shape {tuple(d.shape)}, its vector "
                                 f"{tuple(self.vectors[s].shape)}")
            directions[s] = d
        self.directions = directions
