"""The finite-horizon LQR recursion of A-LQR (steerlab.control.riccati)."""

from __future__ import annotations

import math

import pytest
import torch

from steerlab.control.riccati import (
    LQRConditioningWarning,
    LQRError,
    LQRGains,
    lqr_gains,
    riccati,
)
from steerlab.errors import SteerlabError

D, L = 6, 4


def _A(seed: int = 0, L: int = L, d: int = D, scale: float = 0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.eye(d) + scale * torch.randn(L, d, d, generator=g) / math.sqrt(d)).to(
        torch.float64
    )


def _reference(
    A: torch.Tensor, q: float, r: float, q_f: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's recursion, literally, with explicit inverses, in float64."""
    A = A.to(torch.float64)
    n, d, _ = A.shape
    eye = torch.eye(d, dtype=torch.float64)
    S = q_f * eye
    Ks = [torch.zeros(d, d, dtype=torch.float64)] * n
    Ss = [torch.zeros(d, d, dtype=torch.float64)] * (n + 1)
    Ss[n] = S
    for k in reversed(range(n)):
        P = S + r * eye
        F = S @ A[k]
        Pinv = torch.linalg.inv(P)
        Ks[k] = Pinv @ F
        S = q * eye + A[k].T @ S @ A[k] - F.T @ Pinv @ F
        Ss[k] = S
    return torch.stack(Ks), torch.stack(Ss)


def _rollout_cost(
    A: torch.Tensor, K: torch.Tensor, z0: torch.Tensor, q: float, r: float, q_f: float
) -> float:
    z = z0.clone()
    cost = 0.0
    for k in range(A.shape[0]):
        u = -K[k] @ z
        cost += q * float(z @ z) + r * float(u @ u)
        z = A[k] @ z + u
    return cost + q_f * float(z @ z)


@pytest.mark.parametrize(("q", "r", "q_f"), [(0.1, 3.0, 0.1), (10.0, 10.0, 1.0), (1.0, 0.05, 5.0)])
def test_riccati_matches_explicit_inverse_reference(q: float, r: float, q_f: float) -> None:
    A = _A(1)
    K, S = riccati(A, q, r, q_f)
    K_ref, S_ref = _reference(A, q, r, q_f)
    assert K.dtype == torch.float64 and K.shape == (L, D, D) and S.shape == (L + 1, D, D)
    torch.testing.assert_close(K, K_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(S, S_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(S[L], q_f * torch.eye(D, dtype=torch.float64))
    torch.testing.assert_close(S, S.mT)  # symmetric


def test_float32_in_float32_out_and_lqr_gains_agrees() -> None:
    A64 = _A(2)
    A32 = A64.float()
    K32, S32 = riccati(A32, 0.1, 3.0, 0.1)
    assert K32.dtype == torch.float32 and S32.dtype == torch.float32
    K_ref, _ = _reference(A32.double(), 0.1, 3.0, 0.1)
    torch.testing.assert_close(K32.double(), K_ref, atol=1e-6, rtol=1e-5)
    V = torch.nn.functional.normalize(torch.randn(L, D, dtype=torch.float32), dim=-1)
    g = lqr_gains(A32, V, q=0.1, r=3.0, q_f=0.1, keep_K=True)
    assert isinstance(g, LQRGains)
    assert g.W.dtype == torch.float32 and g.W.shape == (1, L, D)
    assert g.K is not None
    torch.testing.assert_close(g.K, K32)
    assert 1.0 <= g.cond_max < 1e8 and g.seconds >= 0.0


def test_keep_K_false_gives_same_W_without_K() -> None:
    A = _A(3)
    V = torch.randn(3, L, D, dtype=torch.float64)
    lean = lqr_gains(A, V, keep_K=False)
    full = lqr_gains(A, V, keep_K=True)
    assert lean.K is None and full.K is not None
    torch.testing.assert_close(lean.W, full.W)
    torch.testing.assert_close(lean.W, torch.einsum("kij,ckj->cki", full.K, V))


def test_online_w_equals_full_matvec_single_and_multi_concept() -> None:
    g = torch.Generator().manual_seed(4)
    A = _A(4)
    V = torch.nn.functional.normalize(
        torch.randn(2, L, D, dtype=torch.float64, generator=g), dim=-1
    )
    res = lqr_gains(A, V, q=0.1, r=1.0, q_f=0.3, keep_K=True)
    assert res.K is not None
    K, W = res.K, res.W
    for k in range(L):
        a1, a2 = (torch.randn(2, dtype=torch.float64, generator=g) * 3.0).tolist()
        v1, v2 = V[0, k], V[1, k]
        # Spec §5 hook: e = α v, u = K e.  Online: u = α w.
        torch.testing.assert_close(K[k] @ (a1 * v1), a1 * W[0, k])
        # multisteer: one K for both concepts, u = K(α1 v1 + α2 v2).
        torch.testing.assert_close(K[k] @ (a1 * v1 + a2 * v2), a1 * W[0, k] + a2 * W[1, k])
        # batched rows of α (as in the hook, one α per batch row)
        alpha = torch.randn(5, dtype=torch.float64, generator=g)
        torch.testing.assert_close((alpha[:, None] * v1) @ K[k].T, alpha[:, None] * W[0, k])


def test_limit_large_r_gives_zero_gain() -> None:
    A = _A(5)
    K, _ = riccati(A, 0.1, 1e9, 0.1)
    assert float(K.abs().max()) < 1e-8
    K1, _ = riccati(A, 0.1, 1.0, 0.1)
    K2, _ = riccati(A, 0.1, 10.0, 0.1)
    assert float(K2.norm()) < float(K1.norm())  # monotone shrinkage in r


def test_limit_small_r_gives_K_equal_A() -> None:
    # S ⪰ min(q, q_f)·I, so with r ≪ q, q_f the gain cancels the whole propagated error.
    A = _A(6)
    K, _ = riccati(A, 1.0, 1e-9, 1.0)
    torch.testing.assert_close(K, A, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize(("q", "r", "q_f"), [(0.1, 3.0, 0.1), (2.0, 0.5, 7.0)])
def test_value_function_equals_closed_loop_cost(q: float, r: float, q_f: float) -> None:
    g = torch.Generator().manual_seed(7)
    A = _A(7, scale=1.2)
    K, S = riccati(A, q, r, q_f)
    for _ in range(5):
        z0 = torch.randn(D, dtype=torch.float64, generator=g)
        cost = _rollout_cost(A, K, z0, q, r, q_f)
        assert cost == pytest.approx(float(z0 @ S[0] @ z0), rel=1e-10)
        # and the cost-to-go from every later layer too
        z = z0.clone()
        for k in range(L):
            tail = _rollout_cost(A[k:], K[k:], z, q, r, q_f)
            assert tail == pytest.approx(float(z @ S[k] @ z), rel=1e-10)
            z = (A[k] - K[k]) @ z


def test_gains_are_optimal_against_perturbations() -> None:
    g = torch.Generator().manual_seed(8)
    A = _A(8)
    K, _ = riccati(A, 0.1, 3.0, 0.1)
    z0 = torch.randn(D, dtype=torch.float64, generator=g)
    best = _rollout_cost(A, K, z0, 0.1, 3.0, 0.1)
    for _ in range(5):
        Kp = K + 0.05 * torch.randn(K.shape, dtype=torch.float64, generator=g)
        assert _rollout_cost(A, Kp, z0, 0.1, 3.0, 0.1) > best


@pytest.mark.parametrize("name", ["q", "r", "q_f"])
@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_bad_weights_raise_naming_parameter(name: str, bad: float) -> None:
    kw = {"q": 0.1, "r": 3.0, "q_f": 0.1}
    kw[name] = bad
    with pytest.raises(LQRError, match=rf"weight {name} must be a positive finite"):
        riccati(_A(), kw["q"], kw["r"], kw["q_f"])
    with pytest.raises(SteerlabError, match=rf"weight {name} "):
        lqr_gains(_A(), torch.zeros(L, D), **kw)


def test_nan_or_inf_in_A_raises_naming_layer() -> None:
    A = _A()
    A[2, 1, 3] = math.nan
    with pytest.raises(LQRError, match=r"NaN or inf entries at layer\(s\) 2"):
        riccati(A, 0.1, 3.0, 0.1)
    A[2, 1, 3] = 0.0
    A[0, 0, 0] = math.inf
    with pytest.raises(LQRError, match=r"layer\(s\) 0"):
        lqr_gains(A, torch.zeros(L, D))


def test_bad_shapes_raise() -> None:
    with pytest.raises(LQRError, match="shape"):
        riccati(torch.zeros(3, 4, 5), 0.1, 1.0, 0.1)
    with pytest.raises(LQRError, match="V must have shape"):
        lqr_gains(_A(), torch.zeros(L + 1, D))
    with pytest.raises(LQRError, match="V has NaN"):
        lqr_gains(_A(), torch.full((L, D), math.nan, dtype=torch.float64))
    with pytest.raises(LQRError, match="on_ill_conditioned"):
        lqr_gains(_A(), torch.zeros(L, D), on_ill_conditioned="ignore")  # type: ignore[arg-type]


def _ill_conditioned_A() -> torch.Tensor:
    # One huge direction: S_1 = q + r·q_f/(q_f + r)·1e12 along e_0 and q elsewhere, so
    # cond(P_0) = cond(S_1 + r·I) ≈ 1e12·r / (q + r) ≈ 1e12.
    A = torch.zeros(2, 4, 4, dtype=torch.float64)
    A[:, 0, 0] = 1e6
    return A


def test_ill_conditioned_raises_with_layer_condition_and_remedy() -> None:
    with pytest.raises(LQRError, match=r"layer 0: P_0 .* condition number .*raise r"):
        riccati(_ill_conditioned_A(), 1e-3, 1.0, 1.0)


def test_ill_conditioned_warn_mode_and_threshold() -> None:
    A = _A(9)
    K, _ = riccati(A, 0.1, 3.0, 0.1)
    # P_3 = (q_f + r)·I has condition number 1; the first ill-conditioned step is layer 2.
    with pytest.raises(LQRError, match=r"layer 2: P_2"):
        lqr_gains(A, torch.zeros(L, D), cond_limit=1.000001)
    with pytest.warns(LQRConditioningWarning, match="condition number"):
        res = lqr_gains(
            A, torch.zeros(L, D), cond_limit=1.000001, on_ill_conditioned="warn", keep_K=True
        )
    assert res.K is not None
    torch.testing.assert_close(res.K, K)  # warning does not change the result
    assert res.cond_max > 1.0
    skipped = lqr_gains(A, torch.zeros(L, D), cond_limit=None)
    assert math.isnan(skipped.cond_max)
    with pytest.raises(LQRError, match="cond_limit"):
        lqr_gains(A, torch.zeros(L, D), cond_limit=0.5)
