"""Transport baselines: Linear-AcT, Mean-AcT (ml-act) and MiMiC (affine-steering): estimators
against slow references, transport properties, gating, steering on tiny models, artifacts."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from steerlab import artifacts
from steerlab.errors import DataError, SteeringError
from steerlab.methods import METHODS
from steerlab.methods.act import LinearAcT, MeanAcT, linear_act_map, match_counts
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.mimic import MiMiC, gaussian_ot_map
from steerlab.runtime import Steer, steering
from steerlab.sites import Site
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SITE = Site("resid_post", 1)
PROMPTS = ["the cat sat on", "I", "in the house there"]


def _ctx(batch: int, seq: int) -> StepContext:
    return StepContext(positions=torch.arange(seq).expand(batch, seq),
                       prompt_len=torch.full((batch,), seq))


def _gauss(n: int, mu: torch.Tensor, sd: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mu + sd * torch.randn(n, mu.shape[0], generator=g)


def _two_class(d: int = 8, n_pos: int = 60, n_neg: int = 50,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g)
    pos = _gauss(n_pos, mu + 1.0, 0.5 + torch.rand(d, generator=g), seed + 1)
    neg = _gauss(n_neg, mu - 1.0, 0.5 + torch.rand(d, generator=g), seed + 2)
    return pos, neg


# -- Linear-AcT ------------------------------------------------------------------------------
def _slow_linear_act(src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per dimension: python sort, then least squares b ≈ ω a + β with lstsq on [a, 1]."""
    d = src.shape[1]
    omega, beta = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for j in range(d):
        a = torch.tensor(sorted(src[:, j].tolist()), dtype=torch.float64)
        b = torch.tensor(sorted(tgt[:, j].tolist()), dtype=torch.float64)
        design = torch.stack([a, torch.ones_like(a)], dim=1)
        sol = torch.linalg.lstsq(design, b[:, None]).solution[:, 0]
        omega[j], beta[j] = sol[0], sol[1]
    return omega, beta


