"""Finite-horizon, time-varying LQR gains for the residual stream (B = I).

The deviation dynamics over the ``L`` blocks are ``δz_{k+1} = A_k δz_k + u_k`` and the cost is
``δz_Lᵀ Q_f δz_L + Σ_k (δz_kᵀ Q δz_k + u_kᵀ R u_k)`` with isotropic weights ``Q = q·I``,
``R = r·I``, ``Q_f = q_f·I`` (spec §4). The backward Riccati recursion is::

    S_L = q_f·I
    for k = L-1 … 0:
        P_k = S_{k+1} + r·I              (symmetric positive definite: eigenvalues ≥ r)
        F_k = S_{k+1} A_k
        K_k = P_k⁻¹ F_k                  (Cholesky solve, never an explicit inverse)
        S_k = q·I + A_kᵀ S_{k+1} A_k − F_kᵀ K_k

and the optimal law is ``u_k = −K_k δz_k``.

Numerical choices:

* Everything is computed in float64 (one layer of ``A`` is cast at a time), results are cast
  back to float32 (float64 when ``A`` is float64).
* ``S_k`` is updated with the algebraically identical, cancellation-free form
  ``S_k = q·I + r·A_kᵀ K_k``: since ``P_k`` and ``S_{k+1}`` commute,
  ``S − S P⁻¹ S = S P⁻¹ (P − S) = r·P⁻¹ S``, so ``AᵀSA − FᵀK = r·Aᵀ P⁻¹ S A = r·AᵀK``. The
  textbook form subtracts two large PSD terms when ``S ≫ r`` and loses digits; this one does
  not. ``S_k`` is then symmetrised.
* The condition number of every ``P_k`` is computed exactly (``eigvalsh``). Above
  ``cond_limit`` the solve is untrustworthy: raise :class:`LQRError` (default) or warn with
  :class:`LQRConditioningWarning`. The remedy is a larger ``r`` (or smaller ``q``/``q_f``).

Online, A-LQR only needs ``w_{c,k} = K_k v_{c,k}`` per concept: ``u_k = K_k(α_k v_k) = α_k w_k``
and, for several concepts sharing the gains, ``K_k(Σ_c α_c v_c) = Σ_c α_c w_c``.
:func:`lqr_gains` computes those vectors layer by layer and, unless ``keep_K``, never holds
more than one ``d×d`` gain at a time.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from steerlab.errors import SteerlabError

__all__ = [
    "LQRConditioningWarning",
    "LQRError",
    "LQRGains",
    "lqr_gains",
    "riccati",
]

OnIllConditioned = Literal["raise", "warn"]


class LQRError(SteerlabError):
    """Bad LQR inputs (weights, Jacobians, directions) or a numerically unusable recursion."""


class LQRConditioningWarning(UserWarning):
    """A Riccati step solved an ill-conditioned ``P_k`` (``on_ill_conditioned="warn"``)."""


@dataclass
class LQRGains:
    """Result of :func:`lqr_gains`.

    ``K`` is ``(L, d, d)`` only when ``keep_K=True`` (else ``None``). ``W`` is ``(C, L, d)``
    with ``W[c, k] = K_k v_{c,k}``; it has a concept axis even for one ``(L, d)`` direction
    stack. ``cond_max`` is the worst condition number of the ``P_k`` (``nan`` when the check
    was disabled with ``cond_limit=None``); ``seconds`` is the wall time of the recursion.
    """

    K: torch.Tensor | None
    W: torch.Tensor
    cond_max: float
    seconds: float


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LQRError(f"LQR weight {name} must be a positive finite number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise LQRError(
            f"LQR weight {name} must be a positive finite number, got {v!r} "
            f"({name}·I must be positive definite)"
        )
    return v


def _check_A(A: torch.Tensor) -> None:
    if not isinstance(A, torch.Tensor):
        raise LQRError(f"A must be a torch.Tensor of shape (L, d, d), got {type(A).__name__}")
    if A.ndim != 3 or A.shape[1] != A.shape[2] or A.shape[0] == 0 or A.shape[1] == 0:
        raise LQRError(f"A must have shape (L, d, d) with L, d ≥ 1, got {tuple(A.shape)}")
    if not A.is_floating_point():
        raise LQRError(f"A must be a floating-point tensor, got dtype {A.dtype}")
    finite = torch.isfinite(A).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = [int(i) for i in torch.nonzero(~finite).flatten().tolist()]
        shown = ", ".join(str(i) for i in bad[:10]) + (", …" if len(bad) > 10 else "")
        raise LQRError(
            f"A has NaN or inf entries at layer(s) {shown}; recompute those Jacobians "
            "(check the model's dtype and the prompts used to linearise)"
        )


def _check_mode(on_ill_conditioned: str, cond_limit: float | None) -> None:
    if on_ill_conditioned not in ("raise", "warn"):
        raise LQRError(f"on_ill_conditioned must be 'raise' or 'warn', got {on_ill_conditioned!r}")
    if cond_limit is not None and (
        isinstance(cond_limit, bool)
        or not isinstance(cond_limit, int | float)
        or not cond_limit > 1.0
    ):
        raise LQRError(f"cond_limit must be a number > 1 (or None to skip), got {cond_limit!r}")


def _out_dtype(A: torch.Tensor) -> torch.dtype:
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def _backward(
    A: torch.Tensor,
    q: float,
    r: float,
    q_f: float,
    cond_limit: float | None,
    on_ill_conditioned: str,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, float]]:
    """Yield ``(k, K_k, S_k, cond(P_k))`` for k = L-1 … 0, all float64 on ``A.device``.

    Before the first yield the caller may not see ``S_L``; it is ``q_f·I``.
    """
    L, d, _ = A.shape
    eye = torch.eye(d, dtype=torch.float64, device=A.device)
    S = q_f * eye
    for k in range(L - 1, -1, -1):
        Ak = A[k].to(torch.float64)
        P = S + r * eye
        cond = math.nan
        if cond_limit is not None:
            ev = torch.linalg.eigvalsh(P)
            lo, hi = float(ev[0]), float(ev[-1])
            cond = hi / lo if lo > 0.0 else math.inf
            if cond > cond_limit:
                msg = (
                    f"Riccati step at layer {k}: P_{k} = S_{k + 1} + r·I has condition number "
                    f"{cond:.3g} > cond_limit {cond_limit:.3g}, so the gain K_{k} is numerically "
                    f"unreliable; raise r (now {r:g}) or lower q/q_f (now {q:g}/{q_f:g})"
                )
                if on_ill_conditioned == "raise":
                    raise LQRError(msg)
                warnings.warn(msg, LQRConditioningWarning, stacklevel=3)
        chol, info = torch.linalg.cholesky_ex(P)
        if int(info) != 0:
            raise LQRError(
                f"Riccati step at layer {k}: P_{k} = S_{k + 1} + r·I is not positive definite "
                f"(Cholesky failed); the recursion has diverged — raise r (now {r:g})"
            )
        F = S @ Ak
        K = torch.cholesky_solve(F, chol)
        S = q * eye + r * (Ak.mT @ K)
        S = 0.5 * (S + S.mT)
        if not bool(torch.isfinite(S).all()) or not bool(torch.isfinite(K).all()):
            raise LQRError(
                f"Riccati step at layer {k} overflowed (non-finite S_{k} or K_{k}); the "
                "Jacobians are too large for this horizon — rescale them or raise r"
            )
        yield k, K, S, cond


def riccati(
    A: torch.Tensor,
    q: float,
    r: float,
    q_f: float,
    *,
    cond_limit: float | None = 1e8,
    on_ill_conditioned: OnIllConditioned = "raise",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain backward recursion: gains ``K`` ``(L, d, d)``, costs-to-go ``S`` ``(L+1, d, d)``.

    ``S[L] = q_f·I`` and ``δz_0ᵀ S[0] δz_0`` is the optimal cost from ``δz_0``. Both are
    float32 (float64 when ``A`` is float64). Holds all of ``K`` and ``S``: meant for tests and
    diagnostics; :func:`lqr_gains` is the memory-lean path.
    """
    q, r, q_f = _check_weight("q", q), _check_weight("r", r), _check_weight("q_f", q_f)
    _check_A(A)
    _check_mode(on_ill_conditioned, cond_limit)
    L, d, _ = A.shape
    out = _out_dtype(A)
    K_all = torch.empty((L, d, d), dtype=out, device=A.device)
    S_all = torch.empty((L + 1, d, d), dtype=out, device=A.device)
    S_all[L] = q_f * torch.eye(d, dtype=out, device=A.device)
    for k, K, S, _cond in _backward(A, q, r, q_f, cond_limit, on_ill_conditioned):
        K_all[k] = K.to(out)
        S_all[k] = S.to(out)
    return K_all, S_all


