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
from steerlab.methods.base import Controller, Preset, StepContext, check_finite
from steerlab.scope import parse_scope
from steerlab.sites import Site

Recipe = Literal["ab", "last", "mean"]
CAARecipe = Literal["ab", "last", "mean", "imported"]


def _layers_arg(layers: int | Sequence[int]) -> list[int]:
    out = [int(layers)] if isinstance(layers, int) else [int(x) for x in layers]
    if not out:
        raise SteeringError("give at least one layer")
    return out


class AdditiveController(Controller):
    """A controller that adds a fixed vector per site: h' = h + strength · v_site."""

    vectors: dict[Site, torch.Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.vectors = {}
        self._cast: dict[tuple[Site, torch.dtype, torch.device], torch.Tensor] = {}

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        key = (site, h.dtype, h.device)
        v = self._cast.get(key)
        if v is None:
            v = self.vectors[site].to(device=h.device, dtype=h.dtype)
            self._cast[key] = v
        if v.shape[-1] != h.shape[-1]:
            raise SteeringError(
                f"vector at {site} has width {v.shape[-1]} but the activation has "
                f"{h.shape[-1]}"
            )
        return h + strength.to(h.dtype)[:, None, None] * v

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(s): v.contiguous() for s, v in self.vectors.items()}

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        self.vectors = {s: tensors[str(s)].to(torch.float32) for s in sites}
        self.sites = list(sites)
        self._cast = {}

    def set_vectors(self, vectors: dict[Site, torch.Tensor]) -> None:
        for s, v in vectors.items():
            check_finite(f"steering vector at {s}", v)
        self.vectors = {s: v.to(torch.float32) for s, v in vectors.items()}
        self.sites = sorted(self.vectors)
        self._cast = {}

    def vectors_by_layer(self) -> dict[int, torch.Tensor] | None:
        if any(s.kind != "resid_post" for s in self.vectors):
            return None
        return {s.layer: v for s, v in self.vectors.items()}


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
        if recipe not in ("ab", "last", "mean", "imported"):
            raise SteeringError(f"unknown CAA recipe {recipe!r}; use ab, last or mean")
        if site not in ("resid_post", "resid_pre"):
            raise SteeringError(f"CAA steers resid_post or resid_pre, not {site!r}")
        if normalize is not None and not normalize > 0:
            raise SteeringError(f"normalize must be a positive norm, got {normalize}")
        self.layers = _layers_arg(layers)
        self.site = site
        self.recipe: CAARecipe = recipe
        self.normalize = normalize
        self.scope = scope
        self.default_scope = parse_scope(scope)

    def fit_sites(self) -> list[Site]:
        return [Site(self.site, layer) for layer in self.layers]

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

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "site": self.site,
            "recipe": self.recipe,
            "normalize": self.normalize,
            "scope": self.scope,
        }


def normalize_across(controllers: Sequence[AdditiveController]) -> None:
    """CAA's ``normalize_vectors.py``: at each site, rescale every controller's vector to the
    mean norm of the vectors of all the given controllers at that site (in place)."""
    sites = set.intersection(*(set(c.vectors) for c in controllers)) if controllers else set()
    for site in sites:
        target = torch.stack([c.vectors[site].norm() for c in controllers]).mean()
        for c in controllers:
            c.vectors[site] = c.vectors[site] * (target / c.vectors[site].norm())
            c._cast = {}