def test_linear_act_matches_per_dimension_loop() -> None:
    pos, neg = _two_class(n_pos=40, n_neg=40)
    c = LinearAcT(1).fit({SITE: pos}, {SITE: neg})
    ref_w, ref_b = _slow_linear_act(neg, pos)
    torch.testing.assert_close(c.omega[SITE], ref_w.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.beta[SITE], ref_b.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(c.lo[SITE], neg.amin(0)) and torch.equal(c.hi[SITE], neg.amax(0))


@pytest.mark.parametrize("balance", ["subsample", "quantile"])
def test_linear_act_unequal_counts(balance: str) -> None:
    pos, neg = _two_class(n_pos=70, n_neg=30)
    c = LinearAcT(1, balance=balance, seed=3).fit({SITE: pos}, {SITE: neg})  # type: ignore[arg-type]
    src, tgt = match_counts(neg, pos, balance, 3)  # type: ignore[arg-type]
    assert src.shape == tgt.shape == (30, pos.shape[1])
    assert torch.equal(src, neg)
    if balance == "subsample":  # a subset of the positive rows, reproducible by seed
        assert all(any(torch.equal(r, p) for p in pos) for r in tgt)
        assert torch.equal(match_counts(neg, pos, "subsample", 3)[1], tgt)
        assert not torch.equal(match_counts(neg, pos, "subsample", 4)[1], tgt)
    else:  # endpoints are the larger class's min and max
        assert torch.equal(tgt[0], pos.amin(0)) and torch.equal(tgt[-1], pos.amax(0))
    ref_w, ref_b = _slow_linear_act(src, tgt)
    torch.testing.assert_close(c.omega[SITE], ref_w.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.beta[SITE], ref_b.float(), rtol=1e-5, atol=1e-5)
    assert c.fit_info["n_matched"] == 30


def test_linear_act_recovers_the_1d_gaussian_ot_map() -> None:
    mu_n, sd_n, mu_p, sd_p = torch.tensor([-1.0, 3.0]), torch.tensor([2.0, 0.5]), \
        torch.tensor([1.5, -2.0]), torch.tensor([0.5, 1.5])
    neg, pos = _gauss(20000, mu_n, sd_n, 1), _gauss(20000, mu_p, sd_p, 2)
    c = LinearAcT(1).fit({SITE: pos}, {SITE: neg})
    ratio = sd_p / sd_n
    torch.testing.assert_close(c.omega[SITE], ratio, rtol=0.03, atol=0)
    torch.testing.assert_close(c.beta[SITE], mu_p - ratio * mu_n, rtol=0, atol=0.06)


@pytest.mark.parametrize("support", [True, False])
def test_linear_act_full_strength_matches_moments_and_zero_is_identity(support: bool) -> None:
    pos, neg = _two_class(d=6, n_pos=500, n_neg=500, seed=4)
    c = LinearAcT(1, support=support).fit({SITE: pos}, {SITE: neg})
    h = neg[None]  # (1, N, d): every negative sample is inside its own closed support ...
    moved = c.steer(SITE, h, torch.ones(1), _ctx(1, neg.shape[0]))[0]
    inside = (neg > c.lo[SITE]) & (neg < c.hi[SITE])  # ... and all but the extremes strictly
    if support:
        assert torch.equal(moved[~inside], neg[~inside])
    torch.testing.assert_close(moved.mean(0), pos.mean(0), rtol=0, atol=0.05)
    torch.testing.assert_close(moved.std(0), pos.std(0), rtol=0.05, atol=0)
    assert torch.equal(c.steer(SITE, h, torch.zeros(1), _ctx(1, neg.shape[0])), h)
    # outside the source range the map is skipped with support, applied without it
    far = c.hi[SITE] + 10.0
    out = c.steer(SITE, far[None, None], torch.ones(1), _ctx(1, 1))[0, 0]
    expect = far if support else c.omega[SITE] * far + c.beta[SITE]
    torch.testing.assert_close(out, expect)


def test_linear_act_constant_dimension_is_identity() -> None:
    pos, neg = _two_class(d=4)
    neg[:, 2] = 0.7
    c = LinearAcT(1, support=False).fit({SITE: pos}, {SITE: neg})
    assert c.omega[SITE][2] == 1 and c.beta[SITE][2] == 0
    assert c.fit_info["identity_dims"][str(SITE)] == 1
    _, _, flat = linear_act_map(neg, pos[: neg.shape[0]])
    assert flat.tolist() == [False, False, True, False]


# -- Mean-AcT --------------------------------------------------------------------------------
def test_mean_act_is_a_mean_shift_with_std_mask() -> None:
    pos, neg = _two_class(d=5, n_pos=30, n_neg=20)
    pos[:, 4] = 2.0  # a constant dimension in one class: ml-act leaves it alone
    c = MeanAcT(1).fit({SITE: pos}, {SITE: neg})
    expect = pos.double().mean(0) - neg.double().mean(0)
    expect[4] = 0
    torch.testing.assert_close(c.beta[SITE], expect.float())
    assert torch.equal(c.omega[SITE], torch.ones(5))
    h = torch.randn(2, 3, 5)
    out = c.steer(SITE, h, torch.tensor([1.0, -2.0]), _ctx(2, 3))
    torch.testing.assert_close(out[0], h[0] + c.beta[SITE])
    torch.testing.assert_close(out[1], h[1] - 2 * c.beta[SITE])
    moved = c.steer(SITE, neg[None], torch.ones(1), _ctx(1, 20))[0]
    torch.testing.assert_close(moved.mean(0)[:4], pos.mean(0)[:4])
    vec = c.vectors_by_layer()
    assert vec is not None and torch.equal(vec[1], c.beta[SITE])
    assert MeanAcT(1, support=True).fit({SITE: pos}, {SITE: neg}).vectors_by_layer() is None


# -- MiMiC -----------------------------------------------------------------------------------
def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


def _slow_mimic(src: torch.Tensor, tgt: torch.Tensor,
                reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition reference: biased covariances + reg·I, A from the closed form."""
    x, y = src.double(), tgt.double()
    d = x.shape[1]
    mx, my = x.mean(0), y.mean(0)
    cs = (x - mx).T @ (x - mx) / x.shape[0] + reg * torch.eye(d, dtype=torch.float64)
    ct = (y - my).T @ (y - my) / y.shape[0] + reg * torch.eye(d, dtype=torch.float64)
    s12 = _sqrtm(cs)
    s12_inv = torch.linalg.inv(s12)
    A = s12_inv @ _sqrtm(s12 @ ct @ s12) @ s12_inv
    return A, my - A @ mx


def _correlated(n: int, d: int, seed: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    cov = L @ L.T + 0.3 * torch.eye(d, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64) + shift
    x = mu + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return x.float(), cov


def test_mimic_matches_eigendecomposition_reference_and_is_spd() -> None:
    pos, _ = _correlated(300, 6, 1, 1.0)
    neg, _ = _correlated(200, 6, 2, -1.0)
    for reg in (1e-2, 0.0, 0.5):
        A, b = gaussian_ot_map(neg, pos, reg)
        A_ref, b_ref = _slow_mimic(neg, pos, reg)
        torch.testing.assert_close(A, A_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-5)
        assert torch.equal(A, A.T)
        assert float(torch.linalg.eigvalsh(A).min()) > 0
    c = MiMiC(1, only_negative=False).fit({SITE: pos}, {SITE: neg})
    A_ref, b_ref = _slow_mimic(neg, pos, 1e-2)
    torch.testing.assert_close(c.A[SITE], A_ref.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(c.b[SITE], b_ref.float(), rtol=0, atol=1e-5)
    assert c.fit_info["regularised"] == {}


def test_mimic_maps_source_gaussian_onto_target_moments() -> None:
    d = 6
    pos, cov_p = _correlated(40000, d, 5, 1.0)
    neg, _ = _correlated(40000, d, 6, -1.0)
    c = MiMiC(1, only_negative=False, reg=0.0).fit({SITE: pos}, {SITE: neg})
    moved = c.steer(SITE, neg[None], torch.ones(1), _ctx(1, neg.shape[0]))[0].double()
    torch.testing.assert_close(moved.mean(0), pos.double().mean(0), rtol=0, atol=1e-4)
    cov_moved = torch.cov(moved.T, correction=0)
    cov_pos = torch.cov(pos.double().T, correction=0)
    torch.testing.assert_close(cov_moved, cov_pos, rtol=0, atol=1e-3)  # the sample moments
    torch.testing.assert_close(cov_moved, cov_p, rtol=0, atol=0.1)  # ≈ the true Σ₊
    torch.testing.assert_close(c.transport(SITE, neg), moved.float(), rtol=1e-5, atol=1e-5)
    h = neg[None, :7]
    assert torch.equal(c.steer(SITE, h, torch.zeros(1), _ctx(1, 7)), h)
    half = c.steer(SITE, h, torch.tensor([0.5]), _ctx(1, 7))
    torch.testing.assert_close(half, 0.5 * (h + c.transport(SITE, h)), rtol=1e-5, atol=1e-5)


def test_mimic_gate_leaves_predicted_positive_positions_untouched() -> None:
    pos, _ = _correlated(200, 6, 7, 0.6)
    neg, _ = _correlated(200, 6, 8, -0.6)
    c = MiMiC(1).fit({SITE: pos}, {SITE: neg})
    w, b0 = c.w[SITE], c.b0[SITE]
    h = torch.cat([pos[:10], neg[:10]]).reshape(4, 5, 6)
    lam = torch.tensor([1.0, 2.0, -1.0, 0.5])
    out = c.steer(SITE, h, lam, _ctx(4, 5))
    score = h @ w + b0
    keep = score >= 0
    assert bool(keep.any()) and bool((~keep).any())
    assert torch.equal(out[keep], h[keep])
    full = MiMiC(1, only_negative=False).fit({SITE: pos}, {SITE: neg})
    ungated = full.steer(SITE, h, lam, _ctx(4, 5))
    torch.testing.assert_close(out[~keep], ungated[~keep])
    assert not torch.allclose(out[~keep], h[~keep])
    gate = c.fit_info["gate"][str(SITE)]
    assert gate["negatives_moved"] > 0.5 > gate["positives_moved"]


def test_mimic_singular_covariance_warns_and_regularises() -> None:
    pos, neg = _two_class(d=12, n_pos=8, n_neg=6)
    with pytest.warns(UserWarning, match="singular"):
        c = MiMiC(1, reg=0.0).fit({SITE: pos}, {SITE: neg})
    used = c.fit_info["regularised"][str(SITE)]
    assert used > 0
    assert torch.isfinite(c.A[SITE]).all() and torch.isfinite(c.b[SITE]).all()
    A_ref, _ = _slow_mimic(neg, pos, used)
    torch.testing.assert_close(c.A[SITE], A_ref.float(), rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="singular"):  # the default reg already suffices
        c2 = MiMiC(1, only_negative=False).fit({SITE: pos}, {SITE: neg})
    assert c2.fit_info["regularised"][str(SITE)] == 1e-2
    big_pos, big_neg = _two_class(d=4, n_pos=40, n_neg=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MiMiC(1, only_negative=False, reg=0.0).fit({SITE: big_pos}, {SITE: big_neg})


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LinearAcT, MeanAcT, MiMiC])
def test_bad_input(cls: type[Controller]) -> None:
    pos, neg = _two_class(d=4)
    make = lambda: cls(1)  # noqa: E731
    with pytest.raises(SteeringError, match="not fitted"):
        make().steer(SITE, torch.randn(1, 2, 4), torch.ones(1), _ctx(1, 2))
    with pytest.raises(DataError, match="at least 2"):
        make().fit({SITE: pos}, {SITE: neg[:1]})  # type: ignore[attr-defined]
    with pytest.raises(DataError, match="at least 2"):
        make().fit({SITE: pos[:0]}, {SITE: neg})  # type: ignore[attr-defined]
    bad = neg.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(DataError, match="non-finite"):
        make().fit({SITE: pos}, {SITE: bad})  # type: ignore[attr-defined]
    with pytest.raises(DataError, match="identical"):
        make().fit({SITE: pos}, {SITE: pos.clone()})  # type: ignore[attr-defined]
    with pytest.raises(DataError, match="width"):
        make().fit({SITE: pos}, {SITE: neg[:, :3]})  # type: ignore[attr-defined]
    with pytest.raises(DataError, match="different sites"):
        make().fit({SITE: pos}, {Site("resid_post", 0): neg})  # type: ignore[attr-defined]
    with pytest.raises(DataError, match="no sites"):
        make().fit({}, {})  # type: ignore[attr-defined]
    c = make().fit({SITE: pos}, {SITE: neg})  # type: ignore[attr-defined]
    with pytest.raises(SteeringError, match="width"):
        c.steer(SITE, torch.randn(1, 2, 5), torch.ones(1), _ctx(1, 2))
    with pytest.raises(SteeringError, match="not at"):
        c.steer(Site("resid_post", 0), torch.randn(1, 2, 4), torch.ones(1), _ctx(1, 2))
    with pytest.raises(SteeringError, match="steers resid_post or resid_pre"):
        cls(1, site="heads")  # type: ignore[call-arg]
    with pytest.raises(SteeringError, match="recipe"):
        cls(1, recipe="first")  # type: ignore[call-arg]


def test_bad_hyperparameters() -> None:
    with pytest.raises(SteeringError, match="reg"):
        MiMiC(1, reg=-1.0)
    with pytest.raises(SteeringError, match="C"):
        MiMiC(1, C=0.0)
    with pytest.raises(SteeringError, match="balance"):
        LinearAcT(1, balance="random")  # type: ignore[arg-type]
    with pytest.raises(SteeringError, match="std_eps"):
        MeanAcT(1, std_eps=float("nan"))
    with pytest.raises(SteeringError, match="layer"):
        LinearAcT([])


# -- on tiny models --------------------------------------------------------------------------
def _fit_on_model(cls: type[Controller], arch: str) -> Controller:
    """Fit on token activations of a tiny model at resid_post.1 (rows = tokens)."""
    from steerlab.activations import token_activations

    lm = tiny_model(arch)
    # No text shares a prefix with PROMPTS: a fitted row would then sit exactly on the edge
    # of Linear-AcT's support, where float noise between batch shapes flips the map on or off.
    pos_t = ["we love this, it is great and wonderful", "what a happy sunny day in the park"]
    neg_t = ["we hate this, it is awful and terrible", "what a sad rainy night at home"]
    pos = torch.cat([token_activations(lm, t, SITE) for t in pos_t])
    neg = torch.cat([token_activations(lm, t, SITE) for t in neg_t])
    kw = {"only_negative": False} if cls is MiMiC else {}
    c = cls(1, scope="last", **kw)  # type: ignore[call-arg]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MiMiC: fewer tokens than the width
        c.fit({SITE: pos}, {SITE: neg})  # type: ignore[attr-defined]
    c.model_info = lm.info
    return c


def _logits(arch: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    lm = tiny_model(arch)
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       position_ids=pos).logits
    return out, enc["attention_mask"].bool()


@pytest.mark.parametrize("cls", [LinearAcT, MeanAcT, MiMiC])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_steering_a_tiny_model(cls: type[Controller], arch: str) -> None:
    lm = tiny_model(arch)
    c = _fit_on_model(cls, arch)
    plain, mask = _logits(arch, PROMPTS)
    with steering(lm, Steer(c, 3.0)):
        steered, _ = _logits(arch, PROMPTS)
    # scope "last": only the last prompt position (and nothing before it) changes
    torch.testing.assert_close(steered[:, :-1], plain[:, :-1], rtol=0, atol=0)
    assert not torch.allclose(steered[:, -1], plain[:, -1])
    # per-row strengths in one batch equal each row steered alone
    strengths = [3.0, -2.0, 0.0]
    with steering(lm, rows=[[Steer(c, s)] for s in strengths]):
        mixed, _ = _logits(arch, PROMPTS)
    assert torch.equal(mixed[2], plain[2])
    for i, (p, s) in enumerate(zip(PROMPTS, strengths, strict=True)):
        with steering(lm, Steer(c, s)):
            alone, _ = _logits(arch, [p])
        torch.testing.assert_close(mixed[i][mask[i]], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", [LinearAcT, MeanAcT, MiMiC])
def test_artifact_round_trip(cls: type[Controller], tmp_path: Path) -> None:
    lm = tiny_model("llama")
    c = _fit_on_model(cls, "llama")
    if isinstance(c, MiMiC):  # also the gated variant
        c.only_negative = True
        c.w = {SITE: torch.randn(32)}
        c.b0 = {SITE: torch.tensor([0.1])}
        c._cast = {}
    path = artifacts.save(c, tmp_path / f"{cls.method}.safetensors")
    loaded = artifacts.load(path, lm.info)
    assert type(loaded) is cls and loaded.hyperparameters() == c.hyperparameters()
    assert METHODS[cls.method] is cls
    for k, v in c.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with steering(lm, Steer(c, 2.5, "all")):
        a, _ = _logits("llama", PROMPTS)
    with steering(lm, Steer(loaded, 2.5, "all")):
        b, _ = _logits("llama", PROMPTS)
    assert torch.equal(a, b)
    plain, _ = _logits("llama", PROMPTS)
    assert not torch.allclose(a, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    pos, neg = _two_class(d=8)
    lam = torch.tensor([1.0, -0.5])
    h = torch.stack([neg[:5], pos[:5]]).to(dtype)  # (2, 5, 8), extremes of the support included
    for c in (LinearAcT(1).fit({SITE: pos}, {SITE: neg}),
              MeanAcT(1).fit({SITE: pos}, {SITE: neg}),
              MiMiC(1).fit({SITE: pos}, {SITE: neg})):
        out = c.steer(SITE, h, lam, _ctx(2, 5))
        assert out.dtype == dtype and out.shape == h.shape
        ref = c.steer(SITE, h.float(), lam, _ctx(2, 5))
        if isinstance(c, LinearAcT):  # mapped in float32: the same numbers, rounded once
            assert torch.equal(out, ref.to(dtype))
        else:
            torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.05)
        assert torch.equal(c.steer(SITE, h, torch.zeros(2), _ctx(2, 5)), h)
