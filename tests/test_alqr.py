"""A-LQR, A-LQR+, S-PID and ActAdd-LFS controllers on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerlab import artifacts
from steerlab.errors import DataError, SteeringError
from steerlab.fitting import fit_alqr, fit_lfs_baseline, lfs_activations
from steerlab.methods import ALQR, SPID, ActAddLFS, ALQRPlus
from steerlab.methods.alqr import linear_feature_setpoint
from steerlab.methods.base import StepContext
from steerlab.runtime import Steer, generate, steering
from steerlab.sites import Site
from test_methods import SENT
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")
ARCHS = ["llama", "gemma3_text", "gpt2", "qwen2"]


def _random_alqr(L: int = 2, d: int = 32, C: int = 1, seed: int = 0) -> ALQR:
    g = torch.Generator().manual_seed(seed)
    c = ALQR(lambdas=[1.0] * C)
    v = torch.randn(C, L, d, generator=g)
    v = v / v.norm(dim=-1, keepdim=True)
    c.set_setpoint(v, torch.rand(C, L, generator=g) * 5 + 1)
    c.w = torch.randn(C, L, d, generator=g) * 0.5
    return c


def test_lfs_matches_definition() -> None:
    torch.manual_seed(0)
    pos, neg = torch.randn(5, 3, 8) + 1.0, torch.randn(7, 3, 8)
    v, mu = linear_feature_setpoint(pos, neg)
    e = pos.mean(0) - neg.mean(0)
    torch.testing.assert_close(mu, e.norm(dim=-1))
    torch.testing.assert_close(v, e / e.norm(dim=-1, keepdim=True))
    with pytest.raises(DataError, match="coincide"):
        linear_feature_setpoint(pos, pos.clone())
    with pytest.raises(DataError):
        linear_feature_setpoint(pos, torch.randn(4, 2, 8))


def test_alqr_law_per_row_and_position() -> None:
    """u_k = |s|·α_k w_k with α_k = sign(s)·λ·μ_k − v_kᵀz_k, per row and position: the
    strength scales the feedback, its sign mirrors the setpoint, 0 adds nothing."""
    c = _random_alqr(C=2)
    c.lambdas = [1.5, 0.5]
    z = torch.randn(3, 4, 32)
    h = torch.randn(3, 4, 32)
    strength = torch.tensor([1.0, 2.0, 0.0, -0.5])
    z = torch.cat([z, torch.randn(1, 4, 32)])
    h = torch.cat([h, torch.randn(1, 4, 32)])
    ctx = StepContext(positions=torch.arange(4).expand(4, 4), prompt_len=torch.full((4,), 4),
                      reads={Site("resid_pre", 1): z})
    out = c.steer(Site("resid_post", 1), h, strength, ctx)
    assert torch.equal(out[2], h[2])
    for b in range(4):
        sign = 1.0 if strength[b] > 0 else -1.0
        for t in range(4):
            u = torch.zeros(32)
            for ci in range(2):
                target = sign * c.lambdas[ci] * c.mu[ci, 1]
                alpha = target - c.v[ci, 1] @ z[b, t]
                u += abs(float(strength[b])) * alpha * c.w[ci, 1]
            torch.testing.assert_close(out[b, t], h[b, t] + u, rtol=1e-5, atol=1e-5)


def test_degenerate_blocks_get_no_control() -> None:
    """μ_k = 0 at some blocks: v_k = 0 and μ_k = 0 there, with one warning naming them; an
    S-PID / A-LQR law then adds exactly nothing at those blocks. (The S-PID rules themselves
    are checked against a transcription of the reference in test_alqr_reference.py.)"""
    torch.manual_seed(0)
    pos, neg = torch.randn(4, 3, 8) + 1.0, torch.randn(4, 3, 8)
    neg[:, 1] = pos[:, 1]
    with pytest.warns(UserWarning, match=r"\[1\]"):
        v, mu = linear_feature_setpoint(pos, neg)
    assert float(mu[1]) == 0.0 and torch.equal(v[1], torch.zeros(8))
    torch.testing.assert_close(v[0].norm(), torch.tensor(1.0))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cls", [ALQR, ALQRPlus, SPID])
def test_closed_loop_cache_padding_and_rows(arch: str, cls: type) -> None:
    lm = tiny_model(arch)
    c = cls(lambdas=3.0) if cls is not SPID else SPID(lambdas=3.0, kp=0.5)
    if isinstance(c, ALQR):
        src = _random_alqr(L=lm.info.num_layers, d=lm.info.hidden_size, seed=3)
        c.set_setpoint(src.v, src.mu)
        c.w = src.w
    else:
        src = _random_alqr(L=lm.info.num_layers, d=lm.info.hidden_size, seed=3)
        c.set_setpoint(src.v, src.mu)
    prompts = ["hello there", "a much longer prompt than that one", "x"]
    plain = generate(lm, prompts, max_new_tokens=6, render=False)
    cached = generate(lm, prompts, steers=Steer(c, 2.0), max_new_tokens=6, render=False)
    uncached = generate(lm, prompts, steers=Steer(c, 2.0), max_new_tokens=6, render=False,
                        use_cache=False)
    assert cached == uncached
    assert cached != plain
    alone = [generate(lm, [p], steers=Steer(c, 2.0), max_new_tokens=6, render=False)[0]
             for p in prompts]
    assert alone == cached
    mixed = generate(lm, prompts, rows=[[Steer(c, 2.0)], [], [Steer(c, 2.0)]],
                     max_new_tokens=6, render=False)
    assert mixed[1] == plain[1] and mixed[0] == cached[0] and mixed[2] == cached[2]


def test_actadd_lfs_only_touches_its_layers() -> None:
    lm = tiny_model("llama")
    c = ActAddLFS(layers=[1], kp=2.0)
    src = _random_alqr(L=2, d=32)
    c.set_setpoint(src.v, src.mu)
    assert c.sites == [Site("resid_post", 1)]
    assert c.read_sites == [Site("resid_pre", 1)]
    seen: dict[int, torch.Tensor] = {}
    hooks = [lm.model.model.layers[i].register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone()))
        for i in range(2)]
    ids = lm.tokenizer(["hello"], return_tensors="pt")
    try:
        with torch.no_grad():
            lm.model(**ids)
            base = dict(seen)
            with steering(lm, Steer(c, 1.0, scope="all")):
                lm.model(**ids)
    finally:
        for hk in hooks:
            hk.remove()
    assert torch.equal(seen[0], base[0])
    assert not torch.equal(seen[1], base[1])


def test_bad_hyperparameters() -> None:
    for kw in ({"q": 0.0}, {"r": -1.0}, {"q_f": float("nan")}, {"lambdas": float("inf")},
               {"r": float("inf")}, {"max_tokens": 1}):
        with pytest.raises(SteeringError):
            ALQR(**kw)  # type: ignore[arg-type]
    with pytest.raises(SteeringError):
        SPID(kp=-1.0)
    with pytest.raises(SteeringError):
        ActAddLFS(layers=[])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fit_alqr_end_to_end_and_artifact(arch: str, tmp_path: Path) -> None:
    lm = tiny_model(arch, chat=True)
    c = fit_alqr(lm, SENT, ALQR(n_jacobian_prompts=3, max_tokens=8), cache=False,
                 progress=False)
    assert c.w.shape == (1, lm.info.num_layers, lm.info.hidden_size)
    for key in ("collect_seconds", "jacobian_seconds", "riccati_seconds"):
        assert key in c.fit_info
    pos, neg = lfs_activations(lm, SENT, cache=False, progress=False)
    v, _ = linear_feature_setpoint(pos, neg)
    torch.testing.assert_close(c.v[0], v)
    path = artifacts.save(c, tmp_path / "alqr")
    back = artifacts.load(path, lm.info)
    assert isinstance(back, ALQR)
    assert torch.equal(back.w, c.w) and torch.equal(back.v, c.v) and back.K is None
    a = generate(lm, ["hi there"], steers=Steer(c, 2.0), max_new_tokens=5)
    b = generate(lm, ["hi there"], steers=Steer(back, 2.0), max_new_tokens=5)
    assert a == b
    with pytest.raises(Exception, match="tiny-"):
        artifacts.load(path, tiny_model("qwen3").info)
    spid = fit_lfs_baseline(lm, SENT, SPID(), cache=False, progress=False)
    assert artifacts.load(artifacts.save(spid, tmp_path / "spid"), lm.info).sites == spid.sites


def test_keep_K_round_trip(tmp_path: Path) -> None:
    lm = tiny_model("llama", chat=True)
    c = fit_alqr(lm, [SENT, SENT], ALQR(n_jacobian_prompts=2, max_tokens=8, keep_K=True,
                                        lambdas=[1.0, 2.0]), cache=False, progress=False)
    assert c.K is not None and c.K.shape == (2, 32, 32)
    torch.testing.assert_close(torch.einsum("kij,ckj->cki", c.K, c.v), c.w, rtol=1e-4,
                               atol=1e-5)
    back = artifacts.load(artifacts.save(c, tmp_path / "k"), lm.info)
    assert isinstance(back, ALQR) and back.K is not None and torch.equal(back.K, c.K)
