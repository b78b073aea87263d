"""The a-posteriori tracking-error bound of A-LQR (spec §6, "Thm 4.2"), off-by-one fixed.

Closed loop ``Ā_k = A_k − K_k`` (B = I); Lyapunov-type weights ``P_L = I``,
``P_k = Ā_kᵀ P_{k+1} Ā_k + I``; ``‖x‖_P = sqrt(xᵀ P x)``. For measured deviation trajectories
``δz_0 … δz_L`` the residual of the linear model is ``r_k = δz_{k+1} − Ā_k δz_k``, so exactly::

    δz_k = Φ(k,0) δz_0 + Σ_{i<k} Φ(k,i+1) r_i,      Φ(k,i) = Ā_{k−1} ⋯ Ā_i  (k−i factors),
                                                     Φ(k,k) = I

and the triangle inequality gives, with ``‖r_i‖_{P_{i+1}} ≤ (L_i/2) ‖δz_i‖²_{P_i}``::

    ‖δz_k‖_{P_k} ≤ ‖Φ(k,0)‖_{P_0→P_k} ‖δz_0‖_{P_0}
                   + Σ_{i<k} ‖Φ(k,i+1)‖_{P_{i+1}→P_k} (L_i/2) ‖δz_i‖²_{P_i}

Differences from the reference code (``linearity/tracking_bound.py``):

* ``Φ(k,0)`` has exactly ``k`` factors (the reference multiplies ``k−1``).
* ``r_i`` lives at layer ``i+1``, so it is measured in ``P_{i+1}`` — the norm the induced norm
  ``‖Φ(k,i+1)‖_{P_{i+1}→P_k}`` expects — and ``L_i = max_rollouts 2‖r_i‖_{P_{i+1}} /
  ‖δz_i‖²_{P_i}``. With this choice the bound holds for every rollout by construction (the
  reference code measures ``r_i`` in ``P_i``, which does not chain).
* The induced norm ``‖M‖_{Pa→Pb} = sqrt(λ_max(Pa⁻¹ Mᵀ Pb M))`` is computed as the spectral
  norm of ``Lbᵀ M La⁻ᵀ`` with ``Pa = La Laᵀ``, ``Pb = Lb Lbᵀ`` (Cholesky, triangular solve) —
  the same number, without forming ``Pa⁻¹`` or a non-symmetric eigenproblem.

The bound uses the measured ``‖δz_i‖``: it is an a-posteriori consistency check of the
linear model, not an a-priori certificate. Everything is computed in float64. Cost: ``O(L²)``
``d×d`` products and spectral norms (all pairs ``Φ(k,i)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from steerlab.diagnostics.linearity import DiagnosticsError

__all__ = [
    "TrackingBound",
    "closed_loop",
    "induced_norm",
    "lyapunov_weights",
    "p_norm",
    "tracking_bound",
    "transition",
    "transition_norms",
]


@dataclass
class TrackingBound:
    """Result of :func:`tracking_bound`; all tensors float64 on the CPU.

    Per layer ``k = 0 … L`` (``L+1`` entries):

    * ``bound`` — the worst case over rollouts of each rollout's own bound;
    * ``measured`` — the worst case over rollouts of ``‖δz_k‖_{P_k}`` (the error envelope);
    * ``measured_mean`` — the mean over rollouts of ``‖δz_k‖_{P_k}``.

    Each rollout's measured norm is below its own bound, hence ``measured ≤ bound``. When a
    reference was given, all of these (and the per-rollout arrays) are divided by
    ``reference_norm[k]``. ``lipschitz`` is the ``(L,)`` vector of ``L_k`` estimates
    (``inf`` if some rollout has ``δz_k = 0`` but ``r_k ≠ 0``).
    """

    bound: torch.Tensor
    measured: torch.Tensor
    measured_mean: torch.Tensor
    bound_per_rollout: torch.Tensor  # (n, L+1)
    measured_per_rollout: torch.Tensor  # (n, L+1)
    lipschitz: torch.Tensor  # (L,)
    transition_norms: torch.Tensor  # (L+1, L+1): [k, i] = ‖Φ(k,i)‖_{P_i→P_k}, nan for i > k
    reference_norm: torch.Tensor | None  # (L+1,)

    def holds(self, rtol: float = 1e-9, atol: float = 1e-12) -> bool:
        """Whether every rollout's measured error is within its bound (up to rounding)."""
        ok = self.measured_per_rollout <= self.bound_per_rollout * (1.0 + rtol) + atol
        return bool(ok.all())


def _as64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=torch.float64)


