"""The A-LQR paper's diagnostics on a real model (spec section 6), with plots and tables.

* :func:`linearity_report`: (a) the relative Taylor residual
  ‖φ_k(z+δ) − φ_k(z) − Aδ‖/‖φ_k(z+δ) − φ_k(z)‖ per layer over step sizes, with A the
  prompt's own Jacobian (local linearity) and with the averaged A_k the controller uses;
  and the Jacobian-alignment score sim_m between prompts, within one prompt set and across
  two, against the random-matrix baseline.
* :func:`tracking_report`: (b) the tracking-error bound (off-by-one fixed) next to the
  measured LFS deviation δz_k = −α_k v_k per layer, while A-LQR steers.
* :func:`setpoint_report`: (c) v_kᵀz_k against β*_k per layer during steering.

Each writes PNG + JSON + markdown files (see :mod:`steerlab.diagnostics.plots`) and returns
the figures as a dict.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steerlab.control.jacobians import block_function, block_jacobians
from steerlab.control.riccati import lqr_gains
from steerlab.diagnostics.linearity import (
    alignment_matrix,
    default_rank,
    linearity_residuals,
    random_baseline,
)
from steerlab.diagnostics.plots import (
    plot_alignment,
    plot_linearity,
    plot_setpoint,
    plot_tracking_bound,
)
from steerlab.diagnostics.setpoint import block_inputs_at_last_token, setpoint_trace
from steerlab.diagnostics.tracking import tracking_bound
from steerlab.methods.alqr import ALQR
from steerlab.models import LoadedModel
from steerlab.runtime import Steer


def even_layers(n_layers: int, count: int = 5) -> list[int]:
    """``count`` evenly spaced block indices from 0 to n_layers − 1."""
    if count >= n_layers:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)})


def _off_diag_mean(S: torch.Tensor) -> float:
    n = S.shape[0]
    if n < 2:
        return float("nan")
    mask = ~torch.eye(n, dtype=torch.bool)
    return float(S[mask].mean())


def linearity_report(
    lm: LoadedModel,
    texts: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    other_texts: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    max_tokens: int = 16,
    n_prompts: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Local linearity residuals and Jacobian alignment (spec section 6)."""
    out = Path(out_dir)
    layers = list(layers) if layers is not None else even_layers(lm.info.num_layers)
    texts = list(texts)[:n_prompts]
    jac = block_jacobians(lm, texts, layers=layers, max_tokens=max_tokens, rendered=False,
                          keep_per_prompt=True, progress=progress)
    assert jac.per_prompt is not None
    local: dict[int, dict[float, tuple[float, float]]] = {}
    averaged: dict[int, dict[float, tuple[float, float]]] = {}
    for li, k in enumerate(layers):
        acc_local: dict[float, list[float]] = {}
        acc_avg: dict[float, list[float]] = {}
        for pi, text in enumerate(texts[: min(4, len(texts))]):
            f, z = block_function(lm, text, k, max_tokens=max_tokens, rendered=False)
            for eps, (mean, _) in linearity_residuals(f, z, jac.per_prompt[pi, li]).items():
                acc_local.setdefault(eps, []).append(mean)
            for eps, (mean, _) in linearity_residuals(f, z, jac.A[li]).items():
                acc_avg.setdefault(eps, []).append(mean)
        local[k] = {e: (float(torch.tensor(v).mean()), float(torch.tensor(v).std()) if
                        len(v) > 1 else 0.0) for e, v in acc_local.items()}
        averaged[k] = {e: (float(torch.tensor(v).mean()), float(torch.tensor(v).std()) if
                           len(v) > 1 else 0.0) for e, v in acc_avg.items()}
    files = plot_linearity(local, out, name="linearity_local")
    files += plot_linearity(averaged, out, name="linearity_averaged_A")

    d = lm.info.hidden_size
    m = default_rank(d)
    within = {k: alignment_matrix(jac.per_prompt[:, li], m) for li, k in enumerate(layers)}
    baseline = random_baseline(d, m, n=len(texts))
    files += plot_alignment(within, baseline, out, name="alignment_within")
    result: dict[str, Any] = {
        "layers": layers,
        "n_prompts": len(texts),
        "rank_m": m,
        "residual_local": {k: {str(e): v for e, v in r.items()} for k, r in local.items()},
        "residual_averaged_A": {k: {str(e): v for e, v in r.items()}
                                for k, r in averaged.items()},
        "alignment_within": {k: _off_diag_mean(S) for k, S in within.items()},
        "random_baseline": baseline,
    }
    if other_texts:
        other = block_jacobians(lm, list(other_texts)[:n_prompts], layers=layers,
                                max_tokens=max_tokens, rendered=False, keep_per_prompt=True,
                                progress=progress)
        assert other.per_prompt is not None
        cross: dict[int, float] = {}
        for li, k in enumerate(layers):
            both = torch.cat([jac.per_prompt[:, li], other.per_prompt[:, li]])
            S = alignment_matrix(both, m)
            n = jac.per_prompt.shape[0]
            cross[k] = float(S[:n, n:].mean())
        files += plot_alignment(cross, baseline, out, name="alignment_across")
        result["alignment_across"] = cross
    result["files"] = [str(p) for p in files]
    return result


def tracking_report(
    lm: LoadedModel,
    controller: ALQR,
    A: torch.Tensor,
    prompts: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    strength: float = 1.0,
) -> dict[str, Any]:
    """Tracking-error bound vs measured LFS deviation while A-LQR steers.

    Uses the controller's own Jacobians ``A`` (L, d, d) and recomputes the full gains K. The
    horizon is the L−1 transitions between block inputs 0 … L−1 (the LFS is defined on block
    inputs only, so δz at the final output is not available).
    """
    gains = lqr_gains(A, controller.v[0], q=controller.q, r=controller.r, q_f=controller.q_f,
                      keep_K=True)
    assert gains.K is not None
    z = block_inputs_at_last_token(lm, prompts, [Steer(controller, strength)])  # (n, L, d)
    v, mu = controller.v[0], controller.mu[0]
    target = strength * controller.lambdas[0] * mu
    alpha = target[None, :] - torch.einsum("nld,ld->nl", z, v)
    deltas = -alpha[..., None] * v[None]  # (n, L, d)
    L = A.shape[0]
    tb = tracking_bound(A[: L - 1], gains.K[: L - 1], deltas, reference=z.mean(0))
    files = plot_tracking_bound(tb.bound, tb.measured, out_dir, measured_mean=tb.measured_mean,
                                normalised=True)
    return {
        "bound": tb.bound.tolist(),
        "measured": tb.measured.tolist(),
        "measured_mean": tb.measured_mean.tolist(),
        "holds": bool(tb.holds()),
        "files": [str(p) for p in files],
    }


def setpoint_report(
    lm: LoadedModel,
    controller: ALQR,
    prompts: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    strength: float = 1.0,
    label: str = "alqr",
    steers: Sequence[Steer] | None = None,
) -> dict[str, Any]:
    """v_kᵀz_k vs β*_k per layer under ``steers`` (default: the controller itself)."""
    used = list(steers) if steers is not None else [Steer(controller, strength)]
    trace = setpoint_trace(lm, controller, prompts, used, lam=strength)
    files = plot_setpoint(trace.projection.mean(0), trace.target, trace.mu, out_dir, label)
    return {**trace.as_dict(), "files": [str(p) for p in files]}
