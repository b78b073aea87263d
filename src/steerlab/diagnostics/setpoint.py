"""Setpoint tracking: the feature projection v_kᵀz_k at every block input while steering.

For a controller built on the linear feature setpoint (A-LQR, S-PID, ActAdd-LFS), or for any
steering compared against such a setpoint (CAA at matched strength), this reads the block
inputs z_k at the last prompt token of each prompt during one steered forward pass and
returns v_kᵀz_k next to the target β*_k = λ·μ_k. The A-LQR paper's claim is that closed-loop
control holds the projection near the target at every layer; the *tracking fraction* is the
share of (prompt, layer) pairs with |v_kᵀz_k − β*_k| ≤ tol·μ_k (tol = 0.1 by default).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerlab.data import Renderer
from steerlab.hooks import HookSet, at_sites
from steerlab.methods.alqr import LFSController
from steerlab.models import LoadedModel
from steerlab.runtime import Steer, steering, tokenize_prompts
from steerlab.sites import Site, find_layers


@dataclass
class SetpointTrace:
    projection: torch.Tensor  # (n_prompts, L): v_kᵀ z_k at the last prompt token
    target: torch.Tensor  # (L,): β*_k
    mu: torch.Tensor  # (L,)

    def within(self, tol: float = 0.1) -> torch.Tensor:
        """(n_prompts, L) booleans: |v_kᵀz_k − β*_k| ≤ tol·μ_k."""
        return (self.projection - self.target).abs() <= tol * self.mu

    def tracking_fraction(self, tol: float = 0.1, layers: Sequence[int] | None = None) -> float:
        w = self.within(tol)
        if layers is not None:
            w = w[:, list(layers)]
        return float(w.float().mean())

    def as_dict(self) -> dict[str, Any]:
        return {
            "projection_mean": self.projection.mean(0).tolist(),
            "target": self.target.tolist(),
            "mu": self.mu.tolist(),
            "tracking_fraction_0.1": self.tracking_fraction(0.1),
        }


def setpoint_trace(
    lm: LoadedModel,
    setpoint: LFSController,
    prompts: Sequence[str],
    steers: Sequence[Steer] = (),
    *,
    lam: float = 1.0,
    concept: int = 0,
    render: bool = True,
    batch_size: int = 16,
) -> SetpointTrace:
    """Projections on ``setpoint``'s directions at every block input, under ``steers``.

    ``lam`` is the strength the target refers to: its sign picks the side of the setpoint,
    β*_k = sign(lam)·λ_c·μ_{k,c} (the magnitude only scales the feedback, see
    :mod:`steerlab.methods.alqr`).
    """
    v = setpoint.v[concept]  # (L, d)
    mu = setpoint.mu[concept]
    side = (lam > 0) - (lam < 0)
    target = side * setpoint.lambdas[concept] * mu
    z = block_inputs_at_last_token(lm, prompts, steers, render=render, batch_size=batch_size)
    return SetpointTrace(projection=torch.einsum("bld,ld->bl", z, v), target=target, mu=mu)


def _read_last(got: dict[int, torch.Tensor], k: int, h: torch.Tensor) -> None:
    got[k] = h[:, -1, :].to(torch.float32).cpu()


def block_inputs_at_last_token(
    lm: LoadedModel,
    prompts: Sequence[str],
    steers: Sequence[Steer] = (),
    *,
    render: bool = True,
    batch_size: int = 16,
) -> torch.Tensor:
    """Every block's input at each prompt's last token under ``steers``: ``(n, L, d)``."""
    renderer = Renderer(lm.tokenizer) if render else None
    texts = [renderer.prompt(p) if renderer else p for p in prompts]
    layers = find_layers(lm.model)
    n = layers.num_layers
    rows: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        enc = tokenize_prompts(lm, texts[start : start + batch_size], rendered=render)
        got: dict[int, torch.Tensor] = {}
        # installed before the steering context's hooks (so on a block that a controller
        # steers at its input, they run before that write)
        reads = at_sites(layers, {Site("resid_pre", k): functools.partial(_read_last, got, k)
                                  for k in range(n)})
        with HookSet(reads), torch.no_grad(), steering(lm, list(steers), layers=layers):
            lm.model(**enc, use_cache=False)
        rows.append(torch.stack([got[k] for k in range(n)], dim=1))
    return torch.cat(rows)
