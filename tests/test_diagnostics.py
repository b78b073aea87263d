"""Diagnostics for A-LQR: linearity residuals, Jacobian alignment, tracking bound, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from steerlab.control.riccati import riccati
from steerlab.diagnostics import (
    DiagnosticsError,
    alignment_matrix,
    alignment_score,
    closed_loop,
    default_rank,
    induced_norm,
    linearity_residuals,
    lyapunov_weights,
    p_norm,
    plot_alignment,
    plot_linearity,
    plot_setpoint,
    plot_tracking_bound,
    random_baseline,
    tracking_bound,
    transition,
    transition_norms,
)
from steerlab.errors import SteerlabError

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ linearity residuals


def test_residual_is_zero_for_a_linear_map() -> None:
    g = _gen(0)
    A = torch.randn(8, 8, dtype=F64, generator=g)
    z = torch.randn(8, dtype=F64, generator=g)
    res = linearity_residuals(lambda x: A @ x, z, A)
    assert set(res) == {1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1}
    for mean, std in res.values():
        assert 0.0 <= mean < 1e-10 and std < 1e-10


def test_residual_grows_linearly_with_step_for_a_smooth_map() -> None:
    g = _gen(1)
    d = 10
    A0 = torch.randn(d, d, dtype=F64, generator=g) / math.sqrt(d)
    z = torch.randn(d, dtype=F64, generator=g)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(A0 @ x) + 0.3 * x

    J = torch.autograd.functional.jacobian(f, z)
    res = linearity_residuals(f, z, J, eps=(1e-3, 1e-2, 1e-1), n_dirs=6, seed=3)
    m1, m2, m3 = (res[e][0] for e in (1e-3, 1e-2, 1e-1))
    assert 0 < m1 < m2 < m3
    assert 5.0 < m2 / m1 < 20.0  # first-order residual ∝ ε
    # A wrong Jacobian leaves an O(1) residual even for tiny steps
    wrong = linearity_residuals(f, z, 0.5 * J, eps=(1e-3,))
    assert wrong[1e-3][0] > 0.1


def test_residual_float32_map_and_single_direction() -> None:
    g = _gen(2)
    A = torch.randn(6, 6, generator=g)
    z = torch.randn(6, generator=g)
    res = linearity_residuals(lambda x: A @ x, z, A, eps=(1e-1,), n_dirs=1)
    mean, std = res[1e-1]
    assert mean < 1e-4 and std == 0.0


def test_residual_step_is_relative_to_state_norm() -> None:
    seen: list[float] = []
    z = torch.tensor([3.0, 4.0], dtype=F64)  # ‖z‖ = 5

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(float((x - z).norm()))
        return x

    linearity_residuals(f, z, torch.eye(2, dtype=F64), eps=(1e-2,), n_dirs=3)
    assert seen[0] == 0.0  # f(z)
    assert seen[1:] == pytest.approx([0.05] * 3)


def test_residual_errors() -> None:
    A = torch.eye(3, dtype=F64)
    with pytest.raises(DiagnosticsError, match="zero vector"):
        linearity_residuals(lambda x: x, torch.zeros(3, dtype=F64), A)
    with pytest.raises(DiagnosticsError, match="eps"):
        linearity_residuals(lambda x: x, torch.ones(3, dtype=F64), A, eps=(0.0,))
    with pytest.raises(DiagnosticsError, match="shape"):
        linearity_residuals(lambda x: x, torch.ones(4, dtype=F64), A)
    with pytest.raises(SteerlabError, match="n_dirs"):
        linearity_residuals(lambda x: x, torch.ones(3, dtype=F64), A, n_dirs=0)


# ------------------------------------------------------------------ alignment


def test_alignment_self_scale_symmetry_and_bounds() -> None:
    g = _gen(4)
    W = torch.randn(20, 20, dtype=F64, generator=g)
    X = torch.randn(20, 20, dtype=F64, generator=g)
    for m in (1, 3, 20):
        assert alignment_score(W, W, m) == pytest.approx(1.0, abs=1e-12)
        assert alignment_score(W, 3.5 * W, m) == pytest.approx(1.0, abs=1e-12)
        s = alignment_score(W, X, m)
        assert 0.0 <= s <= 1.0
        assert s == pytest.approx(alignment_score(X, W, m), abs=1e-12)
    # Same left subspace, different right factors → still 1 (the score compares U Σ only).
    Q = torch.linalg.qr(torch.randn(20, 20, dtype=F64, generator=g)).Q
    assert alignment_score(W, W @ Q, 5) == pytest.approx(1.0, abs=1e-10)
    assert alignment_score(W.float(), W.float(), 3) == pytest.approx(1.0, abs=1e-5)


def test_alignment_of_orthogonal_subspaces_is_zero() -> None:
    W = torch.diag(torch.tensor([3.0, 2.0, 0.0, 0.0], dtype=F64))
    X = torch.diag(torch.tensor([0.0, 0.0, 5.0, 1.0], dtype=F64))
    assert alignment_score(W, X, 2) == pytest.approx(0.0, abs=1e-12)


def test_alignment_matches_formula_by_hand() -> None:
    g = _gen(5)
    W = torch.randn(12, 12, dtype=F64, generator=g)
    X = torch.randn(12, 12, dtype=F64, generator=g)
    m = 4
    Uw, sw, _ = torch.linalg.svd(W)
    Ux, sx, _ = torch.linalg.svd(X)
    a = Uw[:, :m] @ torch.diag(sw[:m])
    b = Ux[:, :m] @ torch.diag(sx[:m])
    want = torch.linalg.svdvals(a.T @ b).sum() / (sw[:m].norm() * sx[:m].norm())
    assert alignment_score(W, X, m) == pytest.approx(float(want), rel=1e-10)


def test_alignment_matrix_and_random_baseline() -> None:
    g = _gen(6)
    d, n, m = 32, 5, default_rank(32 * 4)  # m = 6
    assert m == 6 and default_rank(10) == 1
    # Structured Jacobians: a shared dominant low-rank part plus noise → high alignment.
    U = torch.randn(d, 3, dtype=F64, generator=g)
    Vt = torch.randn(3, d, dtype=F64, generator=g)
    J = torch.stack([10 * U @ Vt + torch.randn(d, d, dtype=F64, generator=g) for _ in range(n)])
    S = alignment_matrix(J, m)
    assert S.shape == (n, n) and S.dtype == F64
    torch.testing.assert_close(S, S.T)
    torch.testing.assert_close(S.diagonal(), torch.ones(n, dtype=F64))
    assert float(S.min()) >= 0.0 and float(S.max()) <= 1.0
    assert float(S[1, 3]) == pytest.approx(alignment_score(J[1], J[3], m), abs=1e-12)
    base = random_baseline(d, m, n=6, seed=1)
    assert base == random_baseline(d, m, n=6, seed=1)  # deterministic
    assert 0.0 < base < 0.6
    off = S[~torch.eye(n, dtype=torch.bool)]
    assert float(off.mean()) > base + 0.2


def test_alignment_errors() -> None:
    W = torch.randn(5, 5, dtype=F64)
    with pytest.raises(DiagnosticsError, match="rank m"):
        alignment_score(W, W, 0)
    with pytest.raises(DiagnosticsError, match="rank m"):
        alignment_score(W, W, 6)
    with pytest.raises(DiagnosticsError, match="zero matrix"):
        alignment_score(W, torch.zeros(5, 5, dtype=F64), 2)
    with pytest.raises(DiagnosticsError, match="same number of rows"):
        alignment_score(W, torch.ones(4, 5, dtype=F64), 2)
    with pytest.raises(DiagnosticsError, match="n ≥ 2"):
        random_baseline(5, 2, n=1)


# ------------------------------------------------------------------ tracking bound


def _system(seed: int, L: int = 5, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    A = torch.eye(d, dtype=F64) + 0.5 * torch.randn(L, d, d, dtype=F64, generator=g)
    K, _ = riccati(A, 0.1, 1.0, 0.1)
    return A, K


def test_transition_has_exactly_k_minus_i_factors() -> None:
    L, d = 5, 3
    Abar = torch.stack([(j + 2.0) * torch.eye(d, dtype=F64) for j in range(L)])
    for k in range(L + 1):
        torch.testing.assert_close(transition(Abar, k, k), torch.eye(d, dtype=F64))
        for i in range(k + 1):
            want = math.prod(j + 2.0 for j in range(i, k))  # Ā_{k−1}⋯Ā_i
            torch.testing.assert_close(transition(Abar, k, i), want * torch.eye(d, dtype=F64))
    # Φ(1, 0) = Ā_0 (one factor, the off-by-one the reference code has)
    torch.testing.assert_close(transition(Abar, 1, 0), Abar[0])
    with pytest.raises(DiagnosticsError):
        transition(Abar, 2, 3)


def test_transition_order_is_left_multiplication() -> None:
    g = _gen(7)
    Abar = torch.randn(3, 4, 4, dtype=F64, generator=g)
    torch.testing.assert_close(transition(Abar, 3, 0), Abar[2] @ Abar[1] @ Abar[0])
    torch.testing.assert_close(transition(Abar, 3, 1), Abar[2] @ Abar[1])


def test_lyapunov_weights_and_induced_norm() -> None:
    A, K = _system(8)
    Abar = closed_loop(A, K)
    P = lyapunov_weights(Abar)
    L, d = A.shape[0], A.shape[1]
    torch.testing.assert_close(P[L], torch.eye(d, dtype=F64))
    for k in range(L):
        torch.testing.assert_close(P[k], Abar[k].T @ P[k + 1] @ Abar[k] + torch.eye(d, dtype=F64))
    M = torch.randn(d, d, dtype=F64, generator=_gen(9))
    want = math.sqrt(
        float(torch.linalg.eigvals(torch.linalg.inv(P[0]) @ M.T @ P[3] @ M).real.max())
    )
    assert induced_norm(M, P[0], P[3]) == pytest.approx(want, rel=1e-9)
    N = transition_norms(Abar, P)
    assert N.shape == (L + 1, L + 1)
    assert bool(torch.isnan(N[0, 1])) and float(N[2, 2]) == 1.0
    assert float(N[4, 1]) == pytest.approx(induced_norm(transition(Abar, 4, 1), P[1], P[4]))
    x = torch.randn(3, d, dtype=F64, generator=_gen(10))
    torch.testing.assert_close(p_norm(x, P[2]), torch.sqrt(((x @ P[2]) * x).sum(-1)))


def _rollouts(A: torch.Tensor, K: torch.Tensor, z0: torch.Tensor, c: float) -> torch.Tensor:
    """Closed-loop rollouts of δz_{k+1} = A_k δz_k − K_k δz_k + c·(δz_k ⊙ δz_k)."""
    traj = [z0]
    z = z0
    for k in range(A.shape[0]):
        z = z @ (A[k] - K[k]).T + c * z * z
        traj.append(z)
    return torch.stack(traj, dim=1)


def test_bound_holds_on_a_nonlinear_closed_loop() -> None:
    A, K = _system(11)
    L = A.shape[0]
    g = _gen(12)
    z0 = torch.randn(16, A.shape[1], dtype=F64, generator=g)
    z0 = z0 * torch.logspace(-2, 0, 16, dtype=F64).unsqueeze(1)
    deltas = _rollouts(A, K, z0, c=0.2)
    tb = tracking_bound(A, K, deltas)
    assert tb.bound.shape == (L + 1,) and tb.measured.shape == (L + 1,)
    assert tb.bound_per_rollout.shape == (16, L + 1)
    assert tb.holds()
    assert bool((tb.measured <= tb.bound * (1 + 1e-9)).all())
    assert bool((tb.measured_mean <= tb.measured + 1e-15).all())
    assert bool((tb.lipschitz > 0).all())
    # layer 0: the bound is ‖Φ(0,0)‖·‖δz_0‖ = ‖δz_0‖ exactly
    torch.testing.assert_close(tb.bound[0], tb.measured[0])


def test_bound_is_exact_for_a_linear_system_on_the_worst_direction() -> None:
    A, K = _system(13)
    Abar = closed_loop(A, K)
    P = lyapunov_weights(Abar)
    k = 3
    # worst direction of Φ(k,0) from P_0 to P_k: x = L0⁻ᵀ y with y the top right singular
    # vector of Lkᵀ Φ L0⁻ᵀ.
    L0 = torch.linalg.cholesky(P[0])
    Lk = torch.linalg.cholesky(P[k])
    X = Lk.T @ transition(Abar, k, 0) @ torch.linalg.inv(L0.T)
    y = torch.linalg.svd(X).Vh[0]
    x = torch.linalg.solve(L0.T, y)
    g = _gen(14)
    z0 = torch.cat([x.unsqueeze(0), torch.randn(3, A.shape[1], dtype=F64, generator=g)])
    tb = tracking_bound(A, K, _rollouts(A, K, z0, c=0.0))
    assert float(tb.lipschitz.abs().max()) < 1e-10
    torch.testing.assert_close(
        tb.bound_per_rollout[0, k], tb.measured_per_rollout[0, k], rtol=1e-9, atol=1e-12
    )
    assert tb.holds()
    N = tb.transition_norms
    torch.testing.assert_close(
        tb.bound_per_rollout[:, 4], N[4, 0] * p_norm(z0, P[0]), rtol=1e-9, atol=1e-9
    )


def test_bound_reference_normalisation_and_single_rollout() -> None:
    A, K = _system(15)
    L, d = A.shape[0], A.shape[1]
    z0 = 0.1 * torch.randn(d, dtype=F64, generator=_gen(16))
    deltas = _rollouts(A, K, z0.unsqueeze(0), c=0.1)[0]  # (L+1, d): one rollout
    raw = tracking_bound(A, K, deltas)
    ref_acts = torch.randn(L + 1, d, dtype=F64, generator=_gen(17)) + 3.0
    normed = tracking_bound(A, K, deltas, reference=ref_acts)
    assert normed.reference_norm is not None
    P = lyapunov_weights(closed_loop(A, K))
    want_ref = torch.stack([p_norm(ref_acts[k], P[k]) for k in range(L + 1)])
    torch.testing.assert_close(normed.reference_norm, want_ref)
    torch.testing.assert_close(normed.bound, raw.bound / want_ref)
    torch.testing.assert_close(normed.measured, raw.measured / want_ref)
    by_norms = tracking_bound(A, K, deltas, reference=want_ref)
    torch.testing.assert_close(by_norms.bound, normed.bound)
    assert tracking_bound(A, K, deltas, reference=2.0).bound[0] == pytest.approx(
        float(raw.bound[0]) / 2.0
    )
    with pytest.raises(DiagnosticsError, match="reference"):
        tracking_bound(A, K, deltas, reference=torch.ones(L, dtype=F64))


def test_bound_zero_rollouts_and_input_errors() -> None:
    A, K = _system(18)
    L, d = A.shape[0], A.shape[1]
    z0 = 0.1 * torch.randn(2, d, dtype=F64, generator=_gen(19))
    deltas = torch.cat([_rollouts(A, K, z0, c=0.1), torch.zeros(1, L + 1, d, dtype=F64)])
    tb = tracking_bound(A, K, deltas)
    assert bool(torch.isfinite(tb.bound).all()) and tb.holds()
    assert bool((tb.bound_per_rollout[2] == 0).all())
    # a rollout that jumps away from δz = 0 breaks the quadratic model: L_k = inf
    jump = torch.zeros(1, L + 1, d, dtype=F64)
    jump[0, 2:] = 1.0
    tb2 = tracking_bound(A, K, torch.cat([deltas, jump]))
    assert math.isinf(float(tb2.lipschitz[1])) and tb2.holds()
    with pytest.raises(DiagnosticsError, match="deltas must have shape"):
        tracking_bound(A, K, torch.zeros(2, L, d, dtype=F64))
    with pytest.raises(DiagnosticsError, match="K must have"):
        tracking_bound(A, K[:-1], deltas)


# ------------------------------------------------------------------ plots


def _check_outputs(paths: list[Path], tmp_path: Path) -> dict[str, object]:
    assert paths and all(p.parent == tmp_path and p.is_file() for p in paths)
    pngs = [p for p in paths if p.suffix == ".png"]
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    md = [p for p in paths if p.suffix == ".md"]
    assert len(md) == 1 and "|---|" in md[0].read_text()
    js = [p for p in paths if p.suffix == ".json"]
    assert len(js) == 1
    assert not list(tmp_path.glob("*.tmp"))
    data = json.loads(js[0].read_text())  # strict JSON (no NaN)
    assert isinstance(data, dict)
    return data


def test_plot_linearity(tmp_path: Path) -> None:
    by_layer = {
        0: {1e-3: (1e-3, 1e-4), 1e-2: (1e-2, 1e-3), 1e-1: (1e-1, 1e-2)},
        6: {1e-3: (2e-3, 1e-4), 1e-2: (2e-2, 1e-3), 1e-1: (math.nan, math.nan)},
    }
    paths = plot_linearity(by_layer, tmp_path)
    assert [p.name for p in paths] == ["linearity.png", "linearity.json", "linearity.md"]
    data = _check_outputs(paths, tmp_path)
    assert data["kind"] == "linearity"
    layers = data["layers"]
    assert isinstance(layers, dict) and layers["6"][2]["mean"] is None
    assert layers["0"][1] == {"eps": 1e-2, "mean": 1e-2, "std": 1e-3}


def test_plot_alignment_with_matrices_and_scalars(tmp_path: Path) -> None:
    S = alignment_matrix(torch.randn(3, 8, 8, dtype=F64, generator=_gen(20)), 2)
    paths = plot_alignment({0: S, 6: [0.7, 0.8], 12: 0.5}, {0: 0.1, 6: 0.1, 12: 0.1}, tmp_path)
    assert (tmp_path / "alignment_matrices.png") in paths
    data = _check_outputs(paths, tmp_path)
    layers = data["layers"]
    assert isinstance(layers, dict)
    assert layers["0"]["n_pairs"] == 6 and layers["12"]["std"] == 0.0
    assert layers["6"]["mean"] == pytest.approx(0.75)
    plain = plot_alignment({1: 0.4}, 0.2, tmp_path / "b")
    assert len(plain) == 3
    with pytest.raises(DiagnosticsError, match="lacks layer"):
        plot_alignment({1: 0.4}, {2: 0.1}, tmp_path)


def test_plot_tracking_bound(tmp_path: Path) -> None:
    A, K = _system(21)
    z0 = 0.1 * torch.randn(4, A.shape[1], dtype=F64, generator=_gen(22))
    tb = tracking_bound(A, K, _rollouts(A, K, z0, c=0.1))
    paths = plot_tracking_bound(tb.bound, tb.measured, tmp_path, measured_mean=tb.measured_mean)
    data = _check_outputs(paths, tmp_path)
    assert data["holds_all"] is True and len(data["bound"]) == A.shape[0] + 1  # type: ignore[arg-type]
    with pytest.raises(DiagnosticsError, match="same length"):
        plot_tracking_bound([1.0, 2.0], [1.0], tmp_path)


def test_plot_setpoint(tmp_path: Path) -> None:
    mu = torch.tensor([1.0, 2.0, 4.0])
    target = 1.5 * mu
    proj = torch.tensor([1.55, 2.0, 6.1])  # inside, outside, inside
    paths = plot_setpoint(proj, target, mu, tmp_path, label="tox λ=1.5 / gemma")
    assert all(p.name.startswith("setpoint_tox_") for p in paths)
    assert "/" not in paths[0].name.removeprefix("setpoint_")
    data = _check_outputs(paths, tmp_path)
    assert data["within_band"] == [True, False, True]
    assert data["fraction_within_band"] == pytest.approx(2 / 3)
    with pytest.raises(DiagnosticsError, match="same length"):
        plot_setpoint(proj, target[:2], mu, tmp_path, label="x")
