"""INNSteer: the invertible map, its training, steering and artifacts (issue 5)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from steerlab.errors import DataError, SteeringError
from steerlab.methods.base import StepContext
from steerlab.methods.inn import INNSteer, LatentFlow, coupling_masks, linear_probe_accuracy
from steerlab.runtime import Steer, generate
from steerlab.sites import Site
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SITE = Site("resid_post", 1)
SMALL = {"hidden": 32, "epochs": 30, "warmup_epochs": 3, "patience": 10}


def _ctx(batch: int, seq: int) -> StepContext:
    pos = torch.arange(seq).expand(batch, seq)
    return StepContext(positions=pos, prompt_len=torch.full((batch,), seq))


def _ring(d: int = 8, n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes a linear probe cannot separate: inside vs outside a ring in the first two dims,
    with a large shared offset and anisotropic scales like real activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, d, generator=g)
    r = x[:, :2].norm(dim=1)
    inner, outer = x[r < 0.9][:n], x[r > 1.5][:n]
    scale = torch.logspace(0, 1.5, d)
    return outer * scale + 5.0, inner * scale + 5.0


def _randomised(flow: LatentFlow, seed: int = 0) -> LatentFlow:
    """Give the conditioners' zero-initialised last layers random weights (a non-trivial φ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in flow.couplings:
            last = c.hyper[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.5)
            last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 0.5)
        flow.mean.copy_(torch.randn(flow.features, generator=g))
        flow.std.copy_(torch.rand(flow.features, generator=g) + 0.5)
    return flow


