"""Projection clamp: a toy steering method, the one-file example of docs/adding-a-method.md.

This method is made up for the guide; no paper proposes it. It borrows from two that do:
directional ablation (Arditi et al., "Refusal in Language Models Is Mediated by a Single
Direction", NeurIPS 2024), which removes every activation's component along one direction,
and feature clamping (Templeton et al., "Scaling Monosemanticity", Transformer Circuits
Thread 2024), which sets a sparse-autoencoder feature to a fixed value instead of adding to
it.

Fit, at each chosen block L, from the positive rows a⁺ and the negative rows a⁻ read at
the block's output:

    u   = (mean(a⁺) − mean(a⁻)) / ‖mean(a⁺) − mean(a⁻)‖    the unit mean-difference direction
    τ⁺  = stat(a⁺ · u),   τ⁻ = stat(a⁻ · u)                 stat: the mean or the median

Steer, with strength s:

    h' = h + |s| · (τ(s) − h · u) · u,    τ(s) = τ⁺ if s ≥ 0, τ⁻ if s < 0

At s = 1 the component of h along u is clamped to the positive class's τ⁺, wherever it
was (CAA adds one vector to every h, so a token already far along u goes further still);
s = −1 clamps it to the negative class's τ⁻ (the sign reverses the behaviour); |s| < 1
moves it that fraction of the way and |s| > 1 past the target; s = 0 is the identity. The
components orthogonal to u are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch

from steerlab.errors import DataError, SteeringError
from steerlab.methods.base import Controller, Preset, StepContext
from steerlab.methods.cast_cache import CastCache, cached, cast_like
from steerlab.methods.checks import check_recipe, check_width, layers_arg, two_class_rows
from steerlab.methods.reading import ModelLayout, Reading
from steerlab.sites import Site

Target = Literal["mean", "median"]


class ToyClamp(Controller):
    """Clamp the component along the class direction to a class's projection (see the
    module docstring for the equations).

    Args:
        layers: block index or indices whose output (``resid_post``) is steered; a negative
            index counts from the end of the model.
        target: the statistic of each class's projections that is the clamp target,
            ``"mean"`` or ``"median"``.
        recipe: which token of each example the fit reads: ``"ab"`` (the A/B letter),
            ``"last"`` or ``"mean"`` (the completion's mean).
        scope: the default token scope.
    """

    method = "toy_clamp"
    presets: ClassVar[dict[str, Preset]] = {
        "robust": Preset(
            hyperparameters={"target": "median", "recipe": "mean", "scope": "all"},
            source="toy: the median projection, which an outlying example cannot drag, "
                   "read at the mean of each completion",
        ),
    }

    def __init__(self, layers: int | Sequence[int] = -1, *, target: Target = "mean",
                 recipe: str = "mean", scope: str = "all") -> None:
        super().__init__()
        if target not in ("mean", "median"):
            raise SteeringError(f"target must be 'mean' or 'median', got {target!r}")
        check_recipe(recipe, self.method)
        # every argument stored under its own name, as given (normalised): hyperparameters()
        # reads them back, and an artifact rebuilds the controller from them
        self.layers = layers_arg(layers)
        self.target: Target = target
        self.recipe = recipe
        self._set_scope(scope)  # sets self.scope and parses it into self.default_scope
        # learned state: per site, the unit direction u (d,) and the targets (τ⁺, τ⁻) (2,)
        self.directions: dict[Site, torch.Tensor] = {}
        self.targets: dict[Site, torch.Tensor] = {}
        self._cast: CastCache[tuple[torch.Tensor, torch.Tensor]] = {}

    # -- what the fit reads ----------------------------------------------------------------
    def fit_sites(self) -> list[Site]:
        return [Site("resid_post", layer) for layer in self.layers]

    def reading(self, model: ModelLayout, data: Any, **options: Any) -> Reading:
        """The default reading (both classes at :meth:`fit_sites`, at ``recipe``'s token);
        a labelled set has no completion, so it is read at its texts' last token, and the
        artifact records ``recipe="last"``."""
        from steerlab.data import LabeledSet

        if isinstance(data, LabeledSet):
            self.recipe = "last"
        return super().reading(model, data, **options)

    # -- the estimator: model-free, on tensors ----------------------------------------------
    def fit(self, positive: dict[Site, torch.Tensor],
            negative: dict[Site, torch.Tensor]) -> ToyClamp:
        """Learn u, τ⁺ and τ⁻ per site from ``(N₊, d)`` and ``(N₋, d)`` activations."""
        stat = torch.mean if self.target == "mean" else torch.median
        directions, targets = {}, {}
        for site in positive:
            pos, neg = two_class_rows(positive[site], negative[site], self.method)
            gap = pos.mean(0) - neg.mean(0)
            if float(gap.norm()) == 0.0:
                raise DataError(f"the two classes have the same mean at {site}")
            u = gap / gap.norm()
            directions[site] = u
            targets[site] = torch.stack([stat(pos @ u), stat(neg @ u)])
        self.directions, self.targets = directions, targets
        self.sites = sorted(directions)
        self._cast.clear()
        self.fit_info.update(
            n_positive=int(next(iter(positive.values())).shape[0]),
            n_negative=int(next(iter(negative.values())).shape[0]),
            targets={str(s): [round(float(t), 4) for t in v] for s, v in targets.items()})
        return self

    # -- the run time: pure, batched over rows ----------------------------------------------
    def steer(self, site: Site, h: torch.Tensor, strength: torch.Tensor,
              ctx: StepContext) -> torch.Tensor:
        """``h`` is ``(batch, seq, d)``, ``strength`` ``(batch,)``: one strength per row."""
        u, tau = cached(self._cast, (site, h.dtype, h.device),
                        lambda: (cast_like(self.directions[site], h),
                                 cast_like(self.targets[site], h)))
        check_width(f"the direction at {site} has width", u.shape[-1], h)
        s = strength.to(h.dtype)[:, None, None]  # (batch, 1, 1)
        goal = torch.where(s >= 0, tau[0], tau[1])  # τ(s), (batch, 1, 1)
        along = (h @ u)[..., None]  # h · u, (batch, seq, 1)
        return h + s.abs() * (goal - along) * u

    # -- artifacts ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"direction.{s}": u.contiguous() for s, u in self.directions.items()}
        out.update({f"targets.{s}": t.contiguous() for s, t in self.targets.items()})
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        self.directions = {s: tensors[f"direction.{s}"].to(torch.float32) for s in sites}
        self.targets = {s: tensors[f"targets.{s}"].to(torch.float32) for s in sites}
        self.sites = list(sites)
        self._cast.clear()
