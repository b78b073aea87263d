"""Direction baselines: RepE (PCA), the logistic-probe direction and angular steering, against
slow references; bad input; steering, per-row strengths and artifacts on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from steerlab import artifacts
from steerlab.activations import Position, collect
from steerlab.data import ContrastivePair, ContrastiveSet, Renderer
from steerlab.errors import DataError, SteeringError
from steerlab.fitting import contrastive_samples
from steerlab.methods import METHODS, AngularSteering, ProbeDirection, RepE
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.repe import pair_flips
from steerlab.runtime import Steer, generate, steering
from steerlab.sites import Site
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SITE = Site("resid_post", 1)


def _ctx(batch: int, seq: int) -> StepContext:
    pos = torch.arange(seq).expand(batch, seq)
    return StepContext(positions=pos, prompt_len=torch.full((batch,), seq))


def _planted(n: int = 60, d: int = 12, gap: float = 1.5, seed: int = 0, noise: float = 0.3,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paired rows: a shared per-pair base (large), ± gap·u, small noise; and the unit u."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    base = torch.randn(n, d, generator=g) * 2 + torch.randn(d, generator=g)
    pos = base + gap * u + noise * torch.randn(n, d, generator=g)
    neg = base - gap * u + noise * torch.randn(n, d, generator=g)
    return pos, neg, u


def _top_pc_numpy(x: np.ndarray) -> tuple[np.ndarray, float]:
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    return vt[0], float(s[0] ** 2 / (s**2).sum())


def _sign_fix(v: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return v if (pos.mean(0) - neg.mean(0)) @ v >= 0 else -v


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


# -- RepE ----------------------------------------------------------------------------------------
def test_repe_pca_diff_matches_numpy_svd_of_the_differences() -> None:
    pos, neg, _ = _planted(n=25, d=10, noise=1.0)
    P, N = pos.double().numpy(), neg.double().numpy()
    ref, ratio = _top_pc_numpy(P - N)  # every pair in both orders: uncentred SVD of D
    ref = _sign_fix(ref, P, N)
    gap = P.mean(0) - N.mean(0)
    for variant in ("pca_diff", "pca_center"):  # identical for paired rows
        c = RepE(1, variant=variant).fit({SITE: pos}, {SITE: neg})  # type: ignore[arg-type]
        np.testing.assert_allclose(c.directions[SITE].numpy(), ref, atol=1e-5)
        np.testing.assert_allclose(c.vectors[SITE].numpy(), ref * (gap @ ref), atol=1e-4)
        info = c.fit_info["per_site"][str(SITE)]
        assert info["explained_variance_ratio"] == pytest.approx(ratio, abs=1e-4)
        assert info["paired"] is True
    # pca_center built literally: rows centred on their pair's midpoint, then a centred PCA
    mid = (P + N) / 2
    lit = np.concatenate([P - mid, N - mid])
    lit_pc = _sign_fix(_top_pc_numpy(lit - lit.mean(0))[0], P, N)
    np.testing.assert_allclose(lit_pc, ref, atol=1e-6)
    unit = RepE(1, scale="unit").fit({SITE: pos}, {SITE: neg})
    np.testing.assert_allclose(unit.vectors[SITE].numpy(), ref, atol=1e-5)


def test_repe_seeded_random_pair_order_is_repe_literal() -> None:
    pos, neg, u = _planted(n=30, d=10, noise=1.0, seed=3)
    P, N = pos.double().numpy(), neg.double().numpy()
    flips = pair_flips(30, seed=7).double().numpy()
    assert set(flips.tolist()) == {-1.0, 1.0}
    train = np.stack([P[i] - N[i] if flips[i] > 0 else N[i] - P[i] for i in range(30)])
    ref = _sign_fix(_top_pc_numpy(train - train.mean(0))[0], P, N)
    c = RepE(1, seed=7).fit({SITE: pos}, {SITE: neg})
    np.testing.assert_allclose(c.directions[SITE].numpy(), ref, atol=1e-5)
    sym = RepE(1).fit({SITE: pos}, {SITE: neg})
    assert _cos(c.directions[SITE], sym.directions[SITE]) > 0.99
    assert _cos(c.directions[SITE], u) > 0.95


def test_repe_unpaired_pca_center_weights_classes_equally() -> None:
    pos, neg, _ = _planted(n=40, d=8, noise=1.0)
    neg = neg[:25]
    P, N = pos.double().numpy(), neg.double().numpy()
    m = (P.mean(0) + N.mean(0)) / 2
    S = sum(np.outer(x - m, x - m) for x in P) / len(P) + sum(
        np.outer(x - m, x - m) for x in N) / len(N)
    _, V = np.linalg.eigh(S / 2)
    ref = _sign_fix(V[:, -1], P, N)
    c = RepE(1, variant="pca_center").fit({SITE: pos}, {SITE: neg})
    np.testing.assert_allclose(c.directions[SITE].numpy(), ref, atol=1e-5)
    assert c.fit_info["per_site"][str(SITE)]["paired"] is False
    with pytest.raises(DataError, match="paired"):
        RepE(1).fit({SITE: pos}, {SITE: neg})


@pytest.mark.parametrize("kw", [{}, {"seed": 1}, {"variant": "pca_center"}])
def test_repe_recovers_a_planted_direction_and_flips_with_the_classes(kw: dict) -> None:
    pos, neg, u = _planted()
    c = RepE(1, **kw).fit({SITE: pos}, {SITE: neg})
    assert _cos(c.directions[SITE], u) > 0.95
    assert c.fit_info["per_site"][str(SITE)]["cos_to_mean_difference"] > 0.95
    swapped = RepE(1, **kw).fit({SITE: neg}, {SITE: pos})
    torch.testing.assert_close(swapped.directions[SITE], -c.directions[SITE], atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(swapped.vectors[SITE], -c.vectors[SITE], atol=1e-4, rtol=0)
    # projected scale: strength 1 moves the class-mean gap along θ̂
    gap = pos.mean(0) - neg.mean(0)
    assert float(c.vectors[SITE] @ c.directions[SITE]) == pytest.approx(
        float(gap @ c.directions[SITE]), rel=1e-5)


# -- probe -------------------------------------------------------------------------------------
def _separable(n: int = 80, d: int = 16, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    x = torch.randn(2 * n, d, generator=g)
    x = x - (x @ u)[:, None] * u  # no spread along u …
    x = x + (torch.rand(2 * n, generator=g) * 2 + 0.5)[:, None] * u  # … only a margin
    pos, neg = x[:n], x[n:].clone()
    neg = neg - 2 * (neg @ u)[:, None] * u
    return pos, neg, u


@pytest.mark.parametrize("standardize", [False, True])
def test_probe_direction_is_the_normalised_sklearn_weight(standardize: bool) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    pos, neg, _ = _planted(n=30, d=10, noise=1.5, seed=2)
    x = torch.cat([pos, neg]).double().numpy()
    y = np.r_[np.ones(30), np.zeros(30)]
    if standardize:
        scaler = StandardScaler().fit(x)
        w = LogisticRegression(C=0.5, max_iter=1000).fit(scaler.transform(x), y).coef_[0]
        w = w / scaler.scale_
    else:
        clf = LogisticRegression(C=0.5, max_iter=1000).fit(x, y)
        w = clf.coef_[0]
    ref = w / np.linalg.norm(w)
    c = ProbeDirection(1, C=0.5, standardize=standardize, scale="unit").fit(
        {SITE: pos}, {SITE: neg})
    np.testing.assert_allclose(c.directions[SITE].numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(c.vectors[SITE].numpy(), ref, atol=1e-5)
    info = c.fit_info["per_site"][str(SITE)]
    assert 0.5 < info["train_accuracy"] <= 1.0 and info["converged"] is True


def test_probe_recovers_a_planted_direction_and_flips_with_the_classes() -> None:
    pos, neg, u = _separable()
    c = ProbeDirection(1).fit({SITE: pos}, {SITE: neg})
    assert _cos(c.directions[SITE], u) > 0.95
    assert c.fit_info["per_site"][str(SITE)]["train_accuracy"] == 1.0
    gap = pos.mean(0) - neg.mean(0)
    theta = c.directions[SITE]
    torch.testing.assert_close(c.vectors[SITE], theta * (gap @ theta))
    swapped = ProbeDirection(1).fit({SITE: neg}, {SITE: pos})
    torch.testing.assert_close(swapped.directions[SITE], -theta, atol=1e-4, rtol=0)


# -- angular: the rotation -----------------------------------------------------------------------
def _angular(d: int = 12, angle: float = 30.0, adaptive: bool = False, seed: int = 0
             ) -> AngularSteering:
    pos, neg, _ = _planted(d=d, seed=seed)
    return AngularSteering(1, angle=angle, adaptive=adaptive).fit({SITE: pos}, {SITE: neg})


def _reference_rotation(h: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, theta_deg: float,
                        s: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """Row by row in float64 with an explicit 2×2 rotation by s · (shortest arc to θ)."""
    out = h.clone().double()
    B = torch.stack([b1, b2]).double()  # (2, d)
    for i in range(h.shape[0]):
        for t in range(h.shape[1]):
            x = h[i, t].double()
            p = B @ x
            if adaptive and p[0] <= 0:
                continue
            phi = math.atan2(float(p[1]), float(p[0]))
            arc = math.radians(theta_deg) - phi
            while arc >= math.pi:
                arc -= 2 * math.pi
            while arc < -math.pi:
                arc += 2 * math.pi
            a = float(s[i]) * arc
            R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                             dtype=torch.float64)
            out[i, t] = x - B.T @ p + B.T @ (R @ p)
    return out.float()


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("angle", [0.0, 75.0, 180.0, -120.0, 300.0])
def test_angular_matches_a_per_row_rotation_reference(angle: float, adaptive: bool) -> None:
    c = _angular(angle=angle, adaptive=adaptive)
    b1, b2 = c.basis[SITE]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 5, 12, generator=g) * 3
    s = torch.tensor([1.0, 0.35, -0.6, 1.7])
    out = c.steer(SITE, h, s, _ctx(4, 5))
    ref = _reference_rotation(h, b1, b2, angle, s, adaptive)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if adaptive:
        off = (h @ b1) <= 0
        assert bool(off.any()) and bool((~off).any())
        assert torch.equal(out[off], h[off])  # untouched rows are bit-identical
        full = AngularSteering(1, angle=angle).fit(*[{SITE: x} for x in _planted()[:2]])
        torch.testing.assert_close(out[~off], full.steer(SITE, h, s, _ctx(4, 5))[~off])


def test_angular_invariants_norm_rest_target_and_identity() -> None:
    c = _angular(d=16, angle=110.0)
    B = c.basis[SITE]
    torch.testing.assert_close(B @ B.T, torch.eye(2), atol=1e-6, rtol=0)  # orthonormal
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 7, 16, generator=g) * 4
    s = torch.tensor([1.0, 0.4, 2.5])
    out = c.steer(SITE, h, s, _ctx(3, 7))
    p_in, p_out = h @ B.T, out @ B.T
    torch.testing.assert_close(p_out.norm(dim=-1), p_in.norm(dim=-1), atol=1e-5, rtol=1e-5)
    rest_in, rest_out = h - p_in @ B, out - p_out @ B
    torch.testing.assert_close(rest_out, rest_in, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # strength 1 lands exactly on θ
    ang = torch.rad2deg(torch.atan2(p_out[0, :, 1], p_out[0, :, 0]))
    torch.testing.assert_close(ang, torch.full_like(ang, 110.0), atol=1e-3, rtol=0)
    # strength 0 is the identity, bit for bit, also in bfloat16 (dtype kept)
    hb = h.to(torch.bfloat16)
    outb = c.steer(SITE, hb, torch.tensor([0.0, 1.0, 0.0]), _ctx(3, 7))
    assert outb.dtype == torch.bfloat16
    assert torch.equal(outb[0], hb[0]) and torch.equal(outb[2], hb[2])
    assert not torch.equal(outb[1], hb[1])
    # the angle is a plain attribute: sweeping it needs no refit
    c.angle = -30
    p2 = c.steer(SITE, h, torch.ones(3), _ctx(3, 7)) @ B.T
    ang2 = torch.rad2deg(torch.atan2(p2[..., 1], p2[..., 0]))
    torch.testing.assert_close(ang2, torch.full_like(ang2, -30.0), atol=1e-3, rtol=0)


# -- angular: the plane ----------------------------------------------------------------------------
def test_angular_plane_from_contrast_pca_and_fallbacks() -> None:
    pos, neg, _ = _planted(d=10, seed=4)
    P, N = pos.double().numpy(), neg.double().numpy()
    b1 = P.mean(0) - N.mean(0)
    b1 /= np.linalg.norm(b1)
    mean = np.concatenate([P, N]).mean(0)

    def finish(u: np.ndarray) -> np.ndarray:
        u = u - (u @ b1) * b1
        u /= np.linalg.norm(u)
        return u if mean @ u >= 0 else -u

    g = torch.Generator().manual_seed(5)
    contrast = torch.randn(6, 10, generator=g) * torch.arange(1, 7)[:, None]
    C = contrast.double().numpy()
    C = C / np.linalg.norm(C, axis=1, keepdims=True)
    ref_b2 = finish(_top_pc_numpy(C - C.mean(0))[0])
    c = AngularSteering(1).fit({SITE: pos}, {SITE: neg}, contrast=contrast)
    np.testing.assert_allclose(c.basis[SITE][0].numpy(), b1, atol=1e-5)
    np.testing.assert_allclose(c.basis[SITE][1].numpy(), ref_b2, atol=1e-5)
    info = c.fit_info["per_site"][str(SITE)]
    assert info["b2_source"] == "contrast_pca" and c.fit_info["n_contrast_layers"] == 6
    assert info["positive_mean_angle"] == pytest.approx(math.degrees(math.atan2(
        P.mean(0) @ ref_b2, P.mean(0) @ b1)), abs=0.01)
    # no contrast (or a single layer): PCA of the pooled activations with b1 removed
    X = np.concatenate([P, N])
    X = X - X.mean(0)
    X = X - np.outer(X @ b1, b1)
    ref_pool = finish(_top_pc_numpy(X)[0])
    for kw in ({}, {"contrast": contrast[:1]}):
        c = AngularSteering(1).fit({SITE: pos}, {SITE: neg}, **kw)
        np.testing.assert_allclose(c.basis[SITE][1].numpy(), ref_pool, atol=1e-5)
        assert c.fit_info["per_site"][str(SITE)]["b2_source"] == "activation_pca"
    # classes swapped: b1 flips, b2 stays, so every angle α becomes 180° − α
    sw = AngularSteering(1).fit({SITE: neg}, {SITE: pos})
    torch.testing.assert_close(sw.basis[SITE][0], -c.basis[SITE][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sw.basis[SITE][1], c.basis[SITE][1], atol=1e-5, rtol=0)
    before, after = c.fit_info["per_site"][str(SITE)], sw.fit_info["per_site"][str(SITE)]
    assert before["positive_mean_angle"] < before["negative_mean_angle"]
    assert after["positive_mean_angle"] == pytest.approx(
        180 - before["negative_mean_angle"], abs=0.02)
    m = AngularSteering(1, second="mean").fit({SITE: pos}, {SITE: neg}, contrast=contrast)
    np.testing.assert_allclose(m.basis[SITE][1].numpy(), finish(mean), atol=1e-5)
    assert m.fit_info["per_site"][str(SITE)]["b2_source"] == "mean"


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [RepE, ProbeDirection, AngularSteering])
def test_bad_input(cls: type) -> None:
    pos, neg, _ = _planted(n=10, d=8)
    fit = cls(1).fit
    with pytest.raises(DataError, match="one class"):
        fit({SITE: pos}, {SITE: pos.clone()})
    with pytest.raises(DataError, match="at least 2"):
        fit({SITE: pos[:0]}, {SITE: neg})
    with pytest.raises(DataError, match="at least 2"):
        fit({SITE: pos}, {SITE: neg[:1]})
    bad = pos.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(DataError, match="non-finite"):
        fit({SITE: bad}, {SITE: neg})
    with pytest.raises(DataError, match="width"):
        fit({SITE: pos}, {SITE: neg[:, :6]})
    with pytest.raises(DataError, match="no negative"):
        fit({SITE: pos}, {Site("resid_post", 0): neg})
    with pytest.raises(DataError, match="no activations"):
        fit({}, {})
    c = cls(1)
    with pytest.raises(SteeringError, match="not fitted"):
        c.state_dict()
    with pytest.raises(SteeringError, match="not fitted"):
        c.steer(SITE, torch.randn(1, 2, 8), torch.ones(1), _ctx(1, 2))
    c.fit({SITE: pos}, {SITE: neg})
    with pytest.raises(SteeringError, match="width"):
        c.steer(SITE, torch.randn(1, 2, 6), torch.ones(1), _ctx(1, 2))
    for kw in ({"site": "heads"}, {"recipe": "first"}, {"layers": []}):
        with pytest.raises(SteeringError):
            cls(1, **kw) if "layers" not in kw else cls(**kw)


def test_bad_hyperparameters_and_method_specific_input() -> None:
    pos, neg, _ = _planted(n=10, d=8)
    with pytest.raises(SteeringError, match="variant"):
        RepE(1, variant="pca")  # type: ignore[arg-type]
    with pytest.raises(SteeringError, match="scale"):
        RepE(1, scale="norm")  # type: ignore[arg-type]
    with pytest.raises(SteeringError, match="pca_diff only"):
        RepE(1, variant="pca_center", seed=0)
    with pytest.raises(DataError, match="paired"):
        RepE(1).fit({SITE: pos}, {SITE: neg[:7]})
    for C in (0.0, -1.0, math.nan):
        with pytest.raises(SteeringError, match="C"):
            ProbeDirection(1, C=C)
    with pytest.raises(SteeringError, match="max_iter"):
        ProbeDirection(1, max_iter=0)
    with pytest.raises(DataError, match="zero weight"):
        ProbeDirection(1, C=1e-30).fit({SITE: pos}, {SITE: neg})
    for angle in (math.nan, math.inf, "north"):
        with pytest.raises(SteeringError, match="angle"):
            AngularSteering(1, angle=angle)  # type: ignore[arg-type]
    with pytest.raises(SteeringError, match="second"):
        AngularSteering(1, second="random")  # type: ignore[arg-type]
    a = AngularSteering(1)
    with pytest.raises(DataError, match=r"\(L, d\)"):
        a.fit({SITE: pos}, {SITE: neg}, contrast=torch.randn(8))
    with pytest.raises(DataError, match="non-finite"):
        a.fit({SITE: pos}, {SITE: neg}, contrast=torch.full((3, 8), math.nan))
    with pytest.raises(DataError, match="width"):
        a.fit({SITE: pos}, {SITE: neg}, contrast=torch.randn(3, 6))
    # rows that differ only along the mean difference span no plane without a contrast
    line = torch.randn(8)
    t = torch.linspace(0, 1, 6)[:, None]
    with pytest.raises(DataError, match="second axis"):
        a.fit({SITE: (1 + t) * line}, {SITE: -(1 + t) * line})
    a.fit({SITE: (1 + t) * line}, {SITE: -(1 + t) * line}, contrast=torch.randn(3, 8))


# -- on tiny models --------------------------------------------------------------------------------
PAIRS = ContrastiveSet(
    [
        ContrastivePair("How was it?", "It was great and lovely.", "It was awful and sad."),
        ContrastivePair("The food?", "Delicious, we loved it.", "Bland, we hated it."),
        ContrastivePair("Your day?", "A wonderful day.", "A terrible day."),
        ContrastivePair("The film?", "Moving and beautiful.", "Dull and ugly."),
        ContrastivePair("The hotel?", "Clean, kind staff.", "Dirty, rude staff."),
        ContrastivePair("The book?", "I adored every page.", "I hated every page."),
    ],
    name="sentiment",
)
PROMPTS = ["the cat sat on", "I", "in the house there"]


def _fitted(arch: str, method: str) -> Controller:
    lm = tiny_model(arch)
    pos_s, neg_s = contrastive_samples(PAIRS, Renderer(lm.tokenizer))
    sites = [Site("resid_post", i) for i in range(lm.info.num_layers)]
    kw = {"cache": False, "progress": False}
    pos = collect(lm, pos_s, sites, Position.last(), **kw)  # type: ignore[arg-type]
    neg = collect(lm, neg_s, sites, Position.last(), **kw)  # type: ignore[arg-type]
    c: Controller
    if method == "angular":
        contrast = torch.stack([pos[s].mean(0) - neg[s].mean(0) for s in sites])
        c = AngularSteering(1, angle=150.0, scope="all").fit(
            {SITE: pos[SITE]}, {SITE: neg[SITE]}, contrast=contrast)
    else:
        cls = RepE if method == "repe" else ProbeDirection
        c = cls(1, scale="unit", scope="all").fit({SITE: pos[SITE]}, {SITE: neg[SITE]})
    c.model_info = lm.info
    return c


def _logits(arch: str, prompts: list[str], **steer_kw: object) -> torch.Tensor:
    lm = tiny_model(arch)
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), steering(lm, **steer_kw):  # type: ignore[arg-type]
        return lm.model(**enc, position_ids=pos).logits


STRENGTHS = {"repe": 6.0, "probe": 6.0, "angular": 1.0}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("method", ["repe", "probe", "angular"])
def test_per_row_strengths_equal_rows_alone(arch: str, method: str) -> None:
    c = _fitted(arch, method)
    s = STRENGTHS[method]
    strengths = [s, 0.0, -0.5 * s]
    mixed = _logits(arch, PROMPTS, rows=[Steer(c, x) for x in strengths])
    plain = _logits(arch, PROMPTS)
    mask = tiny_model(arch).tokenizer(PROMPTS, return_tensors="pt", padding=True)[
        "attention_mask"].bool()
    assert torch.equal(mixed[1], plain[1])
    assert not torch.allclose(mixed[0], plain[0])
    for i, (prompt, x) in enumerate(zip(PROMPTS, strengths, strict=True)):
        alone = _logits(arch, [prompt], steers=Steer(c, x))[0]
        torch.testing.assert_close(mixed[i][mask[i]], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["repe", "probe", "angular"])
def test_artifact_round_trip_and_generation(method: str, tmp_path: Path) -> None:
    arch = "llama"
    lm = tiny_model(arch)
    c = _fitted(arch, method)
    path = artifacts.save(c, tmp_path / f"{method}.safetensors")
    loaded = artifacts.load(path, lm.info)
    assert type(loaded) is METHODS[method] and loaded.method == method
    assert loaded.hyperparameters() == c.hyperparameters()
    assert loaded.fit_info["per_site"] == c.fit_info["per_site"]
    s = STRENGTHS[method]
    a = _logits(arch, PROMPTS, steers=Steer(c, s))
    b = _logits(arch, PROMPTS, steers=Steer(loaded, s))
    assert torch.equal(a, b)
    if isinstance(c, RepE | ProbeDirection):
        assert isinstance(loaded, RepE | ProbeDirection)
        assert torch.equal(loaded.directions[SITE], c.directions[SITE])
        assert loaded.vectors_by_layer() is not None  # a constant vector: GGUF-exportable
    plain = generate(lm, PROMPTS, max_new_tokens=4, render=False)
    steered = generate(lm, PROMPTS, steers=Steer(loaded, s), max_new_tokens=4, render=False)
    uncached = generate(lm, PROMPTS, steers=Steer(loaded, s), max_new_tokens=4, render=False,
                        use_cache=False)
    assert steered == uncached != plain
    # scope "last": the runtime steers the few selected rows only (a batch of one-token rows)
    last = [generate(lm, PROMPTS, steers=Steer(loaded, s, "last"), max_new_tokens=4,
                     render=False, use_cache=u) for u in (True, False)]
    assert last[0] == last[1] != plain
    assert generate(lm, PROMPTS, steers=Steer(loaded, 0.0), max_new_tokens=4,
                    render=False) == plain


def test_fitting_helpers_drive_the_three_methods() -> None:
    from steerlab.fitting import fit_angular, fit_contrastive

    lm = tiny_model("llama")
    for c in (RepE(-1), ProbeDirection(-1)):
        fit_contrastive(lm, PAIRS, c, cache=False, progress=False)
        assert c.sites == [Site("resid_post", 1)] and c.layers == [1]
        assert c.fit_info["data"] == "sentiment"
    a = fit_angular(lm, PAIRS, AngularSteering(1), cache=False, progress=False)
    assert a.fit_info["n_contrast_layers"] == lm.info.num_layers
    assert a.fit_info["per_site"]["resid_post.1"]["b2_source"] == "contrast_pca"