def _check_pair(A: torch.Tensor, K: torch.Tensor) -> None:
    if A.ndim != 3 or A.shape[1] != A.shape[2] or A.shape[0] == 0:
        raise DiagnosticsError(f"A must have shape (L, d, d) with L ≥ 1, got {tuple(A.shape)}")
    if K.shape != A.shape:
        raise DiagnosticsError(f"K must have A's shape {tuple(A.shape)}, got {tuple(K.shape)}")
    if not bool(torch.isfinite(A).all()) or not bool(torch.isfinite(K).all()):
        raise DiagnosticsError("A and K must be finite")


def closed_loop(A: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """``Ā_k = A_k − K_k`` (B = I), float64 ``(L, d, d)``."""
    _check_pair(A, K)
    return _as64(A) - _as64(K)


def lyapunov_weights(Abar: torch.Tensor) -> torch.Tensor:
    """``P`` ``(L+1, d, d)``: ``P_L = I``, ``P_k = Ā_kᵀ P_{k+1} Ā_k + I`` (symmetrised)."""
    Ab = _as64(Abar)
    L, d, _ = Ab.shape
    P = torch.empty((L + 1, d, d), dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    P[L] = eye
    for k in range(L - 1, -1, -1):
        M = Ab[k].T @ P[k + 1] @ Ab[k] + eye
        P[k] = 0.5 * (M + M.T)
    if not bool(torch.isfinite(P).all()):
        raise DiagnosticsError(
            "the Lyapunov weights P_k overflowed: the closed loop Ā_k = A_k − K_k grows too "
            "fast over the horizon for a float64 bound"
        )
    return P


def p_norm(x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``sqrt(xᵀ P x)`` over the last axis of ``x`` (any leading batch shape)."""
    x64, P64 = _as64(x), _as64(P)
    quad = torch.einsum("...i,ij,...j->...", x64, P64, x64)
    return quad.clamp_min(0.0).sqrt()


def transition(Abar: torch.Tensor, k: int, i: int) -> torch.Tensor:
    """``Φ(k,i) = Ā_{k−1} ⋯ Ā_i`` — exactly ``k−i`` factors, ``Φ(k,k) = I`` (0 ≤ i ≤ k ≤ L)."""
    Ab = _as64(Abar)
    L, d, _ = Ab.shape
    if not 0 <= i <= k <= L:
        raise DiagnosticsError(f"transition needs 0 ≤ i ≤ k ≤ {L}, got k={k}, i={i}")
    Phi = torch.eye(d, dtype=torch.float64)
    for j in range(i, k):
        Phi = Ab[j] @ Phi
    return Phi


def _cholesky(P: torch.Tensor, what: str) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(P)
    if int(info) != 0:
        raise DiagnosticsError(f"{what} is not positive definite")
    return chol


def _induced(M: torch.Tensor, chol_a: torch.Tensor, chol_b: torch.Tensor) -> float:
    # ‖M‖_{Pa→Pb} = ‖Lbᵀ M La⁻ᵀ‖₂ where P = L Lᵀ.
    X = torch.linalg.solve_triangular(chol_a.T, chol_b.T @ M, upper=True, left=False)
    return float(torch.linalg.matrix_norm(X, ord=2))


def induced_norm(M: torch.Tensor, Pa: torch.Tensor, Pb: torch.Tensor) -> float:
    """``‖M‖_{Pa→Pb} = sup ‖Mx‖_{Pb} / ‖x‖_{Pa} = sqrt(λ_max(Pa⁻¹ Mᵀ Pb M))`` (Cholesky)."""
    return _induced(_as64(M), _cholesky(_as64(Pa), "Pa"), _cholesky(_as64(Pb), "Pb"))


def transition_norms(Abar: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``N`` ``(L+1, L+1)`` with ``N[k, i] = ‖Φ(k,i)‖_{P_i→P_k}`` for ``i ≤ k``, ``nan`` above."""
    Ab, P64 = _as64(Abar), _as64(P)
    L = Ab.shape[0]
    chol = [_cholesky(P64[k], f"P_{k}") for k in range(L + 1)]
    N = torch.full((L + 1, L + 1), math.nan, dtype=torch.float64)
    for i in range(L + 1):
        N[i, i] = 1.0
        Phi = torch.eye(Ab.shape[1], dtype=torch.float64)
        for k in range(i, L):
            Phi = Ab[k] @ Phi  # now Φ(k+1, i), k+1−i factors
            N[k + 1, i] = _induced(Phi, chol[i], chol[k + 1])
    return N


def _reference_norms(reference: torch.Tensor | float, P: torch.Tensor) -> torch.Tensor:
    L1, d = P.shape[0], P.shape[1]
    if isinstance(reference, int | float):
        ref = torch.full((L1,), float(reference), dtype=torch.float64)
    else:
        r64 = _as64(reference)
        if r64.shape == (L1, d):
            ref = torch.stack([p_norm(r64[k], P[k]) for k in range(L1)])
        elif r64.shape == (L1,):
            ref = r64
        else:
            raise DiagnosticsError(
                f"reference must be activations ({L1}, {d}), norms ({L1},) or a number, "
                f"got shape {tuple(r64.shape)}"
            )
    if not bool(torch.isfinite(ref).all()) or bool((ref <= 0).any()):
        raise DiagnosticsError("reference norms must be positive and finite")
    return ref


def tracking_bound(
    A: torch.Tensor,
    K: torch.Tensor,
    deltas: torch.Tensor,
    *,
    reference: torch.Tensor | float | None = None,
) -> TrackingBound:
    """Per-layer tracking-error bound and measured error for deviation rollouts.

    ``A``, ``K``: ``(L, d, d)`` Jacobians and gains. ``deltas``: ``(n, L+1, d)`` measured
    deviation trajectories ``δz_0 … δz_L`` (or ``(L+1, d)`` for one) — e.g. the LFS error
    ``δz_k = −α_k v_k``, or steered-minus-reference activations. ``reference`` optionally
    normalises both sides per layer: activations ``(L+1, d)`` (divide by ``‖ref_k‖_{P_k}``, the
    spec's "P_k-norm of a mean activation"), ready-made norms ``(L+1,)``, or one number.
    """
    _check_pair(A, K)
    L, d, _ = A.shape
    dz = _as64(deltas)
    if dz.ndim == 2:
        dz = dz.unsqueeze(0)
    if dz.ndim != 3 or tuple(dz.shape[1:]) != (L + 1, d) or dz.shape[0] == 0:
        raise DiagnosticsError(
            f"deltas must have shape (n, {L + 1}, {d}) (δz_0 … δz_L), got {tuple(deltas.shape)}"
        )
    if not bool(torch.isfinite(dz).all()):
        raise DiagnosticsError("deltas have NaN or inf entries")

    Abar = closed_loop(A, K)
    P = lyapunov_weights(Abar)
    N = transition_norms(Abar, P)

    # ‖δz_k‖_{P_k} per rollout and layer: (n, L+1)
    meas = torch.stack([p_norm(dz[:, k], P[k]) for k in range(L + 1)], dim=1)
    # residuals r_k = δz_{k+1} − Ā_k δz_k, measured in P_{k+1}: (n, L)
    res = dz[:, 1:] - torch.einsum("kij,nkj->nki", Abar, dz[:, :-1])
    rnorm = torch.stack([p_norm(res[:, k], P[k + 1]) for k in range(L)], dim=1)
    sq = meas[:, :-1] ** 2  # ‖δz_i‖²_{P_i}, (n, L)

    zero_state = sq == 0
    ratio = torch.where(
        zero_state,
        torch.where(rnorm == 0, torch.zeros_like(rnorm), torch.full_like(rnorm, math.inf)),
        2.0 * rnorm / torch.where(zero_state, torch.ones_like(sq), sq),
    )
    lip = ratio.max(dim=0).values  # (L,)
    # (L_i/2)‖δz_i‖² per rollout, with inf·0 resolved per rollout: 0 if that rollout's r_i = 0.
    term = torch.where(
        zero_state,
        torch.where(rnorm == 0, torch.zeros_like(sq), torch.full_like(sq, math.inf)),
        0.5 * lip.unsqueeze(0) * sq,
    )
    # M[k, i] = ‖Φ(k, i+1)‖ for i < k, else 0
    M = torch.zeros((L + 1, L), dtype=torch.float64)
    for k in range(1, L + 1):
        M[k, :k] = N[k, 1 : k + 1]
    bound = meas[:, :1] * N[:, 0].unsqueeze(0) + _safe_matmul(term, M.T)

    ref = None
    if reference is not None:
        ref = _reference_norms(reference, P)
        bound = bound / ref
        meas = meas / ref
    return TrackingBound(
        bound=bound.max(dim=0).values,
        measured=meas.max(dim=0).values,
        measured_mean=meas.mean(dim=0),
        bound_per_rollout=bound,
        measured_per_rollout=meas,
        lipschitz=lip,
        transition_norms=N,
        reference_norm=ref,
    )


def _safe_matmul(term: torch.Tensor, MT: torch.Tensor) -> torch.Tensor:
    """``term @ MT`` where ``inf · 0`` counts as 0 (an infinite term only where it is used)."""
    if bool(torch.isfinite(term).all()):
        return term @ MT
    finite = torch.where(torch.isfinite(term), term, torch.zeros_like(term)) @ MT
    hits = (~torch.isfinite(term)).to(torch.float64) @ (MT > 0).to(torch.float64)
    return torch.where(hits > 0, torch.full_like(finite, math.inf), finite)
