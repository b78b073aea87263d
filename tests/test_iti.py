"""ITI: per-head probes, ranking and vectors against a literal reference; the write on the
head slice of the o_proj input on many architectures; artifacts; bad input; end to end."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from steerlab.activations import Position, collect
from steerlab.errors import ArtifactError, DataError, SiteError, SteeringError
from steerlab.methods import METHODS
from steerlab.methods.base import StepContext
from steerlab.methods.iti import ITI
from steerlab.models import LoadedModel
from steerlab.runtime import Steer, generate, steering, tokenize_prompts
from steerlab.sites import LayerMap, Site, find_layers, get_input, set_input
from tiny_models import ARCHS, tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = ["hello there", "a much longer prompt than that one"]


def _synthetic(
    n_layers: int, n_heads: int, hd: int, planted: list[tuple[int, int]], *,
    n_pos: int = 60, n_neg: int = 50, shift: float = 4.0, seed: int = 0,
) -> tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor]]:
    """Gaussian noise on every head; the planted heads are shifted by ±shift/2 along a random
    unit direction (positive +, negative −), so only they are separable."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = {}, {}
    for layer in range(n_layers):
        p = torch.randn(n_pos, n_heads * hd, generator=g)
        n = torch.randn(n_neg, n_heads * hd, generator=g)
        for pl, h in planted:
            if pl == layer:
                d = torch.randn(hd, generator=g)
                d = d / d.norm()
                p[:, h * hd:(h + 1) * hd] += shift / 2 * d
                n[:, h * hd:(h + 1) * hd] -= shift / 2 * d
        pos[Site("heads", layer)], neg[Site("heads", layer)] = p, n
    return pos, neg


