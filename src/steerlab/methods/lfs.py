"""The linear feature setpoint (LFS) and the base of the controllers built on it (A-LQR,
A-LQR+, S-PID, ActAdd-LFS; see :mod:`steerlab.methods.alqr`), with their shared fit side:
they read every block's input for both classes of each concept (one set per concept).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from steerlab.errors import DataError, SteeringError
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.cast_cache import CastCache, cached
from steerlab.methods.checks import check_finite, check_positive, check_width
from steerlab.methods.reading import (
    Collected,
    ModelLayout,
    Reading,
    check_options,
    concept_sets,
)
from steerlab.models import ModelInfo
from steerlab.sites import Site


def jacobian_texts(data: Any, n: int) -> list[str]:
    """Positive-class texts for the Jacobians: the first ``n`` "prompt + positive completion"
    (or positive texts of a labelled set), unrendered (the paper linearises along raw
    positive-class text, e.g. concept sentences; with a chat template, 24 tokens would be
    almost all template)."""
    from steerlab.data import LabeledSet

    if isinstance(data, LabeledSet):
        return [t.text for t in data if t.label == 1][:n]
    return [f"{p.prompt} {p.positive}" for p in list(data)[:n]]


def linear_feature_setpoint(
    positive: torch.Tensor, negative: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """LFS directions and gaps from block-input activations ``(N, L, d)`` of each class.

    Returns ``v`` (L, d), unit rows, and ``mu`` (L,). Where the class means coincide
    (μ_k = 0, e.g. block 0 read at the last token of texts that all end in the same token),
    the reference sets v_k = 0 and β*_k = 0 and goes on (lqr-activation-steering
    ``steer/steering.py`` L428-436, ``steer/PIDsteering.py`` L376-385), so that block gets
    no control: ours does the same and warns once naming those blocks. It raises
    :class:`DataError` only when every block is degenerate. "Coincide" is a relative test
    (μ_k ≤ 1e-7 · max_j μ_j) rather than the reference's ``== 0``: with unequal class sizes
    the means of identical rows can differ by rounding, and the reference would then steer
    along that rounding noise.
    """
    if positive.ndim != 3 or negative.ndim != 3 or positive.shape[1:] != negative.shape[1:]:
        raise DataError(
            f"LFS needs (N, L, d) activations of both classes with the same (L, d); got "
            f"{tuple(positive.shape)} and {tuple(negative.shape)}"
        )
    if positive.shape[0] < 1 or negative.shape[0] < 1:
        raise DataError("LFS needs at least one example of each class")
    check_finite("positive activations", positive)
    check_finite("negative activations", negative)
    e = positive.to(torch.float32).mean(0) - negative.to(torch.float32).mean(0)
    mu = e.norm(dim=-1)
    scale = float(mu.max()) if mu.numel() else 0.0
    flat_mask = mu <= 1e-7 * max(scale, 1e-30)
    flat = flat_mask.nonzero().flatten().tolist()
    if len(flat) == mu.numel():
        raise DataError(
            "the class means coincide at every block input (μ_k = 0): the contrastive set "
            "does not separate the classes anywhere; check that positives and negatives differ"
        )
    if flat:
        warnings.warn(
            f"the class means coincide at block input(s) {flat} (μ_k = 0); as in the reference "
            f"code, those blocks get v_k = 0 and β*_k = 0 (no control)",
            UserWarning, stacklevel=3,
        )
    mu = torch.where(flat_mask, torch.zeros_like(mu), mu)
    v = torch.where(flat_mask[:, None], torch.zeros_like(e), e / mu.clamp_min(1e-30)[:, None])
    return v, mu



@functools.lru_cache(maxsize=1024)
def _block_input(k: int) -> Site:
    """``Site("resid_pre", k)``, made once per k (the controllers read it at every block)."""
    return Site("resid_pre", k)

class LFSController(Controller):
    """Shared state and plumbing of controllers built on the linear feature setpoint.

    Learned: ``v`` (C, L, d) unit directions, ``mu`` (C, L) class gaps, one row per concept.
    """

    v: torch.Tensor
    mu: torch.Tensor

    def __init__(self, lambdas: float | Sequence[float], scope: str) -> None:
        super().__init__()
        lam = [lambdas] if isinstance(lambdas, (int, float)) else list(lambdas)
        if not lam:
            raise SteeringError("give at least one λ (one per concept)")
        self.lambdas = [check_positive("λ", x, allow_zero=True) for x in lam]
        self._set_scope(scope)
        self.v = torch.empty(0)
        self.mu = torch.empty(0)
        self._cast: CastCache[torch.Tensor] = {}

    @property
    def num_layers(self) -> int:
        return int(self.v.shape[1]) if self.v.ndim == 3 else 0

    def steered_layers(self) -> list[int]:
        return list(range(self.num_layers))

    @property
    def read_sites(self) -> list[Site]:
        return [Site("resid_pre", k) for k in self.steered_layers()]

    def set_setpoint(self, v: torch.Tensor, mu: torch.Tensor) -> None:
        if v.ndim == 2:
            v, mu = v[None], mu[None]
        if v.shape[0] != len(self.lambdas):
            if len(self.lambdas) == 1:
                self.lambdas = self.lambdas * int(v.shape[0])
            else:
                raise SteeringError(
                    f"{len(self.lambdas)} λ values for {v.shape[0]} concepts; give one each"
                )
        self.v, self.mu = v.to(torch.float32), mu.to(torch.float32)
        self.sites = [Site("resid_post", k) for k in self.steered_layers()]
        self._cast.clear()

    def fit_setpoint(
        self, concepts: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LFS of each concept from its (positive, negative) ``(N, L, d)`` activations."""
        if not concepts:
            raise DataError("give at least one concept (positive, negative activations)")
        vs, mus = zip(*(linear_feature_setpoint(p, n) for p, n in concepts), strict=True)
        return torch.stack(vs), torch.stack(mus)

    def _get(self, name: str, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """``t`` (the learned tensor called ``name``) in float32 on ``ref``'s device, cached:
        the control law is computed in float32 whatever the activation's dtype."""
        return cached(self._cast, (name, torch.float32, ref.device),
                      lambda: t.to(device=ref.device, dtype=torch.float32))

    def alpha(self, k: int, z: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        """α_{k,c} = sign(s)·λ_c·μ_{k,c} − v_{k,c}ᵀz, shape (B, T, C), in float32 (the
        strength's sign picks the side of the setpoint; :meth:`gain` is its magnitude)."""
        v = self._get("v", self.v, z)[:, k, :]  # (C, d)
        mu = self._get("mu", self.mu, z)[:, k]  # (C,)
        lam = self._get("lam", torch.tensor(self.lambdas), z)  # (C,)
        zf = z.to(torch.float32)
        proj = zf @ v.T  # (B, T, C)
        side = torch.sign(strength.to(device=z.device, dtype=torch.float32))
        target = side[:, None, None] * (lam * mu)[None, None, :]
        return target - proj

    @staticmethod
    def gain(strength: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """|s| per row, shaped (B, 1, 1) on ``like``'s device: the feedback's scale."""
        return strength.to(device=like.device, dtype=torch.float32).abs()[:, None, None]

    def projection(self, k: int, z: torch.Tensor) -> torch.Tensor:
        """v_{k,c}ᵀ z for each concept: (B, T, C)."""
        return z.to(torch.float32) @ self._get("v", self.v, z)[:, k, :].T

    def _read(self, ctx: StepContext, k: int) -> torch.Tensor:
        z = ctx.reads.get(_block_input(k))
        if z is None:
            raise SteeringError(
                f"{self.method} needs the input of block {k} but the runtime did not read it"
            )
        return z

    def _check_width(self, h: torch.Tensor) -> None:
        check_width(f"{self.method} was fitted with width", int(self.v.shape[-1]), h)

    def base_state(self) -> dict[str, torch.Tensor]:
        return {"v": self.v.contiguous(), "mu": self.mu.contiguous()}

    # -- the fit side --------------------------------------------------------------------------
    def reading(self, model: ModelLayout, data: Any, **options: Any) -> Reading:
        """Every block's input (``resid_pre.k``, k = 0 … L−1) for both classes of each
        concept, at the recipe's position (``data``: one set, or one per concept)."""
        check_options(self.method, options)
        return Reading(sites=[Site("resid_pre", k) for k in range(model.num_layers)],
                       recipe=getattr(self, "recipe", "last"), data="concepts",
                       sets=concept_sets(data))

    def fit_collected(self, collected: Collected) -> Any:
        """``fit`` on each concept's (positive, negative) ``(N, L, d)`` block inputs."""
        fit: Any = getattr(self, "fit")  # noqa: B009 - each subclass has its own signature
        return fit(collected.stacked_concepts())

    def record_fit(self, info: ModelInfo, collected: Collected,
                   estimator_seconds: float) -> None:
        self.record_data(
            info, collected,
            fit_seconds=round(collected.seconds.get("collect", 0.0) + estimator_seconds, 3))