def lqr_gains(
    A: torch.Tensor,
    V: torch.Tensor,
    *,
    q: float = 0.1,
    r: float = 3.0,
    q_f: float = 0.1,
    keep_K: bool = False,
    cond_limit: float | None = 1e8,
    on_ill_conditioned: OnIllConditioned = "raise",
) -> LQRGains:
    """LQR gains for A-LQR: the online vectors ``W[c, k] = K_k v_{c,k}`` (and optionally ``K``).

    ``A`` is ``(L, d, d)`` (the averaged block Jacobians). ``V`` is ``(C, L, d)`` — one feature
    direction per concept and layer — or ``(L, d)`` for one concept; directions are normally
    unit vectors (or zero where the class gap vanished), but ``W`` is linear in ``V`` so any
    scaling is passed through. The defaults ``q=0.1, r=3, q_f=0.1`` are the Gemma-2-2B toxicity
    setting of the paper's scripts. ``cond_limit=None`` skips the conditioning check (faster:
    no eigenvalue solve; ``cond_max`` is then ``nan``). Results are float32 (float64 when ``A``
    is float64) on ``A``'s device.
    """
    start = time.perf_counter()
    q, r, q_f = _check_weight("q", q), _check_weight("r", r), _check_weight("q_f", q_f)
    _check_A(A)
    _check_mode(on_ill_conditioned, cond_limit)
    L, d, _ = A.shape
    if not isinstance(V, torch.Tensor) or not V.is_floating_point():
        raise LQRError("V must be a floating-point torch.Tensor of shape (C, L, d) or (L, d)")
    Vc = V.unsqueeze(0) if V.ndim == 2 else V
    if Vc.ndim != 3 or tuple(Vc.shape[1:]) != (L, d) or Vc.shape[0] == 0:
        raise LQRError(
            f"V must have shape (C, {L}, {d}) or ({L}, {d}) to match A {tuple(A.shape)}, "
            f"got {tuple(V.shape)}"
        )
    if not bool(torch.isfinite(Vc).all()):
        raise LQRError("V has NaN or inf entries; recompute the feature directions")
    out = _out_dtype(A)
    Vc = Vc.to(device=A.device)
    W = torch.empty((Vc.shape[0], L, d), dtype=out, device=A.device)
    K_all = torch.empty((L, d, d), dtype=out, device=A.device) if keep_K else None
    cond_max = math.nan if cond_limit is None else 0.0
    for k, K, _S, cond in _backward(A, q, r, q_f, cond_limit, on_ill_conditioned):
        W[:, k, :] = (Vc[:, k, :].to(torch.float64) @ K.mT).to(out)
        if K_all is not None:
            K_all[k] = K.to(out)
        if cond_limit is not None:
            cond_max = max(cond_max, cond)
    return LQRGains(K=K_all, W=W, cond_max=cond_max, seconds=time.perf_counter() - start)
