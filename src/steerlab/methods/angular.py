"""Angular steering: rotate the activation inside a 2-D plane that holds the feature direction.

Vu & Nguyen, "Angular Steering: Behavior Control via Rotation in Activation Space" (2025;
reference code lone17/angular-steering: ``pytorch_pure/extract_directions.py`` builds the
plane, ``AngularSteeringOperator`` in ``vllm_angular_steering.py`` applies it). The same
rotation, with the target angle as a set point, is the deleted "angular setpoint" variant of
A-LQR (spec ``alqr.md`` §5) and the AAS baseline of its jailbreak experiments (§8).

**Plane.** At each site, with class means μ₊, μ₋ of the positive and negative activations:

* b1 = (μ₊ − μ₋)/‖μ₊ − μ₋‖, the feature direction (angle 0°);
* b2 (``second="pca"``, default): the first principal component of the stacked per-layer
  contrast vectors (``contrast``, (L, d): the mean difference at every layer, which the
  fitting helper collects), orthogonalised against b1 and normalised. As in the reference,
  the PCA centres the L rows; each row is first scaled to unit norm, so that late layers do
  not dominate by their larger activations (the reference gets the same effect by building
  its per-layer vectors from unit-normalised activations). Without ``contrast`` (or when its
  component has no part off b1, e.g. one layer only), b2 is the first principal component of
  the pooled activations of both classes, mean-centred, with b1 projected out;
* b2 (``second="mean"``): the mean activation with b1 projected out, normalised: the plane
  through the feature direction and the typical activation.

The sign of b2 is fixed so that the mean activation projects non-negatively on it, i.e. the
data sits at angles in [0°, 180°]. ``fit_info`` gives the angle of each class mean per site.

**Rotation.** For an activation h, p = (h·b1, h·b2), r = ‖p‖, current angle φ = atan2(p₂, p₁),
target θ (``angle``, degrees from b1 towards b2) and strength s:

    ψ  = φ + s · wrap(θ − φ)            (wrap to [−π, π): the shorter arc)
    h' = h − p₁ b1 − p₂ b2 + r (cos ψ b1 + sin ψ b2)

s = 1 is the paper's operator h' = h − Ph + ‖Ph‖ (cos θ b1 + sin θ b2) (P the projection on
the plane): the plane component is turned to exactly θ; s = 0 is the identity; 0 < s < 1
turns part of the way. Only the plane component changes, and its norm r is kept, so ‖h'‖ =
‖h‖. The arithmetic is float32 (the update is added in the activation's dtype).

**Adaptive** (``adaptive=True``, the paper's Adaptive Angular Steering, ``adaptive_mode=1`` in
the reference): only activations with a positive projection on the feature direction,
h·b1 > 0, are rotated; the others pass unchanged. In the reference, b1 points to the feature
to be controlled (harmful − harmless) and θ ≈ 180° removes it; here b1 points from the
negative to the positive class, so give the feature-bearing examples as the positive class.

Differences from the reference: it rotates at every layer's normalisation inputs with one b1
(chosen from one layer) for all of them; here each site (``resid_post``/``resid_pre`` of the
chosen layers) has its own b1, and b2 is shared up to the orthogonalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch

from steerlab.errors import DataError, SteeringError
from steerlab.methods.additive import Recipe
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.cast_cache import CastCache, cached
from steerlab.methods.checks import (
    check_finite,
    check_number,
    check_recipe,
    check_site_kind,
    check_width,
    covered_sites,
    layers_arg,
    two_class_rows,
)
from steerlab.methods.reading import Collected, ModelLayout, Reading
from steerlab.methods.repe import top_component
from steerlab.sites import Site

Second = Literal["pca", "mean"]
_MIN_OFF_AXIS = 1e-3  # a unit candidate for b2 must keep this much norm once b1 is removed


def _off(u: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """``u`` with its component along the unit vector ``b1`` removed."""
    return u - (u @ b1) * b1


class AngularSteering(Controller):
    """Angular steering in the (b1, b2) plane; see the module docstring for the equations.

    Args:
        layers: block index or indices to steer.
        site: ``"resid_post"`` (block output) or ``"resid_pre"`` (block input).
        recipe: ``"ab"``, ``"last"`` or ``"mean"`` (which token the fit reads, as CAA's).
        angle: target angle θ in degrees, measured from b1 (the positive-class direction)
            towards b2; 0 turns activations onto the positive side, 180 onto the negative.
            A plain attribute: set ``controller.angle`` to sweep it without refitting.
        adaptive: rotate only activations with h·b1 > 0 (Adaptive Angular Steering).
        second: how b2 is chosen, ``"pca"`` (default) or ``"mean"``.
        scope: default token scope.
    """

    method: ClassVar[str] = "angular"

    basis: dict[Site, torch.Tensor]  # (2, d): rows b1, b2

    def __init__(
        self,
        layers: int | Sequence[int] = 15,
        *,
        site: Literal["resid_post", "resid_pre"] = "resid_post",
        recipe: Recipe = "last",
        angle: float = 0.0,
        adaptive: bool = False,
        second: Second = "pca",
        scope: str = "all",
    ) -> None:
        super().__init__()
        check_recipe(recipe)
        check_site_kind(site, "angular steering acts on")
        if second not in ("pca", "mean"):
            raise SteeringError(f"unknown second axis {second!r}; use pca or mean")
        self.layers = layers_arg(layers)
        self.site: Literal["resid_post", "resid_pre"] = site
        self.recipe: Recipe = recipe
        self.angle = angle
        self.adaptive = bool(adaptive)
        self.second: Second = second
        self._set_scope(scope)
        self.basis = {}
        self._cast: CastCache[torch.Tensor] = {}

    @property
    def angle(self) -> float:
        return self._angle

    @angle.setter
    def angle(self, value: float) -> None:
        self._angle = check_number("angle (degrees)", value)

    def fit_sites(self) -> list[Site]:
        return [Site(self.site, layer) for layer in self.layers]

    # -- estimator -----------------------------------------------------------------------------
    def reading(self, model: ModelLayout, data: Any, **options: Any) -> Reading:
        """The class activations at every block of the steered sites' kind, read in one
        pass: the steered sites' give the feature direction, all of them the contrast."""
        reading = super().reading(model, data, **options)
        kind = reading.sites[0].kind
        reading.extras["steered"] = reading.sites
        reading.sites = [Site(kind, i) for i in range(model.num_layers)]
        return reading

    def fit_collected(self, collected: Collected) -> AngularSteering:
        """``fit`` at the steered sites, with the stack of every block's mean difference as
        the contrast."""
        pos, neg = collected.positive, collected.negative
        contrast = torch.stack([pos[s].mean(0) - neg[s].mean(0)
                                for s in collected.reading.sites])
        steered = collected.reading.extras["steered"]
        return self.fit({s: pos[s] for s in steered}, {s: neg[s] for s in steered},
                        contrast=contrast)

    def fit(
        self,
        positive: dict[Site, torch.Tensor],
        negative: dict[Site, torch.Tensor],
        *,
        contrast: torch.Tensor | None = None,
    ) -> AngularSteering:
        """Learn the plane (b1, b2) per site from positive (N₊, d) and negative (N₋, d)
        activations; ``contrast`` (L, d) is the stack of per-layer mean differences used for
        b2 with ``second="pca"``."""
        sites = covered_sites(positive, negative, "angular steering")
        pc = self._contrast_component(contrast) if self.second == "pca" else None
        basis: dict[Site, torch.Tensor] = {}
        per_site: dict[str, dict[str, Any]] = {}
        for site in sites:
            pos, neg = two_class_rows(positive[site], negative[site], "angular steering")
            if pc is not None and pc.shape[0] != pos.shape[1]:
                raise DataError(f"contrast has width {pc.shape[0]} but the activations at "
                                f"{site} have {pos.shape[1]}")
            mu_pos, mu_neg = pos.mean(0), neg.mean(0)
            gap = mu_pos - mu_neg
            if float(gap.norm()) == 0.0:
                raise DataError(f"the class means at {site} coincide: no feature direction")
            b1 = gap / gap.norm()
            b2, source = self._second_axis(site, b1, pos, neg, pc)
            b2 = _off(b2, b1)  # once more, against rounding
            b2 = b2 / b2.norm()
            mean = torch.cat([pos, neg]).mean(0)
            if float(mean @ b2) < 0:
                b2 = -b2
            basis[site] = torch.stack([b1, b2])
            per_site[str(site)] = {
                "b2_source": source,
                "positive_mean_angle": round(self._angle_of(mu_pos, b1, b2), 2),
                "negative_mean_angle": round(self._angle_of(mu_neg, b1, b2), 2),
            }
        for site, b in basis.items():
            check_finite(f"angular basis at {site}", b)
        self.basis = basis
        self.sites = sorted(basis)
        self._cast.clear()
        self.fit_info.update(
            n_positive=int(next(iter(positive.values())).shape[0]),
            n_negative=int(next(iter(negative.values())).shape[0]),
            n_contrast_layers=int(contrast.shape[0]) if contrast is not None else 0,
            per_site=per_site,
        )
        return self

    @staticmethod
    def _angle_of(x: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor) -> float:
        return math.degrees(math.atan2(float(x @ b2), float(x @ b1)))

    @staticmethod
    def _contrast_component(contrast: torch.Tensor | None) -> torch.Tensor | None:
        """The first principal component of the unit-scaled, centred contrast rows, if any."""
        if contrast is None:
            return None
        if not isinstance(contrast, torch.Tensor) or contrast.ndim != 2:
            shape = tuple(contrast.shape) if isinstance(contrast, torch.Tensor) else \
                type(contrast).__name__
            raise DataError(f"contrast must be an (L, d) tensor of per-layer mean differences, "
                            f"got {shape}")
        rows = contrast.detach().to(torch.float32).cpu()
        if not bool(torch.isfinite(rows).all()):
            raise DataError("the contrast vectors have non-finite values (NaN or inf)")
        norms = rows.norm(dim=1)
        rows = rows[norms > 0] / norms[norms > 0, None]
        if rows.shape[0] < 2:
            return torch.zeros(contrast.shape[1])  # nothing to centre: no component
        centred = rows - rows.mean(0)
        if not bool(centred.abs().amax() > 0):
            return torch.zeros(contrast.shape[1])
        return top_component(centred)[0]

    def _second_axis(
        self,
        site: Site,
        b1: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor,
        pc: torch.Tensor | None,
    ) -> tuple[torch.Tensor, str]:
        pooled = torch.cat([pos, neg])
        if self.second == "mean":
            u = _off(pooled.mean(0), b1)
            if float(u.norm()) <= _MIN_OFF_AXIS * float(pooled.mean(0).norm()) or \
                    float(u.norm()) == 0.0:
                raise DataError(f"the mean activation at {site} lies along the feature "
                                f"direction, so it cannot span a plane; use second='pca'")
            return u, "mean"
        if pc is not None:
            u = _off(pc, b1)
            if float(u.norm()) > _MIN_OFF_AXIS:
                return u, "contrast_pca"
        x = pooled - pooled.mean(0)
        x = x - (x @ b1)[:, None] * b1
        if not float(x.abs().amax()) > 1e-5 * max(float(pooled.abs().amax()), 1.0):
            raise DataError(
                f"the activations at {site} vary only along the feature direction, so they "
                f"give no second axis; pass contrast= (per-layer mean differences) or use "
                f"second='mean'"
            )
        return top_component(x)[0], "activation_pca"

    # -- run time ------------------------------------------------------------------------------
    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        self.check_fitted()
        # the rotation is computed in float32 whatever the activation's dtype
        basis = cached(self._cast, (site, h.device),
                       lambda: self.basis[site].to(device=h.device, dtype=torch.float32))
        check_width(f"angular basis at {site} has width", basis.shape[-1], h)
        s = strength.to(device=h.device, dtype=torch.float32).reshape(
            -1, *([1] * (h.ndim - 2)))
        p = h.to(torch.float32) @ basis.T  # (..., 2)
        p1, p2 = p[..., 0], p[..., 1]
        r = torch.hypot(p1, p2)
        phi = torch.atan2(p2, p1)
        theta = math.radians(self._angle)
        turn = torch.remainder(theta - phi + math.pi, 2 * math.pi) - math.pi
        psi = phi + s * turn
        delta = torch.stack([r * torch.cos(psi) - p1, r * torch.sin(psi) - p2], dim=-1)
        moved = h + (delta @ basis).to(h.dtype)
        rotate = (s != 0).expand_as(p1)
        if self.adaptive:
            rotate = rotate & (p1 > 0)
        return torch.where(rotate[..., None], moved, h)

    # -- artifacts -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        self.check_fitted()
        out: dict[str, torch.Tensor] = {}
        for s, b in self.basis.items():
            out[f"b1.{s}"] = b[0].contiguous()
            out[f"b2.{s}"] = b[1].contiguous()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        basis = {}
        for s in sites:
            b1, b2 = tensors[f"b1.{s}"], tensors[f"b2.{s}"]
            if b1.ndim != 1 or b1.shape != b2.shape:
                raise ValueError(f"b1 and b2 at {s} must be vectors of one width, got "
                                 f"{tuple(b1.shape)} and {tuple(b2.shape)}")
            basis[s] = torch.stack([b1, b2]).to(torch.float32)
        self.basis = basis
        self.sites = list(sites)
        self._cast.clear()