def _reference_phi(flow: LatentFlow, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """φ and log|det| written out by hand: standardise, then for each coupling split by the
    mask, run the conditioner MLP, y_b = x_b·exp(tanh s) + t, log|det| += Σ tanh s."""
    x = (h - flow.mean) / flow.std
    logdet = -flow.std.log().sum().expand(h.shape[0]).clone()
    for c in flow.couplings:
        mask = c.mask
        a, b = x[:, mask], x[:, ~mask]
        params = c.hyper(a).reshape(h.shape[0], b.shape[1], 2)
        t, s = params[..., 0], torch.tanh(params[..., 1])
        y = x.clone()
        y[:, ~mask] = b * torch.exp(s) + t
        logdet = logdet + s.sum(1)
        x = y
    return x, logdet


# -- the map -----------------------------------------------------------------------------------
@pytest.mark.parametrize("masks", ["halves", "random"])
@pytest.mark.parametrize("d", [2, 5, 6])
def test_flow_matches_hand_written_reference_and_brute_force_logdet(masks: str, d: int) -> None:
    flow = _randomised(LatentFlow(d, n_layers=3, hidden=16, masks=masks, seed=1))  # type: ignore[arg-type]
    h = torch.randn(7, d, dtype=torch.float32)
    with torch.no_grad():
        z, ladj = flow.forward_and_logdet(h)
        z_ref, ladj_ref = _reference_phi(flow, h)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(ladj, ladj_ref)
    assert not torch.allclose(z, (h - flow.mean) / flow.std)  # the couplings do something
    flow64 = flow.double()
    for row in h.double():
        J = torch.autograd.functional.jacobian(lambda v: flow64(v[None])[0], row)
        sign, logabs = torch.linalg.slogdet(J)
        assert float(sign) == 1.0
        with torch.no_grad():
            _, ladj_row = flow64.forward_and_logdet(row[None])
        assert math.isclose(float(logabs), float(ladj_row[0]), rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("masks", ["halves", "random"])
@pytest.mark.parametrize("d", [2, 7, 12])
def test_fast_path_equals_zuko(masks: str, d: int) -> None:
    flow = _randomised(LatentFlow(d, n_layers=4, hidden=16, masks=masks, seed=2))  # type: ignore[arg-type]
    h = torch.randn(3, 5, d)
    with torch.no_grad():
        z = flow(h)
        torch.testing.assert_close(flow.fast_forward(h), z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(flow.fast_inverse(z), flow.inverse(z), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(flow.fast_inverse(flow.fast_forward(h)), h, rtol=1e-5,
                                   atol=1e-5)


def test_masks_alternate_halves_or_are_seeded() -> None:
    halves = coupling_masks(5, 4, "halves", 0)
    assert halves[0].tolist() == [True, True, False, False, False]
    assert torch.equal(halves[1], ~halves[0]) and torch.equal(halves[2], halves[0])
    r1, r2 = coupling_masks(9, 3, "random", 4), coupling_masks(9, 3, "random", 4)
    assert all(torch.equal(a, b) for a, b in zip(r1, r2, strict=True))
    assert all(int(m.sum()) == 4 for m in r1)
    assert not torch.equal(r1[0], r1[1])


def test_new_flow_is_the_standardisation_and_seeding_keeps_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    flow = LatentFlow(6, hidden=8, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    h = torch.randn(4, 6)
    flow.set_standardisation(h)
    with torch.no_grad():
        torch.testing.assert_close(flow(h), (h - h.mean(0)) / h.std(0))
    other = LatentFlow(6, hidden=8, seed=3)
    assert all(torch.equal(a, b) for a, b in
               zip(flow.couplings.parameters(), other.couplings.parameters(), strict=True))


# -- training ----------------------------------------------------------------------------------
def test_training_separates_a_ring_that_no_linear_probe_can() -> None:
    pos, neg = _ring()
    c = INNSteer(1, hidden=64, epochs=120, warmup_epochs=10, seed=0).fit(pos, neg)
    tp, tn = _ring(seed=1)
    raw = linear_probe_accuracy(pos, neg, tp, tn)
    latent = linear_probe_accuracy(c.encode(pos), c.encode(neg), c.encode(tp), c.encode(tn))
    joint = c.probe_accuracy(tp, tn)
    assert raw < 0.7
    assert latent >= raw + 0.15
    assert joint >= raw + 0.15
    fi = c.fit_info
    assert fi["epochs_run"] >= fi["best_epoch"] >= 1
    assert len(c.history["train_loss"]) == fi["epochs_run"]
    # seeded: the same fit twice gives the same flow
    again = INNSteer(1, hidden=64, epochs=120, warmup_epochs=10, seed=0)
    again.fit(pos, neg)
    torch.testing.assert_close(again.encode(tp), c.encode(tp), rtol=0, atol=0)


@pytest.mark.parametrize("separation,direction", [("logistic", "mean_diff"),
                                                  ("logistic", "probe"),
                                                  ("margin", "mean_diff")])
def test_directions_and_separations(separation: str, direction: str) -> None:
    pos, neg = _ring(d=6, n=80)
    c = INNSteer(1, separation=separation, direction=direction, val_fraction=0.0,  # type: ignore[arg-type]
                 **SMALL)
    c.fit(pos, neg)  # no validation split: every row is a training row
    assert c.steering_vector is not None and c.mean_diff is not None
    torch.testing.assert_close(c.mean_diff, c.encode(pos).mean(0) - c.encode(neg).mean(0))
    if direction == "probe":
        assert c.probe_weight is not None
        u = c.probe_weight / c.probe_weight.norm()
        torch.testing.assert_close(c.steering_vector, u * (u @ c.mean_diff))
    else:
        assert torch.equal(c.steering_vector, c.mean_diff)
    assert (c.probe_weight is None) == (separation == "margin")


# -- steering ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_strength_is_bit_identical_and_rows_are_independent(dtype: torch.dtype) -> None:
    pos, neg = _ring(d=6, n=80)
    c = INNSteer(1, **SMALL).fit(pos, neg)
    h = (torch.randn(3, 5, 6) + 5).to(dtype)
    h[0, 0, 0] = -0.0
    lam = torch.tensor([0.0, 1.5, 0.0])
    out = c.steer(SITE, h, lam, _ctx(3, 5))
    assert out.dtype == dtype and out.shape == h.shape
    assert torch.equal(out[0], h[0]) and torch.equal(out[2], h[2])
    assert str(out[0, 0, 0].item()) == "-0.0"
    assert not torch.equal(out[1], h[1])
    alone = c.steer(SITE, h[1:2], lam[1:2], _ctx(1, 5))
    torch.testing.assert_close(alone[0], out[1])
    assert torch.equal(c.steer(SITE, h, torch.zeros(3), _ctx(3, 5)), h)


def test_steering_is_a_latent_translation() -> None:
    pos, neg = _ring(d=6, n=80)
    c = INNSteer(1, **SMALL).fit(pos, neg)
    assert c.steering_vector is not None
    h = torch.randn(4, 6) * 3 + 5
    out = c.steer(SITE, h[:, None], torch.full((4,), 2.0), _ctx(4, 1))[:, 0]
    torch.testing.assert_close(c.encode(out), c.encode(h) + 2.0 * c.steering_vector,
                               rtol=1e-4, atol=1e-4)
    # nonlinear in h: the edit differs between rows (a constant shift would not)
    edits = out - h
    assert float((edits - edits.mean(0)).abs().max()) > 1e-3


@pytest.mark.parametrize("scope", ["last", "all", "generated", "from:2", "from:-1"])
def test_generation_on_tiny_model_every_scope_cached_equals_uncached(scope: str) -> None:
    lm = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(32, generator=g)
    pos = torch.randn(64, 32, generator=g) + direction
    neg = torch.randn(64, 32, generator=g) - direction
    c = INNSteer(1, **SMALL).fit(pos, neg)
    assert c.sites == [SITE]
    prompts = ["hello there", "a much longer prompt than that one", "x"]
    plain = generate(lm, prompts, max_new_tokens=6, render=False)
    cached = generate(lm, prompts, steers=Steer(c, 3.0, scope), max_new_tokens=6, render=False)
    uncached = generate(lm, prompts, steers=Steer(c, 3.0, scope), max_new_tokens=6,
                        render=False, use_cache=False)
    assert cached == uncached
    if scope != "from:-1":
        assert cached != plain
    zero = generate(lm, prompts, steers=Steer(c, 0.0, scope), max_new_tokens=6, render=False)
    assert zero == plain


# -- bad input ---------------------------------------------------------------------------------
def test_bad_data_and_bad_requests() -> None:
    pos, neg = _ring(d=6, n=40)
    with pytest.raises(DataError, match="at least 2"):
        INNSteer(1, **SMALL).fit(pos, neg[:0])
    with pytest.raises(DataError, match="one class"):
        INNSteer(1, **SMALL).fit(pos, pos.clone())
    bad = pos.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(DataError, match="non-finite"):
        INNSteer(1, **SMALL).fit(bad, neg)
    with pytest.raises(DataError, match="width"):
        INNSteer(1, **SMALL).fit(pos, neg[:, :4])
    with pytest.raises(DataError, match="width at least 2"):
        INNSteer(1, **SMALL).fit(pos[:, :1], neg[:, :1])
    with pytest.raises(SteeringError, match="width at least 2"):
        LatentFlow(1)
    with pytest.raises(SteeringError, match="not fitted"):
        INNSteer(1).steer(SITE, torch.randn(1, 2, 6), torch.ones(1), _ctx(1, 2))
    for kw in ({"n_layers": 0}, {"hidden": 0}, {"masks": "checker"}, {"separation": "svm"},
               {"direction": "pca"}, {"direction": "probe", "separation": "margin"},
               {"lr": 0.0}, {"lr": float("nan")}, {"val_fraction": 1.0}, {"epochs": 0},
               {"nll_weight": 0.0, "sep_weight": 0.0, "logdet_weight": 0.0},
               {"site": "heads"}, {"scope": "nowhere"}, {"layer": 1.5}, {"layer": -1},
               {"monitor": "accuracy"}):
        with pytest.raises(SteeringError):
            INNSteer(**{"layer": 1, **kw})  # type: ignore[arg-type]
    c = INNSteer(1, **SMALL).fit(pos, neg)
    with pytest.raises(SteeringError, match="width"):
        c.steer(SITE, torch.randn(1, 2, 8), torch.ones(1), _ctx(1, 2))
    for value in (float("nan"), float("inf")):
        with pytest.raises(SteeringError, match="finite"):
            c.steer(SITE, torch.randn(2, 2, 6), torch.tensor([1.0, value]), _ctx(2, 2))


def test_diverging_training_stops_with_a_clear_error_and_stays_unfitted() -> None:
    pos, neg = _ring(d=6, n=40)
    c = INNSteer(1, hidden=16, lr=1e9, clip=1e9, warmup_epochs=0, epochs=50, weight_decay=0.0)
    with pytest.raises(SteeringError, match="diverged"):
        c.fit(pos * 1e6, neg * 1e6)
    assert not c.is_fitted and c.flow is None


# -- artifacts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["mean_diff", "probe"])
def test_state_round_trip_gives_identical_outputs(direction: str, tmp_path: Path) -> None:
    pos, neg = _ring(d=7, n=60)
    c = INNSteer(1, masks="random", direction=direction, seed=2, **SMALL)  # type: ignore[arg-type]
    c.fit(pos, neg)
    hp = json.loads(json.dumps(c.hyperparameters()))
    path = tmp_path / "state.safetensors"
    save_file(c.state_dict(), str(path))
    fresh = INNSteer(**hp)
    fresh.load_state(load_file(str(path)), c.sites)
    h = torch.randn(2, 3, 7) + 5
    lam = torch.tensor([1.0, -0.5])
    assert torch.equal(fresh.steer(SITE, h, lam, _ctx(2, 3)), c.steer(SITE, h, lam, _ctx(2, 3)))
    assert fresh.sites == [SITE]
    with pytest.raises(SteeringError, match="does not match"):
        INNSteer(**{**hp, "hidden": 16}).load_state(load_file(str(path)), c.sites)
    with pytest.raises(SteeringError, match="does not match"):
        INNSteer(**{**hp, "n_layers": 2}).load_state(load_file(str(path)), c.sites)


def test_artifact_save_load_on_tiny_model(tmp_path: Path) -> None:
    from steerlab import artifacts

    lm = tiny_model("qwen2")
    d = lm.info.hidden_size
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(d, generator=g)
    c = INNSteer(1, **SMALL).fit(torch.randn(50, d, generator=g) + direction,
                                 torch.randn(50, d, generator=g) - direction)
    c.model_info = lm.info
    path = tmp_path / "inn.safetensors"
    artifacts.save(c, path)
    loaded = artifacts.load(path, lm.info)
    assert isinstance(loaded, INNSteer)
    prompts = ["one prompt", "and another one"]
    a = generate(lm, prompts, steers=Steer(c, 2.0, "all"), max_new_tokens=5, render=False)
    b = generate(lm, prompts, steers=Steer(loaded, 2.0, "all"), max_new_tokens=5, render=False)
    assert a == b


def test_default_nll_weight_is_the_documented_one() -> None:
    """The NLL weight the docstrings state (module: "w_nll = X", class: "loss weights (X, …)")
    is the constructor's default and ``NLL_WEIGHT`` (docs/innsteer.md gives the reason)."""
    import inspect
    import re

    from steerlab.methods import inn

    default = inspect.signature(INNSteer.__init__).parameters["nll_weight"].default
    assert default == inn.NLL_WEIGHT == INNSteer(1).nll_weight == 0.1
    module_doc = re.search(r"w_nll = ([0-9.]+)", inn.__doc__ or "")
    class_doc = re.search(r"logdet_weight: loss weights \(([0-9.]+),", INNSteer.__doc__ or "")
    assert module_doc is not None and class_doc is not None
    assert float(module_doc.group(1)) == default
    assert float(class_doc.group(1)) == default
    doc = (Path(__file__).resolve().parents[1] / "docs" / "innsteer.md").read_text()
    assert f"w_nll = {default:g}" in doc
    assert "reconstruction" in (inn.__doc__ or "") and "no official code" in (inn.__doc__ or "")
