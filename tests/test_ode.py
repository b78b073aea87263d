"""ODESteer / StepODESteer: the sketch against references, gradients, integration, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.kernel_approximation import PolynomialCountSketch
from sklearn.svm import LinearSVC

from steerlab.errors import DataError, SteeringError
from steerlab.methods.base import StepContext
from steerlab.methods.ode import (
    Barrier,
    ODESteer,
    PolyCountSketch,
    RandomFourierFeatures,
    StepODESteer,
    barrier_along_path,
    integrate,
    normalise,
)
from steerlab.runtime import Steer, generate
from steerlab.sites import Site
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SITE = Site("resid_post", 1)


def _ctx(batch: int, seq: int) -> StepContext:
    pos = torch.arange(seq).expand(batch, seq)
    return StepContext(positions=pos, prompt_len=torch.full((batch,), seq))


def _separable(d: int = 16, n: int = 60, seed: int = 0, gap: float = 3.0,
               offset: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian classes around a common offset (activations have a large shared mean)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.zeros(d)
    mean[0] = offset
    shift = torch.zeros(d)
    shift[1] = gap
    pos = mean + shift + torch.randn(n, d, generator=g)
    neg = mean - shift + torch.randn(n, d, generator=g)
    return pos, neg


def _fitted(cls: type[ODESteer] | type[StepODESteer] = ODESteer, **kw: object) -> ODESteer:
    pos, neg = _separable()
    kw.setdefault("n_components", 256)
    return cls(1, **kw).fit(pos, neg)  # type: ignore[arg-type,return-value]


# -- the feature map ---------------------------------------------------------------------------
@pytest.mark.parametrize(("degree", "coef0"), [(1, 1.0), (2, 1.0), (3, 0.5), (2, 0.0)])
def test_sketch_equals_sklearn_with_the_same_hashes(degree: int, coef0: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 9) * 3
    fm = PolyCountSketch(9, 64, degree, 0.4, coef0, seed=3)
    ref = PolynomialCountSketch(gamma=0.4, degree=degree, coef0=coef0, n_components=64)
    ref.fit(np.zeros((1, 9)))
    assert ref.indexHash_.shape == tuple(fm.index.shape)
    ref.indexHash_ = fm.index.numpy()
    ref.bitHash_ = fm.sign.numpy().astype(np.int64)
    xhat = x.double() / (x.double().norm(dim=1, keepdim=True) + 1e-12)
    expected = torch.from_numpy(ref.transform(xhat.numpy())).float()
    torch.testing.assert_close(fm(x), expected, rtol=1e-5, atol=1e-5)


def test_sketch_equals_explicit_tensor_sketch_loop() -> None:
    """φ_i = Σ over feature tuples whose hashed buckets sum to i (mod n) of Π s_k z_{j_k}."""
    torch.manual_seed(1)
    d, n, degree, gamma, coef0 = 4, 8, 3, 0.3, 0.8
    fm = PolyCountSketch(d, n, degree, gamma, coef0, seed=5)
    x = torch.randn(3, d, dtype=torch.float64)
    for row in range(3):
        xhat = x[row] / (x[row].norm() + 1e-12)
        z = [float(v) * math.sqrt(gamma) for v in xhat] + [math.sqrt(coef0)]
        ref = [0.0] * n
        for js in itertools.product(range(d + 1), repeat=degree):
            bucket = sum(int(fm.index[k, j]) for k, j in enumerate(js)) % n
            term = 1.0
            for k, j in enumerate(js):
                term *= float(fm.sign[k, j]) * z[j]
            ref[bucket] += term
        got = fm(x[row : row + 1].float())[0]
        torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32), rtol=1e-5,
                                   atol=1e-6)


def test_sketch_approximates_the_polynomial_kernel() -> None:
    torch.manual_seed(2)
    x, y = torch.randn(20, 8), torch.randn(20, 8)
    fm = PolyCountSketch(8, 20000, 2, 0.1, 1.0, seed=0)
    approx = (fm(x) * fm(y)).sum(dim=1)
    exact = (0.1 * (normalise(x)[0] * normalise(y)[0]).sum(dim=1) + 1.0) ** 2
    assert float((approx - exact).abs().max()) < 0.06
    rff = RandomFourierFeatures(8, 20000, gamma=0.5, seed=0)
    approx = (rff(x) * rff(y)).sum(dim=1)
    exact = torch.exp(-0.5 * (normalise(x)[0] - normalise(y)[0]).pow(2).sum(dim=1))
    assert float((approx - exact).abs().max()) < 0.06


def test_feature_maps_are_seeded_and_round_trip() -> None:
    x = torch.randn(4, 10)
    a, b = PolyCountSketch(10, 32, seed=7), PolyCountSketch(10, 32, seed=7)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), PolyCountSketch(10, 32, seed=8)(x))
    assert torch.equal(PolyCountSketch.from_state(a.state_dict())(x), a(x))
    r = RandomFourierFeatures(10, 32, gamma=2.0, seed=1)
    assert torch.equal(RandomFourierFeatures(10, 32, gamma=2.0, seed=1)(x), r(x))
    assert torch.equal(RandomFourierFeatures.from_state(r.state_dict())(x), r(x))


# -- barrier and gradient ----------------------------------------------------------------------
@pytest.mark.parametrize("fmap", [
    PolyCountSketch(16, 128, 2, 0.1, 1.0, seed=0),
    PolyCountSketch(16, 100, 3, 0.7, 0.2, seed=1),
    PolyCountSketch(16, 64, 1, 1.0, 0.0, seed=2),
    RandomFourierFeatures(16, 128, gamma=2.0, seed=0),
], ids=["poly2", "poly3", "poly1", "rff"])
def test_analytic_gradient_matches_autograd_and_is_orthogonal(fmap: object) -> None:
    pos, neg = _separable()
    barrier = Barrier(fmap).fit(pos, neg)  # type: ignore[arg-type]
    a = torch.cat([pos[:5], neg[:5], torch.randn(3, 16) * 10])
    g = barrier.grad(a)
    ref = barrier.grad(a, method="autograd")
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    cos = (g * a).sum(1) / (g.norm(dim=1) * a.norm(dim=1))
    assert float(cos.abs().max()) < 1e-5
    assert float(g.norm(dim=1).min()) > 0


def test_classifier_accuracy_and_prior() -> None:
    pos, neg = _separable(n=80, seed=0)
    c = ODESteer(1, n_components=512).fit(pos[:60], neg[:40])
    assert c.fit_info["train_accuracy"] > 0.95
    assert c.fit_info["n_positive"] == 60 and c.fit_info["n_negative"] == 40
    assert c.fit_info["fit_seconds"] >= 0
    assert c.score(pos[60:], neg[60:]) > 0.9  # held out
    assert c.barrier is not None
    assert float(c.barrier.prior[0]) == pytest.approx(math.log(0.4 / 0.6))
    a = torch.randn(5, 16)
    torch.testing.assert_close(c.barrier(a), c.barrier.logit(a) + math.log(0.4 / 0.6))
    # any sklearn-like binary linear classifier
    svm = ODESteer(1, n_components=256).fit(pos, neg, classifier=LinearSVC())
    assert svm.fit_info["classifier"] == "LinearSVC"
    assert svm.fit_info["train_accuracy"] > 0.95


# -- integration -------------------------------------------------------------------------------
def test_euler_equals_hand_written_loop_and_step_equals_one_step() -> None:
    c = _fitted()
    assert c.barrier is not None
    h = torch.randn(3, 4, 16) + 3
    T = torch.tensor([2.0, -1.0, 0.5])
    out = c.steer(SITE, h, T, _ctx(3, 4))
    a = h.reshape(-1, 16).clone()
    t_rows = T.repeat_interleave(4)[:, None]
    for _ in range(10):
        a = a + (t_rows / 10) * c.barrier.velocity(a)
    torch.testing.assert_close(out.reshape(-1, 16), a, rtol=1e-5, atol=1e-5)

    s = StepODESteer(1, n_components=256)
    s.load_state(c.state_dict(), c.sites)
    a0 = h.reshape(-1, 16)
    ref = a0 + t_rows * c.barrier.velocity(a0)
    torch.testing.assert_close(s.steer(SITE, h, T, _ctx(3, 4)).reshape(-1, 16), ref)
    # the ten re-evaluated steps differ from one step of the same length
    assert float((out.reshape(-1, 16) - ref).norm()) > 1e-3


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_solvers_rotate_at_unit_speed(solver: str) -> None:
    c = _fitted(solver=solver)
    h = torch.randn(2, 3, 16) + 3
    out = c.steer(SITE, h, torch.tensor([1.0, 0.3]), _ctx(2, 3))
    assert bool(torch.isfinite(out).all())
    moved = (out - h).norm(dim=-1)
    # unit speed: the chord is at most the path length and close to it for a short path
    assert float(moved[0].max()) <= 1.0 + 1e-4 and float(moved[0].min()) > 0.8
    assert float(moved[1].max()) <= 0.3 + 1e-4 and float(moved[1].min()) > 0.25


def test_higher_order_solvers_agree_with_fine_euler() -> None:
    c = _fitted()
    assert c.barrier is not None
    a = torch.randn(6, 16) + 3
    T = torch.full((6,), 3.0)
    fine = integrate(c.barrier.velocity, a, T, solver="euler", steps=400)
    errs = {s: float((integrate(c.barrier.velocity, a, T, solver=s, steps=10) - fine).norm())
            for s in ("euler", "midpoint", "rk4")}
    assert errs["rk4"] < errs["euler"] and errs["midpoint"] < errs["euler"]


@pytest.mark.parametrize("cls", [ODESteer, StepODESteer])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_strength_is_bit_identical_and_rows_are_independent(
        cls: type[ODESteer], dtype: torch.dtype) -> None:
    c = _fitted(cls)
    h = (torch.randn(3, 5, 16) + 3).to(dtype)
    h[0, 0, 0] = -0.0
    T = torch.tensor([0.0, 1.5, 0.0])
    out = c.steer(SITE, h, T, _ctx(3, 5))
    assert out.dtype == dtype and out.shape == h.shape
    assert torch.equal(out[0], h[0]) and torch.equal(out[2], h[2])
    assert str(out[0, 0, 0].item()) == "-0.0"
    assert not torch.equal(out[1], h[1])
    alone = c.steer(SITE, h[1:2], T[1:2], _ctx(1, 5))
    torch.testing.assert_close(alone[0], out[1])
    assert torch.equal(c.steer(SITE, h, torch.zeros(3), _ctx(3, 5)), h)


def test_h_increases_along_the_path() -> None:
    c = _fitted(n_components=512)
    pos, neg = _separable(seed=1)
    start = torch.cat([neg, pos[:10]])
    hs = barrier_along_path(c, start, 2.0, steps=20)
    assert hs.shape == (start.shape[0], 21)
    inc = hs[:, 1:] - hs[:, :-1]
    assert float(inc.min()) >= -1e-5
    assert float(inc.mean()) > 0.01
    assert float((hs[:, -1] - hs[:, 0]).min()) > 0
    down = barrier_along_path(c, start, -2.0, steps=20)
    assert float((down[:, 1:] - down[:, :-1]).max()) <= 1e-5
    # negatives start below h = 0 (balanced classes: h is the logit); a longer path
    # carries most of them across, h still rising at every step
    far = barrier_along_path(c, neg, 6.0, steps=20)
    assert float((far[:, 0] < 0).float().mean()) > 0.9
    assert float((far[:, -1] > 0).float().mean()) > 0.9
    assert float((far[:, 1:] - far[:, :-1]).min()) >= -1e-5
    # StepODESteer's path is its straight segment; h grows at first
    s = StepODESteer(1, n_components=512)
    s.load_state(c.state_dict(), c.sites)
    seg = barrier_along_path(s, start, 0.2, steps=4)
    assert seg.shape == (start.shape[0], 5)
    assert float((seg[:, 1] - seg[:, 0]).min()) > 0
    torch.testing.assert_close(seg[:, 0], hs[:, 0])


def test_flat_barrier_leaves_activations_unchanged() -> None:
    """Zero gradient (w = 0): v = 0/(0 + 1e-10) = 0, so the activation does not move."""
    c = _fitted()
    assert c.barrier is not None
    c.barrier.set_parameters(torch.zeros(256), 0.3, 0.0)
    c._on_device = {}
    h = torch.randn(2, 3, 16)
    assert torch.equal(c.velocity(h.reshape(-1, 16)), torch.zeros(6, 16))
    for cls in (ODESteer, StepODESteer):
        other = cls(1, n_components=256)
        other.load_state(c.state_dict(), c.sites)
        assert torch.equal(other.steer(SITE, h, torch.tensor([3.0, -1.0]), _ctx(2, 3)), h)


# -- errors ------------------------------------------------------------------------------------
def test_bad_data_and_bad_requests() -> None:
    pos, neg = _separable()
    with pytest.raises(DataError, match="at least 2"):
        ODESteer(1, n_components=64).fit(pos, neg[:0])
    with pytest.raises(DataError, match="at least 2"):
        ODESteer(1, n_components=64).fit(pos[:1], neg)
    with pytest.raises(DataError, match="one class"):
        ODESteer(1, n_components=64).fit(pos, pos.clone())
    bad = pos.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(DataError, match="non-finite"):
        ODESteer(1, n_components=64).fit(bad, neg)
    with pytest.raises(DataError, match="width"):
        ODESteer(1, n_components=64).fit(pos, neg[:, :8])
    with pytest.raises(DataError, match=r"\(N, d\)"):
        ODESteer(1, n_components=64).fit(pos[0], neg)
    with pytest.raises(SteeringError, match="not fitted"):
        ODESteer(1).steer(SITE, torch.randn(1, 2, 16), torch.ones(1), _ctx(1, 2))
    for kw in ({"steps": 0}, {"solver": "dopri5"}, {"features": "mlp"}, {"degree": 0},
               {"gamma": -1.0}, {"C": 0.0}, {"site": "heads"}, {"scope": "nowhere"}):
        with pytest.raises(SteeringError):
            ODESteer(1, **kw)  # type: ignore[arg-type]
    c = _fitted()
    with pytest.raises(SteeringError, match="width"):
        c.steer(SITE, torch.randn(1, 2, 8), torch.ones(1), _ctx(1, 2))
    for value in (float("nan"), float("inf")):
        with pytest.raises(SteeringError, match="finite"):
            c.steer(SITE, torch.randn(2, 2, 16), torch.tensor([1.0, value]), _ctx(2, 2))
        with pytest.raises(SteeringError, match="finite"):
            barrier_along_path(c, torch.randn(2, 16), value)
    with pytest.raises(SteeringError, match="steps"):
        barrier_along_path(c, torch.randn(2, 16), 1.0, steps=0)
    with pytest.raises(SteeringError, match="width"):
        barrier_along_path(c, torch.randn(2, 8), 1.0)
    assert c.barrier is not None
    with pytest.raises(SteeringError, match="gradient method"):
        c.barrier.grad(torch.randn(2, 16), method="numeric")  # type: ignore[arg-type]


# -- artifacts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("features", ["poly", "rff"])
@pytest.mark.parametrize("cls", [ODESteer, StepODESteer])
def test_state_round_trip_gives_identical_outputs(features: str, cls: type[ODESteer],
                                                  tmp_path: object) -> None:
    c = _fitted(cls, features=features, solver="midpoint", steps=4, seed=3)
    hp = c.hyperparameters()
    assert hp["features"] == features and hp["steps"] == 4
    import json

    json.dumps(hp)
    path = f"{tmp_path}/state.safetensors"
    save_file(c.state_dict(), path)
    fresh = cls(**json.loads(json.dumps(hp)))
    fresh.load_state(load_file(path), c.sites)
    h = torch.randn(2, 3, 16) + 2
    T = torch.tensor([1.0, -0.5])
    assert torch.equal(fresh.steer(SITE, h, T, _ctx(2, 3)), c.steer(SITE, h, T, _ctx(2, 3)))
    assert fresh.sites == [SITE]
    wrong = cls(**{**hp, "n_components": 128})
    with pytest.raises(SteeringError):
        wrong.load_state(c.state_dict(), c.sites)


# -- on a model --------------------------------------------------------------------------------
def test_generation_on_tiny_model_cached_equals_uncached() -> None:
    lm = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(32, generator=g)
    pos = torch.randn(64, 32, generator=g) + direction
    neg = torch.randn(64, 32, generator=g) - direction
    c = ODESteer(1, n_components=512).fit(pos, neg)
    assert c.sites == [SITE]
    prompts = ["hello there", "a much longer prompt than that one", "x"]
    plain = generate(lm, prompts, max_new_tokens=6, render=False)
    cached = generate(lm, prompts, steers=Steer(c, 2.0), max_new_tokens=6, render=False)
    uncached = generate(lm, prompts, steers=Steer(c, 2.0), max_new_tokens=6, render=False,
                        use_cache=False)
    assert cached != plain
    assert cached == uncached
    zero = generate(lm, prompts, steers=Steer(c, 0.0), max_new_tokens=6, render=False)
    assert zero == plain


# -- the paper preset --------------------------------------------------------------------------
def test_paper_preset_has_the_reference_values() -> None:
    """The values the reference's scripts run with, transcribed from ZhaoHongjue/odesteer at
    08cbc11: confs/steer/ODESteer.yaml:3-9 (solver euler, steps 10, n_components 8000,
    degree 2, gamma 0.1, coef0 1.0, lin_clf_type lr), confs/steer/StepODESteer.yaml:3-7 (the
    same sketch), src/odesteer/utils/kernels/_kernel_clf.py:88 (LogisticRegression(max_iter=
    1000): C = 1), confs/detox.yaml:9 (layer_idx 13) and :11 (seed 42),
    src/odesteer/lm/_huggingface_lm.py:91,258 (block output, last position); the barrier is
    fitted on all training activations (scripts/toxicity/detox_generate.py:46-47)."""
    reference = {"n_components": 8000, "degree": 2, "gamma": 0.1, "coef0": 1.0,
                 "features": "poly", "C": 1.0, "layer": 13, "site": "resid_post",
                 "scope": "last", "seed": 42}
    ode = ODESteer.from_preset("paper")
    hp = ode.hyperparameters()
    assert {k: hp[k] for k in reference} == reference
    assert (hp["solver"], hp["steps"]) == ("euler", 10)
    assert ode.fit_options == {"test_fraction": 0.0}
    assert ode.fit_info["preset"]["name"] == "paper"
    assert "confs/steer/ODESteer.yaml" in ode.fit_info["preset"]["source"]
    step = StepODESteer.from_preset("paper", layer=15)
    shp = step.hyperparameters()
    assert {k: shp[k] for k in reference} == {**reference, "layer": 15}
    assert step.fit_options == {"test_fraction": 0.0}
    assert step.fit_info["preset"]["overrides"] == ["layer"]
    with pytest.raises(SteeringError, match="no preset"):
        ODESteer.from_preset("nope")


def test_paper_preset_fits_on_every_row() -> None:
    """With the preset's test_fraction = 0 the barrier is fitted on all the rows (in order:
    the same barrier as fitting the collected activations directly) and no held-out accuracy
    is reported; an explicit test_fraction wins over the preset; the default holds out 20 %."""
    from steerlab.data import LabeledSet, LabeledText
    from steerlab.fitting import fit_odesteer, ode_activations

    lm = tiny_model("llama")
    items = [LabeledText(f"a kind and happy sentence number {i}", 1) for i in range(10)]
    items += [LabeledText(f"an angry, sad remark {i}!", 0) for i in range(8)]
    data = LabeledSet(items, name="toy")

    def fit(controller: ODESteer, test_fraction: float | None = None) -> ODESteer | StepODESteer:
        return fit_odesteer(lm, data, controller, test_fraction=test_fraction, cache=False,
                            progress=False)

    paper = fit(ODESteer.from_preset("paper", layer=1, n_components=256))
    fi = paper.fit_info
    assert fi["n_train"] == [10, 8] and fi["test_fraction"] == 0.0
    assert "heldout_accuracy" not in fi and "n_heldout" not in fi
    assert 0.0 <= fi["train_accuracy"] <= 1.0
    pos, neg = ode_activations(lm, data, SITE, cache=False, progress=False)
    direct = ODESteer(1, n_components=256, seed=42).fit(pos, neg)
    assert direct.barrier is not None and paper.barrier is not None
    torch.testing.assert_close(paper.barrier.w, direct.barrier.w)
    held = fit(ODESteer.from_preset("paper", layer=1, n_components=256), test_fraction=0.2)
    assert held.fit_info["n_train"] == [8, 6] and held.fit_info["n_heldout"] == [2, 2]
    assert "heldout_accuracy" in held.fit_info
    default = fit(ODESteer(1, n_components=256))
    assert default.fit_info["test_fraction"] == 0.2 and default.fit_info["n_train"] == [8, 6]
    with pytest.raises(DataError, match="test_fraction"):
        fit(ODESteer(1, n_components=256), test_fraction=1.0)