def _reference(
    pos: dict[Site, torch.Tensor], neg: dict[Site, torch.Tensor], hd: int, k: int, *,
    alpha: float, direction: str, val_fraction: float = 0.2, seed: int = 42,
    tuning: dict[Site, torch.Tensor] | None = None,
) -> tuple[dict[int, list[float]], list[tuple[int, int]], dict[int, np.ndarray]]:
    """The paper's procedure, one head at a time, in plain numpy and sklearn."""
    rng = np.random.default_rng(seed)
    splits = []
    for x in (next(iter(pos.values())), next(iter(neg.values()))):
        n = x.shape[0]
        perm = rng.permutation(n)
        n_val = min(max(round(n * val_fraction), 1), n - 1)
        splits.append((perm[: n - n_val], perm[n - n_val:]))
    (tr_p, va_p), (tr_n, va_n) = splits
    accs: dict[int, list[float]] = {}
    coefs: dict[tuple[int, int], np.ndarray] = {}
    rows = []
    for site in sorted(pos):
        P = pos[site].numpy().astype(np.float64)
        N = neg[site].numpy().astype(np.float64)
        accs[site.layer] = []
        for h in range(P.shape[1] // hd):
            Ph, Nh = P[:, h * hd:(h + 1) * hd], N[:, h * hd:(h + 1) * hd]
            X_tr = np.vstack([Ph[tr_p], Nh[tr_n]])
            y_tr = np.array([1] * len(tr_p) + [0] * len(tr_n))
            X_va = np.vstack([Ph[va_p], Nh[va_n]])
            y_va = np.array([1] * len(va_p) + [0] * len(va_n))
            clf = LogisticRegression(max_iter=1000).fit(X_tr, y_tr)
            correct = sum(int(a == b) for a, b in zip(clf.predict(X_va), y_va, strict=True))
            acc = correct / len(y_va)
            accs[site.layer].append(acc)
            coefs[(site.layer, h)] = clf.coef_[0]
            rows.append((acc, site.layer, h))
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    chosen = [(layer, h) for _, layer, h in rows[:k]]
    vectors: dict[int, np.ndarray] = {}
    for layer, h in chosen:
        site = Site("heads", layer)
        cols = slice(h * hd, (h + 1) * hd)
        P = pos[site].numpy().astype(np.float64)[:, cols]
        N = neg[site].numpy().astype(np.float64)[:, cols]
        theta = P.mean(0) - N.mean(0) if direction == "mass_mean" else coefs[(layer, h)]
        theta = theta / np.linalg.norm(theta)
        T = np.vstack([P, N]) if tuning is None else \
            tuning[site].numpy().astype(np.float64)[:, cols]
        sigma = np.std(T @ theta)
        v = vectors.setdefault(layer, np.zeros(pos[site].shape[1]))
        v[cols] = alpha * sigma * theta
    return accs, chosen, vectors


# -- the estimator against the reference --------------------------------------------------------
@pytest.mark.parametrize(("direction", "with_tuning"),
                         [("mass_mean", False), ("probe", False), ("mass_mean", True)])
def test_matches_the_per_head_reference(direction: str, with_tuning: bool) -> None:
    planted = [(0, 2), (1, 5), (2, 0)]
    pos, neg = _synthetic(3, 6, 4, planted)
    tuning = None
    if with_tuning:
        g = torch.Generator().manual_seed(7)
        tuning = {s: 3.0 * torch.randn(40, 24, generator=g) for s in pos}
    iti = ITI(top_k=3, alpha=15.0, direction=direction)  # type: ignore[arg-type]
    iti.fit(pos, neg, head_dim=4, tuning=tuning)
    accs, chosen, vectors = _reference(pos, neg, 4, 3, alpha=15.0, direction=direction,
                                       tuning=tuning)
    assert set(iti.selected_heads) == set(planted)
    assert iti.selected_heads == chosen
    for layer, a in accs.items():
        torch.testing.assert_close(iti.val_accuracy[layer], torch.tensor(a, dtype=torch.float32))
    assert iti.sites == [Site("heads", 0), Site("heads", 1), Site("heads", 2)]
    for layer, v in vectors.items():
        torch.testing.assert_close(iti.vectors[Site("heads", layer)],
                                   torch.tensor(v, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    # sigmas and directions line up with the selected heads and rebuild the vectors
    for i, (layer, h) in enumerate(iti.selected_heads):
        assert abs(float(iti.directions[i].norm()) - 1.0) < 1e-5
        torch.testing.assert_close(iti.vectors[Site("heads", layer)][h * 4:(h + 1) * 4],
                                   15.0 * iti.sigmas[i] * iti.directions[i])
    info = iti.fit_info
    assert info["n_train"] == [48, 40] and info["n_val"] == [12, 10]
    assert info["top_k"] == 3 and info["top_k_capped"] is False
    assert info["selected_heads"] == [list(x) for x in chosen]


def test_a_different_seed_changes_the_split_not_the_planted_heads() -> None:
    planted = [(0, 1), (1, 3)]
    pos, neg = _synthetic(2, 4, 8, planted)
    a = ITI(top_k=2).fit(pos, neg, head_dim=8)
    b = ITI(top_k=2, seed=3).fit(pos, neg, head_dim=8)
    assert set(a.selected_heads) == set(b.selected_heads) == set(planted)
    accs = _reference(pos, neg, 8, 2, alpha=15.0, direction="mass_mean", seed=3)[0]
    for layer, acc in accs.items():
        torch.testing.assert_close(b.val_accuracy[layer], torch.tensor(acc, dtype=torch.float32))


def test_ties_are_broken_by_layer_then_head() -> None:
    planted = [(2, 0), (0, 3), (1, 1), (0, 1)]
    pos, neg = _synthetic(3, 4, 4, planted, shift=40.0)  # every planted head: accuracy 1
    iti = ITI(top_k=3).fit(pos, neg, head_dim=4)
    assert iti.fit_info["selected_val_accuracy"] == [1.0, 1.0, 1.0]
    assert iti.selected_heads == [(0, 1), (0, 3), (1, 1)]
    assert iti.sites == [Site("heads", 0), Site("heads", 1)]


def test_default_top_k_caps_and_only_chosen_layers_are_hooked() -> None:
    pos, neg = _synthetic(2, 4, 8, [(1, 2)])
    every = ITI().fit(pos, neg, head_dim=8)
    assert every.fit_info["top_k"] == 8 and every.fit_info["top_k_capped"] is True
    assert len(every.selected_heads) == 8 and every.selected_heads[0] == (1, 2)
    one = ITI(top_k=1, alpha=2.0).fit(pos, neg, head_dim=8, progress=True)
    assert one.sites == [Site("heads", 1)] and one.selected_heads == [(1, 2)]
    assert one.layers == [0, 1]  # probed layers; only heads.1 is steered
    v = one.vectors[Site("heads", 1)]
    assert bool((v[:16] == 0).all()) and bool((v[24:] == 0).all()) and float(v.norm()) > 0


def test_steer_adds_strength_times_vector_rowwise() -> None:
    pos, neg = _synthetic(1, 4, 8, [(0, 0)])
    iti = ITI(top_k=1).fit(pos, neg, head_dim=8)
    h = torch.randn(3, 5, 32)
    lam = torch.tensor([0.0, 1.0, -2.0])
    ctx = StepContext(positions=torch.arange(5).expand(3, 5), prompt_len=torch.full((3,), 5))
    out = iti.steer(Site("heads", 0), h, lam, ctx)
    assert torch.equal(out[0], h[0])
    v = iti.vectors[Site("heads", 0)]
    torch.testing.assert_close(out[2] - h[2], (-2.0 * v).expand(5, 32))


def test_bad_input() -> None:
    pos, neg = _synthetic(2, 4, 8, [(0, 1)])
    with pytest.raises(DataError, match=r"top_k=9.*only 8 heads"):
        ITI(top_k=9).fit(pos, neg, head_dim=8)
    for k in (0, -1, 2.5, True):
        with pytest.raises(SteeringError, match="top_k"):
            ITI(top_k=k)  # type: ignore[arg-type]
    for kw in ({"alpha": float("nan")}, {"val_fraction": 0.0}, {"val_fraction": 1.0},
               {"direction": "pca"}, {"recipe": "first"}):
        with pytest.raises(SteeringError):
            ITI(**kw)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="one class only"):
        ITI().fit(pos, {s: t.clone() for s, t in pos.items()}, head_dim=8)
    with pytest.raises(DataError, match="at least 2"):
        ITI().fit(pos, {s: t[:1] for s, t in neg.items()}, head_dim=8)
    bad = {s: t.clone() for s, t in pos.items()}
    bad[Site("heads", 1)][3, 5] = float("nan")
    with pytest.raises(DataError, match="non-finite"):
        ITI().fit(bad, neg, head_dim=8)
    with pytest.raises(DataError, match="separable head outputs"):
        ITI().fit(pos, neg, head_dim=5)
    with pytest.raises(DataError, match="head_dim"):
        ITI().fit(pos, neg, head_dim=0)
    with pytest.raises(DataError, match="heads"):
        ITI().fit({Site("resid_post", 0): pos[Site("heads", 0)]},
                  {Site("resid_post", 0): neg[Site("heads", 0)]}, head_dim=8)
    with pytest.raises(DataError, match="same samples"):
        ITI().fit({**pos, Site("heads", 1): pos[Site("heads", 1)][:-3]}, neg, head_dim=8)
    with pytest.raises(DataError, match="tuning"):
        ITI().fit(pos, neg, head_dim=8, tuning={Site("heads", 0): pos[Site("heads", 0)]})
    with pytest.raises(DataError, match="tuning"):
        ITI().fit(pos, neg, head_dim=8, tuning={s: t[:, :16] for s, t in pos.items()})
    with pytest.raises(SteeringError, match="layers"):
        ITI().fit_sites()
    assert ITI([0, 1]).fit_sites() == [Site("heads", 0), Site("heads", 1)]
    lm = tiny_model("llama")
    with pytest.raises(SteeringError, match="not fitted"):
        steering(lm, Steer(ITI(1)))


def test_a_model_without_head_outputs_raises_a_site_error() -> None:
    lm = tiny_model("llama")
    layers = find_layers(lm.model)
    no_heads = dataclasses.replace(layers, attn_out=None, attn_out_names=None, n_heads=None,
                                   head_dim=None)
    pos, neg = _synthetic(2, 4, 8, [(0, 1)])
    iti = ITI(top_k=1).fit(pos, neg, head_dim=8)
    with pytest.raises(SiteError, match="heads' sites are unavailable"):
        steering(lm, Steer(iti), layers=no_heads)


# -- on models: the write lands on the right head slice ----------------------------------------
def _fit_for(lm: LoadedModel, layers: LayerMap) -> ITI:
    assert layers.n_heads is not None and layers.head_dim is not None
    nh, hd = layers.n_heads, layers.head_dim
    pos, neg = _synthetic(layers.num_layers, nh, hd, [(0, 1), (1, nh - 1)], seed=1)
    iti = ITI(top_k=2, alpha=2.0).fit(pos, neg, head_dim=hd)
    iti.model_info = lm.info
    return iti


@contextmanager
def _capture(layers: LayerMap, out: dict[int, torch.Tensor]) -> Iterator[None]:
    """Record the o_proj input of every block (a forward pre-hook, registered now)."""
    assert layers.attn_out is not None
    handles = []
    for i, module in enumerate(layers.attn_out):
        def pre(mod: Any, args: Any, kwargs: Any, i: int = i) -> None:
            out[i] = get_input(args, kwargs).detach().clone()
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _manual(layers: LayerMap, iti: ITI, strength: float) -> Iterator[None]:
    """The intervention written by hand: add strength·α·σ·θ̂ to each chosen head's slice of
    the o_proj input at the last position."""
    assert layers.attn_out is not None and iti.head_dim is not None
    hd = iti.head_dim
    handles = []
    for layer in {layer for layer, _ in iti.selected_heads}:
        def pre(mod: Any, args: Any, kwargs: Any, layer: int = layer) -> Any:
            h = get_input(args, kwargs).clone()
            for i, (lay, head) in enumerate(iti.selected_heads):
                if lay == layer:
                    h[:, -1, head * hd:(head + 1) * hd] += \
                        strength * iti.alpha * iti.sigmas[i] * iti.directions[i]
            return set_input(args, kwargs, h)
        handles.append(layers.attn_out[layer].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_write_lands_on_the_chosen_head_slices(arch: str) -> None:
    lm = tiny_model(arch)
    layers = find_layers(lm.model)
    iti = _fit_for(lm, layers)
    assert iti.head_dim is not None
    hd, width = iti.head_dim, layers.width(Site("heads", 0))
    enc = tokenize_prompts(lm, PROMPTS, rendered=False)  # left padded
    strength = 1.5
    before: dict[int, torch.Tensor] = {}
    after: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        plain = lm.model(**enc).logits
        with _capture(layers, before), steering(lm, Steer(iti, strength)), \
                _capture(layers, after):
            steered = lm.model(**enc).logits
        with _manual(layers, iti, strength):
            manual = lm.model(**enc).logits
    for layer in range(layers.num_layers):
        diff = after[layer] - before[layer]
        expected = torch.zeros_like(diff)
        for i, (lay, head) in enumerate(iti.selected_heads):
            if lay == layer:
                expected[:, -1, head * hd:(head + 1) * hd] = \
                    strength * iti.alpha * iti.sigmas[i] * iti.directions[i]
        assert diff.shape[-1] == width
        assert torch.equal(diff == 0, expected == 0), f"{arch}: write outside the head slices"
        torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(steered, manual, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(steered, plain, atol=1e-3)


@pytest.mark.parametrize(("arch", "q_name", "offset"), [
    ("llama", "self_attn.q_proj", 0), ("qwen3", "self_attn.q_proj", 0), ("gpt2", "attn.c_attn", 0),
])
def test_slice_h_of_the_site_is_head_h(arch: str, q_name: str, offset: int) -> None:
    """Perturbing head h's query changes only slice h of the o_proj input: the site's slices
    really are the heads (GQA and head_dim ≠ hidden/heads included)."""
    lm = tiny_model(arch)
    layers = find_layers(lm.model)
    assert layers.head_dim is not None and layers.n_heads is not None
    hd = layers.head_dim
    q_mod = layers.blocks[0].get_submodule(q_name)
    enc = tokenize_prompts(lm, PROMPTS[1:], rendered=False)
    for head in (0, layers.n_heads - 1):
        def post(mod: Any, args: Any, output: torch.Tensor, head: int = head) -> torch.Tensor:
            out = output.clone()
            g = torch.Generator().manual_seed(head)
            cols = slice(offset + head * hd, offset + (head + 1) * hd)
            out[..., cols] += 3.0 * torch.randn(out[..., cols].shape, generator=g)
            return out
        base: dict[int, torch.Tensor] = {}
        moved: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            with _capture(layers, base):
                lm.model(**enc)
            handle = q_mod.register_forward_hook(post)
            try:
                with _capture(layers, moved):
                    lm.model(**enc)
            finally:
                handle.remove()
        changed = (moved[0] - base[0]).abs().amax(dim=(0, 1)) > 1e-6
        want = torch.zeros_like(changed)
        want[head * hd:(head + 1) * hd] = True
        assert torch.equal(changed, want)


def test_unscoped_padding_is_never_steered() -> None:
    lm = tiny_model("llama")
    layers = find_layers(lm.model)
    iti = _fit_for(lm, layers)
    enc = tokenize_prompts(lm, PROMPTS, rendered=False)
    pad = enc["attention_mask"] == 0
    assert bool(pad.any())
    before: dict[int, torch.Tensor] = {}
    after: dict[int, torch.Tensor] = {}
    with torch.no_grad(), _capture(layers, before), \
            steering(lm, Steer(iti, 1.0, scope="all")), _capture(layers, after):
        lm.model(**enc)
    diff = (after[0] - before[0]).abs().amax(dim=-1)
    assert bool((diff[pad] == 0).all()) and bool((diff[~pad] > 0).all())


# -- artifacts ---------------------------------------------------------------------------------
def test_artifact_round_trip(tmp_path: Path) -> None:
    from steerlab import artifacts

    assert METHODS["iti"] is ITI
    lm = tiny_model("llama")
    layers = find_layers(lm.model)
    iti = _fit_for(lm, layers)
    path = artifacts.save(iti, tmp_path / "iti")
    loaded = artifacts.load(path, lm.info)
    assert isinstance(loaded, ITI)
    assert loaded.hyperparameters() == iti.hyperparameters()
    assert loaded.sites == iti.sites and loaded.head_dim == iti.head_dim
    assert loaded.selected_heads == iti.selected_heads
    assert loaded.val_accuracy.keys() == iti.val_accuracy.keys()
    for layer in iti.val_accuracy:
        assert torch.equal(loaded.val_accuracy[layer], iti.val_accuracy[layer])
    assert torch.equal(loaded.sigmas, iti.sigmas)
    assert torch.equal(loaded.directions, iti.directions)
    for s in iti.sites:
        assert torch.equal(loaded.vectors[s], iti.vectors[s])
    assert loaded.fit_info["selected_heads"] == iti.fit_info["selected_heads"]
    enc = tokenize_prompts(lm, PROMPTS, rendered=False)
    with torch.no_grad():
        with steering(lm, Steer(iti, 2.0)):
            a = lm.model(**enc).logits
        with steering(lm, Steer(loaded, 2.0)):
            b = lm.model(**enc).logits
    assert torch.equal(a, b)
    other = tiny_model("qwen3")
    with pytest.raises(ArtifactError, match="fitted on"):
        artifacts.load(path, other.info)
    forced = artifacts.load(path, other.info, strict=False)  # same hidden size and depth
    with pytest.raises(SteeringError, match="width"), torch.no_grad(), \
            steering(other, Steer(forced)):
        other.model(**tokenize_prompts(other, PROMPTS, rendered=False))


# -- end to end --------------------------------------------------------------------------------
def test_end_to_end_collect_fit_generate() -> None:
    from steerlab.data import Renderer, sentiment_pairs
    from steerlab.fitting import contrastive_samples

    lm = tiny_model("llama")
    layers = find_layers(lm.model)
    assert layers.head_dim is not None
    data = sentiment_pairs()
    pos_s, neg_s = contrastive_samples(data, Renderer(lm.tokenizer))
    iti = ITI(top_k=3, alpha=15.0)
    iti.layers = list(range(layers.num_layers))
    sites = iti.fit_sites()
    pos = collect(lm, pos_s, sites, Position.last(), cache=False, progress=False)
    neg = collect(lm, neg_s, sites, Position.last(), cache=False, progress=False)
    assert pos[sites[0]].shape == (len(data), layers.width(sites[0]))
    iti.fit(pos, neg, head_dim=layers.head_dim)
    iti.model_info = lm.info
    # a random tiny model: the heads need not separate the classes, only the plumbing counts
    assert len(iti.selected_heads) == 3 and 0.0 <= iti.fit_info["best_val_accuracy"] <= 1.0
    json.dumps(iti.fit_info)
    plain = generate(lm, PROMPTS, max_new_tokens=6, render=False)
    steered = generate(lm, PROMPTS, steers=Steer(iti, 1.0), max_new_tokens=6, render=False)
    uncached = generate(lm, PROMPTS, steers=Steer(iti, 1.0), max_new_tokens=6, render=False,
                        use_cache=False)
    assert steered == uncached
    assert steered != plain
    assert generate(lm, PROMPTS, steers=Steer(iti, 0.0), max_new_tokens=6,
                    render=False) == plain
