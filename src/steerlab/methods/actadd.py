"""ActAdd: activation addition from a single prompt pair.

Turner et al., "Steering Language Models With Activation Engineering" (2023; ActAdd).

For a prompt pair (p⁺, p⁻) (e.g. "Love" / "Hate") and block L, ActAdd runs both prompts and
takes the difference of their block-L residual activations:

    Δ_L[t] = a_L(p⁺)[t] − a_L(p⁻)[t],   t = 0 … n−1   (the pair padded to one length n)

and adds c · Δ_L[t] to the residual stream of the user's prompt at its first n positions
(the paper's "front" injection). ``mode="positional"`` does exactly that, in absolute
positions, so it is KV-cache safe; ``mode="vector"`` (default) uses the difference at the
last token of each prompt, v = a_L(p⁺)[-1] − a_L(p⁻)[-1], added as a constant vector on the
controller's token scope; that variant works with chat templates, whose first positions are
the template's own tokens. The prompts are read without a chat template (as in the paper).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from steerlab.errors import DataError, SteeringError
from steerlab.methods.additive import AdditiveController
from steerlab.methods.base import StepContext
from steerlab.methods.cast_cache import cached, cast_like
from steerlab.methods.checks import check_finite
from steerlab.methods.reading import Collected, ModelLayout, Reading, check_options
from steerlab.models import ModelInfo
from steerlab.sites import Site


class ActAdd(AdditiveController):
    """ActAdd from one prompt pair; see the module docstring.

    Args:
        layer: block whose output is steered.
        positive, negative: the prompt pair.
        mode: ``"vector"`` (last-token difference, default) or ``"positional"`` (the paper's
            per-position difference added at the first positions).
        scope: token scope (``"all"``: the paper injects at the prompt's front positions,
            which ``mode="positional"`` needs in scope; ``mode="vector"`` adds everywhere).
    """

    method = "actadd"

    def __init__(
        self,
        layer: int = 6,
        *,
        positive: str = "Love",
        negative: str = "Hate",
        mode: Literal["vector", "positional"] = "vector",
        scope: str = "all",
    ) -> None:
        super().__init__()
        if mode not in ("vector", "positional"):
            raise SteeringError(f"unknown ActAdd mode {mode!r}; use vector or positional")
        if not positive.strip() or not negative.strip() or positive == negative:
            raise DataError("ActAdd needs two different, non-empty prompts")
        self.layer = int(layer)
        self.positive = positive
        self.negative = negative
        self.mode = mode
        self._set_scope(scope, steers="all" if mode == "positional" else None)
        self.positional: torch.Tensor | None = None  # (n, d) for mode="positional"

    def fit_sites(self) -> list[Site]:
        return [Site("resid_post", self.layer)]

    def reading(self, model: ModelLayout, data: Any, **options: Any) -> Reading:
        """Its own prompt pair at the steered block, read without a chat template (every
        token for ``mode="positional"``, else the last); a data set is refused (it would be
        silently ignored)."""
        check_options(self.method, options)
        if data is not None:
            raise DataError(
                "ActAdd is fitted from its own prompt pair (ActAdd(positive=..., "
                "negative=...)), not from a data set: pass data=None (or fit CAA on the set)")
        return Reading(sites=self.bind_sites(model),
                       recipe="tokens" if self.mode == "positional" else "last",
                       data="prompts", prompts=(self.positive, self.negative))

    def fit_collected(self, collected: Collected) -> ActAdd:
        site = collected.reading.sites[0]
        pos, neg = collected.positive[site], collected.negative[site]
        if pos.shape[0] == 0 or neg.shape[0] == 0:
            raise DataError("ActAdd prompts produced no tokens")
        return self.fit(pos, neg)

    def record_fit(self, info: ModelInfo, collected: Collected,
                   estimator_seconds: float) -> None:
        self.model_info = info
        self.fit_info["fit_seconds"] = round(
            collected.seconds.get("collect", 0.0) + estimator_seconds, 3)

    def fit(self, positive: torch.Tensor, negative: torch.Tensor) -> ActAdd:
        """Learn from the two prompts' activations at the steered block, each ``(n_tokens, d)``
        (the shorter padded on the right with zeros to the longer, as the paper pads)."""
        pos, neg = positive.to(torch.float32), negative.to(torch.float32)
        if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
            raise DataError("ActAdd needs two (n_tokens, d) activations of the same width")
        check_finite("ActAdd activations", pos)
        check_finite("ActAdd activations", neg)
        n = max(pos.shape[0], neg.shape[0])
        pp = torch.zeros(n, pos.shape[1])
        nn_ = torch.zeros(n, pos.shape[1])
        pp[: pos.shape[0]] = pos
        nn_[: neg.shape[0]] = neg
        site = Site("resid_post", self.layer)
        self.set_vectors({site: pos[-1] - neg[-1]})
        self.positional = pp - nn_ if self.mode == "positional" else None
        self.fit_info.update(vector_norm=round(float(self.vectors[site].norm()), 4), n_tokens=n)
        return self

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        if self.mode != "positional" or self.positional is None:
            return super().steer(site, h, strength, ctx)
        positional = self.positional
        delta = cached(self._cast, ("positional", h.dtype, h.device),
                       lambda: cast_like(positional, h))
        n = delta.shape[0]
        pos = ctx.positions
        inside = (pos >= 0) & (pos < n)
        add = delta[pos.clamp(0, n - 1)] * inside[..., None].to(h.dtype)
        return h + strength.to(h.dtype)[:, None, None] * add

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        if self.positional is not None:
            out["positional"] = self.positional.contiguous()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        super().load_state({k: v for k, v in tensors.items() if k != "positional"}, sites)
        self.positional = tensors.get("positional")

    def vectors_by_layer(self) -> dict[int, torch.Tensor] | None:
        return None if self.mode == "positional" else super().vectors_by_layer()
