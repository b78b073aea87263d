"""CAA: Contrastive Activation Addition (mean-difference steering).

Rimsky (Panickssery) et al., "Steering Llama 2 via Contrastive Activation Addition",
ACL 2024 (reference code: nrimsky/CAA).

For each chosen block L, with paired activations a⁺_i, a⁻_i of the positive and negative
completion of prompt i read at the output of block L:

    v_L = (1/N) Σ_i (a⁺_i − a⁻_i)            (= mean(a⁺) − mean(a⁻), unnormalised)

and steering adds it, scaled by the strength (CAA's "multiplier") m, to the residual stream:

    h'_L = h_L + m · v_L

Recipes (which token is read): ``"ab"`` reads CAA's A/B answer letter (the "A" of "(A)", the
paper's position −2); ``"last"`` reads the last token of prompt + completion; ``"mean"``
averages over the completion's tokens. The paper applies the vector to every position from
the end of the instruction on (scope ``from:-1``, steerlab's default; ``last`` steers the
same tokens in generation, ``all`` also the user prompt, as steering-vectors and repeng do).
Strength (``docs/strength.md``): m = 1 adds v once, m = 0 is the unsteered model, m < 0
subtracts it (the opposite behaviour). Optional rescaling: ``normalize=c`` rescales every
layer's vector to norm ``c``; :func:`normalize_across` does the reference code's
``normalize_vectors.py`` (each behaviour's vector rescaled to the mean norm across
behaviours, layer by layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch

from steerlab.errors import DataError, SteeringError

# AdditiveController and Recipe live in methods/additive.py; they keep this import path.
from steerlab.methods.additive import AdditiveController as AdditiveController
from steerlab.methods.additive import Recipe as Recipe
from steerlab.methods.base import Preset
from steerlab.methods.checks import check_finite, check_recipe, check_site_kind, layers_arg
from steerlab.methods.reading import Collected, ModelLayout, Reading
from steerlab.models import ModelInfo
from steerlab.sites import Site

CAARecipe = Literal["ab", "last", "mean", "imported"]


class CAA(AdditiveController):
    """Contrastive Activation Addition; see the module docstring for the equations.

    Args:
        layers: block index or indices to steer.
        site: ``"resid_post"`` (block output, the paper's choice) or ``"resid_pre"``.
        recipe: ``"ab"``, ``"last"`` or ``"mean"`` (which token the fit reads);
            ``"imported"`` marks a vector read from a GGUF control vector (not fitted here).
        normalize: if given, rescale each layer's vector to this L2 norm.
        scope: default token scope (``"from:-1"``, CAA's own).
    """

    method = "caa"
    presets: ClassVar[dict[str, Preset]] = {
        "paper": Preset(
            hyperparameters={"layers": 13, "site": "resid_post", "recipe": "ab",
                             "normalize": None, "scope": "from:-1"},
            source="nrimsky/CAA: block-output residual at position -2 (the A/B letter), mean "
                   "of pos - neg (generate_vectors.py); added from the instruction end on "
                   "(utils/helpers.py add_vector_after_position, called by llama_wrapper.py; "
                   "scope from:-1); layer 13, "
                   "the paper's main-text layer for Llama-2-7B-Chat",
        ),
    }

    def __init__(
        self,
        layers: int | Sequence[int] = 15,
        *,
        site: Literal["resid_post", "resid_pre"] = "resid_post",
        recipe: CAARecipe = "last",
        normalize: float | None = None,
        scope: str = "from:-1",
    ) -> None:
        super().__init__()
        check_recipe(recipe, "CAA", allowed=("ab", "last", "mean", "imported"))
        check_site_kind(site, "CAA steers")
        if normalize is not None and not normalize > 0:
            raise SteeringError(f"normalize must be a positive norm, got {normalize}")
        self.layers = layers_arg(layers)
        self.site = site
        self.recipe: CAARecipe = recipe
        self.normalize = normalize
        self._set_scope(scope)

    def fit_sites(self) -> list[Site]:
        return [Site(self.site, layer) for layer in self.layers]

    def reading(self, model: ModelLayout, data: Any, **options: Any) -> Reading:
        """The class activations at the steered blocks; a labelled set is read at its
        texts' last tokens (``recipe`` becomes ``"last"``)."""
        from steerlab.data import LabeledSet

        if isinstance(data, LabeledSet):
            self.recipe = "last"
        return super().reading(model, data, **options)

    def record_fit(self, info: ModelInfo, collected: Collected,
                   estimator_seconds: float) -> None:
        self.record_data(
            info, collected,
            fit_seconds=round(collected.seconds.get("collect", 0.0) + estimator_seconds, 3),
            render_mode=collected.render_mode, position=collected.position)

    def fit(
        self, positive: dict[Site, torch.Tensor], negative: dict[Site, torch.Tensor]
    ) -> CAA:
        """Learn v = mean(a⁺) − mean(a⁻) per site from ``(N₊, d)`` and ``(N₋, d)`` activations
        (for paired rows, N₊ = N₋, this is mean(a⁺ − a⁻), the paper's form)."""
        vectors: dict[Site, torch.Tensor] = {}
        for site in positive:
            pos, neg = positive[site].to(torch.float32), negative[site].to(torch.float32)
            if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
                raise DataError(
                    f"CAA needs (N, d) activations of equal width at {site}; got "
                    f"{tuple(pos.shape)} and {tuple(neg.shape)}"
                )
            if pos.shape[0] < 1 or neg.shape[0] < 1:
                raise DataError("CAA needs at least one positive and one negative example")
            check_finite(f"activations at {site}", pos)
            check_finite(f"activations at {site}", neg)
            v = pos.mean(dim=0) - neg.mean(dim=0)
            if float(v.norm()) == 0.0:
                raise DataError(
                    f"the positive and negative activations at {site} are identical: the data "
                    f"has one class only (every positive equals its negative)"
                )
            if self.normalize is not None:
                v = v * (self.normalize / v.norm())
            vectors[site] = v
        self.set_vectors(vectors)
        self.fit_info.update(
            n_pairs=int(next(iter(positive.values())).shape[0]),
            n_negative=int(next(iter(negative.values())).shape[0]),
            vector_norms={str(s): round(float(v.norm()), 4) for s, v in vectors.items()},
        )
        return self


def normalize_across(controllers: Sequence[AdditiveController]) -> None:
    """CAA's ``normalize_vectors.py``: at each site, rescale every controller's vector to the
    mean norm of the vectors of all the given controllers at that site (in place)."""
    sites = set.intersection(*(set(c.vectors) for c in controllers)) if controllers else set()
    for site in sites:
        target = torch.stack([c.vectors[site].norm() for c in controllers]).mean()
        for c in controllers:
            c.vectors[site] = c.vectors[site] * (target / c.vectors[site].norm())
            c.vectors_changed()
