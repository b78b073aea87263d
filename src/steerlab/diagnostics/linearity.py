"""Local-linearity evidence for A-LQR (spec §6): Taylor residuals and Jacobian alignment.

* :func:`linearity_residuals` — how well ``f(z + δ) ≈ f(z) + Aδ`` holds as ``‖δ‖`` grows.
* :func:`alignment_score` / :func:`alignment_matrix` — the paper's subspace similarity between
  Jacobians taken along different trajectories (top-``m`` SVD, ``m = d/20`` by default).
* :func:`random_baseline` — the same score for random column-normalised Gaussian matrices.

All functions are pure: tensors in, numbers/tensors out; no model needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from steerlab.errors import SteerlabError

__all__ = [
    "DiagnosticsError",
    "alignment_matrix",
    "alignment_score",
    "default_rank",
    "linearity_residuals",
    "random_baseline",
]

DEFAULT_EPS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


class DiagnosticsError(SteerlabError):
    """Bad input to a diagnostic (shapes, ranks, step sizes, zero matrices)."""


def default_rank(d: int) -> int:
    """The paper's truncation rank ``m = d / 20`` (at least 1)."""
    return max(1, d // 20)


def linearity_residuals(
    f: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    A: torch.Tensor,
    eps: Sequence[float] = DEFAULT_EPS,
    n_dirs: int = 8,
    seed: int = 0,
) -> dict[float, tuple[float, float]]:
    """Relative first-order residual of ``f`` around ``z`` for each relative step size.

    For each ``e`` in ``eps`` and each of ``n_dirs`` random directions ``u`` (standard Gaussian,
    unit-normalised, drawn once from ``seed`` and shared by every ``e`` so the curve is smooth)
    the step is ``δ = e·‖z‖·u`` — **relative to the state's norm**, because residual-stream
    norms differ by orders of magnitude across layers and models, and an absolute step would
    mean something else at every layer. The residual is::

        ‖f(z+δ) − f(z) − Aδ‖ / ‖f(z+δ) − f(z)‖

    (0 for an exactly linear ``f`` with ``A`` its Jacobian; grows like ``e`` for a smooth
    ``f``). ``f`` maps a ``(d,)`` tensor to a ``(d,)`` tensor and is called once per direction
    and step (``1 + n_dirs·len(eps)`` calls, no batching assumed). Perturbed inputs have
    ``z``'s dtype; norms and ``Aδ`` are computed in float64. Returns ``{e: (mean, std)}`` over
    directions (``std`` is the sample std, 0 for one direction). A direction whose output does
    not move at all (``f(z+δ) = f(z)``) is skipped; if all are, the entry is ``(nan, nan)``.
    """
    if z.ndim != 1:
        raise DiagnosticsError(f"z must be one state vector of shape (d,), got {tuple(z.shape)}")
    d = z.shape[0]
    if A.shape != (d, d):
        raise DiagnosticsError(f"A must have shape ({d}, {d}) to match z, got {tuple(A.shape)}")
    if n_dirs < 1:
        raise DiagnosticsError(f"n_dirs must be ≥ 1, got {n_dirs}")
    steps = [float(e) for e in eps]
    if not steps or any(not math.isfinite(e) or e <= 0.0 for e in steps):
        raise DiagnosticsError(f"eps must be a non-empty list of positive numbers, got {eps!r}")
    if not bool(torch.isfinite(z).all()) or not bool(torch.isfinite(A).all()):
        raise DiagnosticsError("z and A must be finite")
    znorm = float(z.double().norm())
    if znorm == 0.0:
        raise DiagnosticsError("z is the zero vector: steps are relative to ‖z‖, pick another z")

    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    A64 = A.detach().to(device="cpu", dtype=torch.float64)
    with torch.no_grad():
        f0 = f(z).detach().to(device="cpu", dtype=torch.float64)
        out: dict[float, tuple[float, float]] = {}
        for e in steps:
            vals: list[float] = []
            for u in dirs:
                delta = (e * znorm * u).to(dtype=z.dtype, device=z.device)
                df = f(z + delta).detach().to(device="cpu", dtype=torch.float64) - f0
                den = float(df.norm())
                if den == 0.0:
                    continue
                lin = A64 @ delta.to(device="cpu", dtype=torch.float64)
                vals.append(float((df - lin).norm()) / den)
            if not vals:
                out[e] = (math.nan, math.nan)
                continue
            t = torch.tensor(vals, dtype=torch.float64)
            std = float(t.std(correction=1)) if len(vals) > 1 else 0.0
            out[e] = (float(t.mean()), std)
    return out


def _scaled_left_factor(M: torch.Tensor, m: int, name: str) -> torch.Tensor:
    """``U_m Σ_m / ‖Σ_m‖_F`` (float64, ``(rows, m)``) for the top-``m`` SVD of ``M``."""
    if M.ndim != 2:
        raise DiagnosticsError(f"{name} must be a matrix, got shape {tuple(M.shape)}")
    if not 1 <= m <= min(M.shape):
        raise DiagnosticsError(f"rank m must be in [1, {min(M.shape)}] for {name}, got {m}")
    if not bool(torch.isfinite(M).all()):
        raise DiagnosticsError(f"{name} has NaN or inf entries")
    work = torch.promote_types(M.dtype, torch.float32)
    U, s, _ = torch.linalg.svd(M.detach().to(work), full_matrices=False)
    U64, s64 = U[:, :m].to(torch.float64), s[:m].to(torch.float64)
    fro = float(s64.norm())
    if fro == 0.0:
        raise DiagnosticsError(f"{name} is the zero matrix: its alignment is undefined")
    return (U64 * s64) / fro


def alignment_score(W: torch.Tensor, X: torch.Tensor, m: int) -> float:
    """Subspace similarity ``sim_m(W, X)`` of spec §6, in ``[0, 1]``.

    ``‖(U_W Σ_W)ᵀ (U_X Σ_X)‖_* / (‖Σ_W‖_F ‖Σ_X‖_F)`` with the top-``m`` singular triplets of
    each matrix (left singular vectors: the output subspaces the maps write to). It is 1 for
    ``W = X`` (and for any positive multiple), at most 1 by Hölder's inequality, and symmetric.
    ``W`` and ``X`` need the same number of rows.
    """
    if W.ndim != 2 or X.ndim != 2 or W.shape[0] != X.shape[0]:
        raise DiagnosticsError(
            f"W and X must be matrices with the same number of rows, got {tuple(W.shape)} "
            f"and {tuple(X.shape)}"
        )
    bw = _scaled_left_factor(W, m, "W")
    bx = _scaled_left_factor(X, m, "X")
    return min(1.0, float(torch.linalg.matrix_norm(bw.T @ bx, ord="nuc")))


def alignment_matrix(jacobians: torch.Tensor, m: int) -> torch.Tensor:
    """Pairwise :func:`alignment_score` of ``n`` Jacobians ``(n, d, d)`` → ``(n, n)`` float64.

    Each SVD is computed once; the result is symmetric with a unit diagonal.
    """
    if jacobians.ndim != 3 or jacobians.shape[0] == 0:
        raise DiagnosticsError(
            f"jacobians must have shape (n, d, d) with n ≥ 1, got {tuple(jacobians.shape)}"
        )
    B = torch.stack([_scaled_left_factor(J, m, f"jacobians[{i}]") for i, J in enumerate(jacobians)])
    G = B.transpose(1, 2).unsqueeze(1) @ B.unsqueeze(0)  # (n, n, m, m)
    S = torch.linalg.matrix_norm(G, ord="nuc")
    S = 0.5 * (S + S.T)
    S.fill_diagonal_(1.0)
    return S.clamp_(0.0, 1.0)


def _mean_off_diagonal(S: torch.Tensor) -> float:
    n = S.shape[0]
    if n < 2:
        raise DiagnosticsError("need at least two matrices for a pairwise mean")
    mask = ~torch.eye(n, dtype=torch.bool)
    return float(S[mask].mean())


def random_baseline(d: int, m: int, n: int = 10, seed: int = 0) -> float:
    """Mean pairwise ``sim_m`` of ``n`` random ``d×d`` Gaussian matrices with unit columns.

    The chance level for :func:`alignment_matrix` scores (spec §6 baseline). Deterministic in
    ``seed``; ``n ≥ 2``.
    """
    if d < 1 or n < 2:
        raise DiagnosticsError(f"random_baseline needs d ≥ 1 and n ≥ 2, got d={d}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(n, d, d, generator=gen, dtype=torch.float32)
    M = M / M.norm(dim=1, keepdim=True)  # unit-norm columns
    return _mean_off_diagonal(alignment_matrix(M, m))
