"""ITI: per-head probes, ranking and vectors against a literal reference; the write on the
head slice of the o_proj input on many architectures; artifacts; bad input; end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
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
from steerlab.methods.iti import ITI, _aheapsort, rank_heads, reference_argsort, split_questions
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


# np.argsort as numpy 1.23.4 (honest_llama environment.yaml L142) computes it, recorded with
# that numpy: values (i·7 mod 5)/5 for i < 24, (i² mod 3)/5 for i < 40, 17 zeros,
# ((13·i mod 7) mod 4)/5 for i < 100; and kind="heapsort" of (3·i mod 4) for i < 10.
NUMPY_1_23_ARGSORT = {
    "a": [0, 20, 15, 5, 10, 18, 13, 8, 23, 3, 6, 16, 1, 21, 11, 9, 4, 14, 19, 22, 12, 17, 2, 7],
    "b": [0, 36, 33, 30, 27, 24, 21, 18, 15, 12, 39, 9, 3, 6, 11, 37, 1, 35, 34, 2, 32, 31, 29,
          28, 4, 26, 25, 5, 23, 22, 20, 38, 7, 17, 16, 8, 14, 13, 10, 19],
    "c": [0, 14, 13, 12, 11, 10, 9, 15, 8, 6, 5, 4, 3, 2, 1, 7, 16],
    "d": [0, 31, 35, 38, 42, 45, 98, 52, 56, 59, 63, 66, 70, 73, 77, 80, 84, 87, 91, 94, 28, 24,
          49, 21, 10, 3, 17, 7, 14, 23, 48, 79, 51, 13, 55, 9, 76, 58, 72, 62, 65, 6, 44, 83, 16,
          97, 27, 20, 30, 93, 2, 34, 69, 37, 86, 41, 90, 78, 89, 85, 75, 1, 5, 71, 82, 96, 8, 92,
          61, 99, 33, 40, 43, 68, 15, 19, 47, 29, 50, 12, 57, 26, 22, 64, 54, 36, 18, 32, 95, 25,
          67, 39, 46, 81, 53, 74, 11, 60, 88, 4],
}
NUMPY_1_23_HEAPSORT = [0, 4, 8, 7, 3, 6, 2, 5, 9, 1]
# A median-of-3 killer (McIlroy's adversary, halved for ties): numpy's introsort runs out of
# depth and heapsorts part of it; np.argsort of it under numpy 1.23.4.
KILLER = [0, 10, 1, 11, 2, 19, 3, 18, 4, 19, 5, 18, 6, 17, 7, 17, 8, 16, 9, 0, 1, 2, 3, 4, 5, 6,
          7, 8, 9, 10, 15, 15, 14, 14, 13, 13, 12, 12, 16, 11]
KILLER_NUMPY_1_23 = [0, 19, 2, 20, 4, 21, 6, 22, 8, 23, 10, 24, 12, 25, 14, 26, 16, 27, 18, 28,
                     1, 29, 3, 39, 36, 37, 35, 34, 33, 32, 31, 30, 17, 38, 15, 13, 11, 7, 9, 5]
NUMPY_1_23_INPUTS = {
    "a": [(i * 7) % 5 / 5 for i in range(24)],
    "b": [(i * i) % 3 / 5 for i in range(40)],
    "c": [0.0] * 17,
    "d": [(i * 13 % 7) % 4 / 5 for i in range(100)],
}


def _argsort_as_the_reference_ran_it(arrays: list[Any]) -> list[np.ndarray]:
    """``np.argsort`` of each array on numpy's own (non-SIMD) introsort, the one the
    reference's numpy 1.23.4 runs: in a subprocess with numpy's CPU dispatch switched off
    (newer numpy sends argsort to a SIMD sort on AVX-512/AVX2 CPUs, which orders ties
    differently). Checked against :data:`NUMPY_1_23_ARGSORT` first; skips where it cannot be
    forced."""
    import importlib

    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # numpy < 2
        umath = importlib.import_module("numpy.core._multiarray_umath")
    dispatch = list(umath.__cpu_dispatch__)
    code = ("import json, sys; import numpy as np; "
            "print(json.dumps([np.argsort(np.array(a, dtype=np.float64)).tolist() "
            "for a in json.loads(sys.stdin.read())]))")
    golden = list(NUMPY_1_23_INPUTS.values())
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(dispatch)}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(
        golden + [np.asarray(a, dtype=np.float64).tolist() for a in arrays]),
        capture_output=True, text=True, env=env, check=True, timeout=120)
    got = json.loads(out.stdout)
    if got[:len(golden)] != list(NUMPY_1_23_ARGSORT.values()):
        pytest.skip("numpy's non-SIMD argsort cannot be forced on this machine")
    return [np.array(x, dtype=np.int64) for x in got[len(golden):]]


def _reference(
    pos: dict[Site, torch.Tensor], neg: dict[Site, torch.Tensor], hd: int, k: int, *,
    alpha: float, direction: str, val_fraction: float = 0.2, seed: int = 42,
    tuning: dict[Site, torch.Tensor] | None = None,
) -> tuple[dict[int, list[float]], list[tuple[int, int]], dict[int, np.ndarray]]:
    """The procedure without question ids, one head at a time, in plain numpy and sklearn:
    steerlab's per-class row split, then the reference's probes, ranking (``utils.py`` L714,
    with numpy's argsort as the reference ran it), mass-mean direction and σ with ddof 1
    (``validation/validate_2fold.py`` L174, ``torch.std``)."""
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
    flat: list[float] = []
    heads: list[tuple[int, int]] = []
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
            flat.append(acc)
            heads.append((site.layer, h))
    (order,) = _argsort_as_the_reference_ran_it([flat])
    chosen = [heads[i] for i in order[::-1][:k]]
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
        sigma = np.std(T @ theta, ddof=1)
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


def test_ties_among_few_heads_go_to_the_later_head() -> None:
    """honest_llama utils.py L714: ``np.argsort(acc)[::-1]``; for ≤ 16 heads numpy 1.23's
    argsort is an insertion sort (stable), so equal accuracies come later layer, later head
    first (this test used to encode steerlab's old rule, smaller layer then head first)."""
    planted = [(2, 0), (0, 3), (1, 1), (0, 1)]
    pos, neg = _synthetic(3, 4, 4, planted, shift=40.0)  # every planted head: accuracy 1
    iti = ITI(top_k=3).fit(pos, neg, head_dim=4)
    assert iti.fit_info["selected_val_accuracy"] == [1.0, 1.0, 1.0]
    assert iti.selected_heads == [(2, 0), (1, 1), (0, 3)]
    assert iti.sites == [Site("heads", 0), Site("heads", 1), Site("heads", 2)]


def test_reference_argsort_is_numpy_1_23s() -> None:
    """honest_llama utils.py L714 ranks with ``np.argsort`` under numpy 1.23.4
    (environment.yaml L142): ``reference_argsort`` equals that numpy's output, recorded with
    it, and numpy's own non-SIMD introsort on random arrays with many ties (up to the 5120
    heads of an 80-layer, 64-head model), heapsort fallback included."""
    for name, values in NUMPY_1_23_INPUTS.items():
        assert reference_argsort(values).tolist() == NUMPY_1_23_ARGSORT[name], name
    idx = list(range(10))
    _aheapsort([float((3 * i) % 4) for i in range(10)], idx, 0, 10)
    assert idx == NUMPY_1_23_HEAPSORT
    assert reference_argsort(KILLER).tolist() == KILLER_NUMPY_1_23
    assert np.argsort(KILLER, kind="stable").tolist() != KILLER_NUMPY_1_23
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, levels, n) / levels for n in (1, 2, 16, 17, 18, 50, 1024, 5120)
              for levels in (1, 3, 40)]
    arrays.append(np.array(KILLER, dtype=np.float64))
    for a, want in zip(arrays, _argsort_as_the_reference_ran_it(arrays), strict=True):
        assert reference_argsort(a).tolist() == want.tolist()
    assert rank_heads([0.5, 0.75, 0.5, 0.75]).tolist() == [3, 1, 2, 0]


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


# -- the reference procedure, transcribed ------------------------------------------------------
def _truthfulqa_like(
    n_questions: int, n_layers: int, n_heads: int, hd: int, planted: list[tuple[int, int]],
    copies: list[tuple[tuple[int, int], tuple[int, int]]], *, seed: int = 5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head-wise activations (rows, layers, heads, head_dim) laid out as honest_llama's
    ``tqa_mc2`` feature bank: question by question, its correct answers (label 1) then its
    incorrect ones (label 0), 1-3 of each. Planted heads separate the classes perfectly (an
    accuracy tie at 1); each ``(src, dst)`` copy makes head dst equal head src (a tie at src's
    accuracy). Returns (activations, labels, question of each row)."""
    g = np.random.default_rng(seed)
    acts, labels, question = [], [], []
    for q in range(n_questions):
        n_correct, n_incorrect = 1 + q % 3, 1 + (2 * q) % 3
        for j in range(n_correct + n_incorrect):
            y = int(j < n_correct)
            x = g.normal(size=(n_layers, n_heads, hd)).astype(np.float32)
            for layer, h in planted:
                x[layer, h, 0] += 3.0 if y else -3.0
            for src, dst in copies:
                x[dst] = x[src]
            acts.append(x)
            labels.append(y)
            question.append(q)
    return np.stack(acts), np.array(labels), np.array(question)


def _honest_llama_reference(
    head_wise: np.ndarray, labels: np.ndarray, question: np.ndarray, tuning: np.ndarray, *,
    num_to_intervene: int, val_ratio: float = 0.2, seed: int = 42,
) -> dict[str, Any]:
    """honest_llama's head selection, written from its code (validation/validate_2fold.py and
    utils.py at likenneth/honest_llama HEAD), on one development fold, line by line:

    * get_separated_activations (utils.py L745-766): the rows split per question;
    * validate_2fold.py L76 np.random.seed(seed); L137 train_idxs (here: every question);
      L143 train_set_idxs = np.random.choice(train_idxs, size=int(len·(1 − val_ratio)),
      replace=False); L144 val_set_idxs = the others, in order;
    * train_probes (utils.py L682-705): X concatenated per question (L687-690), one
      LogisticRegression(random_state=seed, max_iter=1000) per head (L697), accuracy_score on
      the validation questions (L700);
    * get_top_heads (utils.py L707-721): np.argsort(accs.reshape(L·H))[::-1][:K] (L714),
      flattened_idx_to_layer_head (L676-677), with numpy's argsort as the reference ran it;
    * get_com_directions (utils.py L768-782): mean of label 1 − mean of label 0 over the
      training and validation questions' rows;
    * validate_2fold.py L170-175: dir = com / torch.norm(com) (float32), proj =
      tuning_activations[:, layer, head, :] @ dir.T, σ = torch.std(proj) (ddof 1).
    """
    from sklearn.metrics import accuracy_score

    num_layers, num_heads = head_wise.shape[1], head_wise.shape[2]
    # get_separated_activations: one block of rows (and labels) per question
    idxs_to_split_at = np.cumsum([int((question == q).sum()) for q in np.unique(question)])
    separated_head_wise_activations = np.split(head_wise, idxs_to_split_at)
    separated_labels = [list(x) for x in np.split(labels, idxs_to_split_at)][:-1]
    train_idxs = np.arange(len(separated_labels))
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        train_set_idxs = np.random.choice(train_idxs, size=int(len(train_idxs) * (1 - val_ratio)),
                                          replace=False)
    finally:
        np.random.set_state(state)
    val_set_idxs = np.array([x for x in train_idxs if x not in train_set_idxs])

    # train_probes
    all_X_train = np.concatenate([separated_head_wise_activations[i] for i in train_set_idxs],
                                 axis=0)
    all_X_val = np.concatenate([separated_head_wise_activations[i] for i in val_set_idxs], axis=0)
    y_train = np.concatenate([separated_labels[i] for i in train_set_idxs], axis=0)
    y_val = np.concatenate([separated_labels[i] for i in val_set_idxs], axis=0)
    all_head_accs = []
    for layer in range(num_layers):
        for head in range(num_heads):
            X_train = all_X_train[:, layer, head, :]
            X_val = all_X_val[:, layer, head, :]
            clf = LogisticRegression(random_state=seed, max_iter=1000).fit(X_train, y_train)
            y_val_pred = clf.predict(X_val)
            all_head_accs.append(accuracy_score(y_val, y_val_pred))
    all_head_accs_np = np.array(all_head_accs)

    # get_top_heads
    (argsorted,) = _argsort_as_the_reference_ran_it(
        [all_head_accs_np.reshape(num_heads * num_layers)])
    top_accs = argsorted[::-1][:num_to_intervene]
    top_heads = [(int(idx) // num_heads, int(idx) % num_heads) for idx in top_accs]

    # get_com_directions
    com_directions = []
    for layer in range(num_layers):
        for head in range(num_heads):
            usable_idxs = np.concatenate([train_set_idxs, val_set_idxs], axis=0)
            usable_head_wise_activations = np.concatenate(
                [separated_head_wise_activations[i][:, layer, head, :] for i in usable_idxs],
                axis=0)
            usable_labels = np.concatenate([separated_labels[i] for i in usable_idxs], axis=0)
            true_mass_mean = np.mean(usable_head_wise_activations[usable_labels == 1], axis=0)
            false_mass_mean = np.mean(usable_head_wise_activations[usable_labels == 0], axis=0)
            com_directions.append(true_mass_mean - false_mass_mean)
    com_directions_np = np.array(com_directions)

    # validate_2fold.py L168-175
    dirs, stds = [], []
    for layer, head in top_heads:
        d = torch.tensor(com_directions_np[layer * num_heads + head], dtype=torch.float32)
        d = d / torch.norm(d)
        activations = torch.tensor(tuning[:, layer, head, :], dtype=torch.float32)
        proj_vals = activations @ d  # the reference's "@ dir.T": dir is 1-D
        dirs.append(d)
        stds.append(float(torch.std(proj_vals)))
    return {"accs": all_head_accs_np.reshape(num_layers, num_heads), "top_heads": top_heads,
            "directions": torch.stack(dirs), "sigmas": torch.tensor(stds),
            "train_set_idxs": train_set_idxs, "val_set_idxs": val_set_idxs}


def _steerlab_inputs(
    head_wise: np.ndarray, labels: np.ndarray, question: np.ndarray, tuning: np.ndarray,
) -> tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor], dict[Site, torch.Tensor],
           tuple[list[int], list[int]]]:
    """The same rows as steerlab's ``heads.L`` sites: positive and negative rows (in order),
    their question ids, and the tuning rows."""
    n_rows, n_layers = head_wise.shape[0], head_wise.shape[1]
    flat = torch.from_numpy(head_wise.reshape(n_rows, n_layers, -1))
    tune = torch.from_numpy(tuning.reshape(tuning.shape[0], n_layers, -1))
    is_pos = torch.from_numpy(labels == 1)
    pos = {Site("heads", i): flat[is_pos, i] for i in range(n_layers)}
    neg = {Site("heads", i): flat[~is_pos, i] for i in range(n_layers)}
    tun = {Site("heads", i): tune[:, i] for i in range(n_layers)}
    groups = ([int(q) for q in question[labels == 1]], [int(q) for q in question[labels == 0]])
    return pos, neg, tun, groups


@pytest.mark.parametrize(("planted", "copies", "k"), [
    # 7 heads tie at accuracy 1 and K = 4 cuts through them; 24 heads, so numpy's introsort
    # partitions (not the insertion sort of ≤ 16 elements)
    ([(0, 6), (1, 1), (1, 4), (2, 2), (2, 7), (0, 2), (2, 5)], [((0, 0), (1, 3))], 4),
    # a tie at an accuracy below 1: head (1, 3) is head (0, 0)'s copy, both kept or cut at K
    ([(2, 1)], [((0, 0), (1, 3)), ((1, 5), (2, 6))], 3),
    ([(0, 1), (0, 5), (1, 0), (1, 7), (2, 3)], [], 3),
])
def test_heads_equal_the_reference_procedure_on_a_constructed_tie(
        planted: list[tuple[int, int]], copies: list[Any], k: int) -> None:
    """ITI's chosen heads (in rank order), validation accuracies, directions and σ equal
    honest_llama's own procedure (``_honest_llama_reference``: validation/validate_2fold.py
    L76, L137-144, L152-156, L168-175; utils.py L682-721, L768-782) on TruthfulQA-shaped data
    with a constructed accuracy tie, σ from a separate tuning bank (validate_2fold.py
    L126-130, L172-174)."""
    head_wise, labels, question = _truthfulqa_like(30, 3, 8, 4, planted, copies)
    tuning = 2.0 * np.random.default_rng(9).normal(size=(50, 3, 8, 4)).astype(np.float32)
    ref = _honest_llama_reference(head_wise, labels, question, tuning, num_to_intervene=k)
    pos, neg, tun, groups = _steerlab_inputs(head_wise, labels, question, tuning)
    iti = ITI.from_preset("paper", top_k=k).fit(pos, neg, head_dim=4, tuning=tun,
                                                  groups=groups)
    assert iti.selected_heads == ref["top_heads"]
    for layer in range(3):
        assert iti.val_accuracy[layer].tolist() == \
            torch.tensor(ref["accs"][layer], dtype=torch.float32).tolist()
    torch.testing.assert_close(iti.directions, ref["directions"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(iti.sigmas, ref["sigmas"], rtol=1e-5, atol=1e-6)
    for i, (layer, h) in enumerate(iti.selected_heads):
        torch.testing.assert_close(iti.vectors[Site("heads", layer)][h * 4:(h + 1) * 4],
                                   15.0 * ref["sigmas"][i] * ref["directions"][i],
                                   rtol=1e-5, atol=1e-5)
    n_train_q = len(ref["train_set_idxs"])
    assert iti.fit_info["split"] == "question"
    assert iti.fit_info["n_questions"] == [n_train_q, 30 - n_train_q] == [24, 6]
    # the tie is real: more heads share the K-th accuracy than fit in the top K, and a rule
    # other than the reference's (smaller layer, then head, first) would choose differently
    acc = ref["accs"].reshape(-1)
    kth = acc[[layer * 8 + h for layer, h in ref["top_heads"]][-1]]
    tied = [(int(i) // 8, int(i) % 8) for i in np.flatnonzero(acc == kth)]
    assert len(tied) > sum(1 for x in ref["top_heads"] if acc[x[0] * 8 + x[1]] == kth)
    by_position = sorted(range(24), key=lambda i: (-acc[i], i))[:k]
    assert [(i // 8, i % 8) for i in by_position] != ref["top_heads"]
    stable = np.argsort(acc, kind="stable")[::-1][:k]  # nor would a stable argsort's
    assert [(int(i) // 8, int(i) % 8) for i in stable] != ref["top_heads"]


def test_answers_of_one_question_never_land_on_both_sides_of_the_split() -> None:
    """validate_2fold.py L143-144 splits question indices, and utils.py L687-690 takes every
    row of a question to its side: so does ``split_questions`` (the same RandomState draw),
    for unpaired, interleaved ids too, and ITI.fit with ``groups``."""
    rng = np.random.default_rng(3)
    for trial in range(20):
        n_q = int(rng.integers(3, 40))
        gp = [f"q{int(x)}" for x in rng.integers(0, n_q, int(rng.integers(n_q, 3 * n_q)))]
        gn = [f"q{int(x)}" for x in rng.integers(0, n_q, int(rng.integers(n_q, 3 * n_q)))]
        tr, va, q_tr, q_va = split_questions(gp, gn, 0.2, seed=trial)
        ids = gp + gn
        assert sorted(tr.tolist() + va.tolist()) == list(range(len(ids)))
        train_q, val_q = {ids[i] for i in tr}, {ids[i] for i in va}
        assert not train_q & val_q
        assert (len(train_q), len(val_q)) == (q_tr, q_va)
        # the reference's draw, on questions numbered by first appearance
        order = list(dict.fromkeys(ids))
        want = np.random.RandomState(trial).choice(
            np.arange(len(order)), size=int(len(order) * (1 - 0.2)), replace=False)
        assert [ids[i] for i in tr] == [order[q] for q in want for i in
                                        [*[j for j, g in enumerate(gp) if g == order[q]],
                                         *[len(gp) + j for j, g in enumerate(gn)
                                           if g == order[q]]]]
    head_wise, labels, question = _truthfulqa_like(20, 2, 4, 4, [(1, 2)], [])
    pos, neg, _, groups = _steerlab_inputs(head_wise, labels, question, head_wise[:4])
    iti = ITI(top_k=1).fit(pos, neg, head_dim=4, groups=groups)
    assert iti.fit_info["split"] == "question" and iti.fit_info["n_questions"] == [16, 4]
    n_rows = {q: (int(((question == q) & (labels == 1)).sum()),
                  int(((question == q) & (labels == 0)).sum())) for q in range(20)}
    train_rows, _, _, _ = split_questions(*groups, 0.2, seed=42)
    assert sum(iti.fit_info["n_train"]) == len(train_rows)
    assert iti.fit_info["n_train"][0] + iti.fit_info["n_val"][0] == sum(p for p, _ in
                                                                        n_rows.values())
    with pytest.raises(DataError, match="question"):
        ITI().fit(pos, neg, head_dim=4, groups=(groups[0], groups[1][:-1]))
    with pytest.raises(DataError, match="pair"):
        ITI().fit(pos, neg, head_dim=4, groups=groups[0])  # type: ignore[arg-type]
    with pytest.raises(DataError, match="cannot be split"):
        ITI().fit(pos, neg, head_dim=4, groups=([0] * len(groups[0]), [0] * len(groups[1])))


def test_sigma_comes_from_the_tuning_rows_not_the_probe_rows() -> None:
    """validate_2fold.py L126-130 and L172-174: σ = torch.std (ddof 1) of the tuning bank's
    activations along the direction, a set apart from the probe rows."""
    head_wise, labels, question = _truthfulqa_like(20, 2, 4, 4, [(0, 1), (1, 3)], [])
    tuning = 10.0 * np.random.default_rng(1).normal(size=(30, 2, 4, 4)).astype(np.float32)
    pos, neg, tun, groups = _steerlab_inputs(head_wise, labels, question, tuning)
    with_tuning = ITI(top_k=2).fit(pos, neg, head_dim=4, tuning=tun, groups=groups)
    without = ITI(top_k=2).fit(pos, neg, head_dim=4, groups=groups)
    assert with_tuning.selected_heads == without.selected_heads
    assert with_tuning.fit_info["tuning"] == "given" and with_tuning.fit_info["n_tuning"] == 30
    assert without.fit_info["tuning"] == "probe rows"
    for i, (layer, h) in enumerate(with_tuning.selected_heads):
        d = with_tuning.directions[i].double()
        t = tun[Site("heads", layer)][:, h * 4:(h + 1) * 4].double()
        probe = torch.cat([pos[Site("heads", layer)], neg[Site("heads", layer)]])
        probe = probe[:, h * 4:(h + 1) * 4].double()
        assert float(with_tuning.sigmas[i]) == pytest.approx(float((t @ d).std()), rel=1e-6)
        assert float(with_tuning.sigmas[i]) != pytest.approx(float((t @ d).std(correction=0)),
                                                              rel=1e-6)
        assert float(without.sigmas[i]) == pytest.approx(float((probe @ d).std()), rel=1e-6)
        assert float(with_tuning.sigmas[i]) > 2 * float(without.sigmas[i])


# -- fit_iti: question ids, the held-out tuning set, the preset --------------------------------
def _tqa_csv(path: Path, n: int) -> Path:
    import csv

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers",
                    "Incorrect Answers", "Source"])
        for i in range(n):
            w.writerow(["A", "c", f"Is thing {i} red?", f"No, thing {i} is blue",
                        f"It is blue; Thing {i} is not red", f"Yes, thing {i} is red; It is red",
                        "s"])
    return path


def test_truthfulqa_labelled_items_carry_their_question(tmp_path: Path) -> None:
    """The TruthfulQA loader gives each answer its question as ``group`` (the reference's
    per-question blocks, utils.py L745-766)."""
    from steerlab.data import LabeledText, load_truthfulqa_labeled

    lab = load_truthfulqa_labeled(_tqa_csv(tmp_path / "tqa.csv", 2))
    assert [t.group for t in lab] == ["Is thing 0 red?"] * 5 + ["Is thing 1 red?"] * 5
    assert LabeledText("x", 1) == LabeledText("x", 1, None)  # the field is optional


def test_fit_iti_holds_out_whole_questions_for_sigma(tmp_path: Path) -> None:
    """validate_2fold.py L126-130: σ comes from a tuning set, not the probe rows. fit_iti's
    default holds out tuning_fraction of the questions: none of their answers is probed, and
    σ is the ddof-1 std (L174) of exactly their activations along each direction."""
    from steerlab.data import LabeledSet, load_truthfulqa_labeled
    from steerlab.fitting import _iti_hold_out, fit_iti

    lm = tiny_model("llama")
    lab = load_truthfulqa_labeled(_tqa_csv(tmp_path / "tqa.csv", 15))
    iti = fit_iti(lm, lab, ITI(top_k=2, layers=[0, 1]), cache=False, progress=False)
    info = iti.fit_info
    assert info["tuning"] == "held-out" and info["tuning_fraction"] == 0.2
    assert info["n_tuning_questions"] == 3 and info["n_tuning"] == 15
    assert info["split"] == "question" and info["n_questions"] == [9, 3]
    probe, held, n_held = _iti_hold_out(lab, 0.2, 42)
    assert isinstance(probe, LabeledSet) and isinstance(held, LabeledSet) and n_held == 3
    assert not {t.group for t in probe} & {t.group for t in held}
    assert sum(info["n_train"]) + sum(info["n_val"]) == len(probe) == 60
    acts = collect(lm, [t.text for t in held], iti.fit_sites(), Position.last(), rendered=False,
                   cache=False, progress=False)
    assert iti.head_dim is not None
    hd = iti.head_dim
    for i, (layer, h) in enumerate(iti.selected_heads):
        t = acts[Site("heads", layer)][:, h * hd:(h + 1) * hd].double()
        want = float((t @ iti.directions[i].double()).std(correction=1))
        assert float(iti.sigmas[i]) == pytest.approx(want, rel=1e-4)


def test_fit_iti_tuning_sets_the_preset_and_tiny_data(tmp_path: Path) -> None:
    """``tuning=`` (a set or plain texts) replaces the held-out slice; the paper preset's
    tuning_fraction (0.5) applies unless the call gives one (fit_option); data too small to
    hold anything out falls back to the probe rows, with a warning."""
    from steerlab.data import ContrastivePair, ContrastiveSet, LabeledSet, LabeledText
    from steerlab.fitting import fit_iti

    lm = tiny_model("llama")
    pairs = ContrastiveSet([ContrastivePair(f"Tell me about day {i}.", f"A happy day {i}.",
                                            f"A sad day {i}.") for i in range(10)])
    kw: dict[str, Any] = {"cache": False, "progress": False}
    paper = fit_iti(lm, pairs, ITI.from_preset("paper", layers=[1], top_k=2), **kw)
    assert paper.fit_info["tuning_fraction"] == 0.5 and paper.fit_info["n_tuning"] == 10
    assert paper.fit_info["n_questions"] == [4, 1] and paper.fit_info["preset"]["name"] == "paper"
    explicit = fit_iti(lm, pairs, ITI.from_preset("paper", layers=[1], top_k=2),
                       tuning_fraction=0.2, **kw)
    assert explicit.fit_info["tuning_fraction"] == 0.2 and explicit.fit_info["n_tuning"] == 4
    texts = ["Q: Is the sky green? A: No.", "Q: Is snow hot? A: Yes.", "Q: Hello? A: Hi."]
    given = fit_iti(lm, pairs, ITI(layers=[1], top_k=2), tuning=texts, **kw)
    assert given.fit_info["tuning"] == "given" and given.fit_info["n_tuning"] == 3
    assert given.fit_info["n_questions"] == [8, 2]  # every pair probed
    labelled = LabeledSet([LabeledText(t, 1) for t in texts])  # one class: labels unused
    again = fit_iti(lm, pairs, ITI(layers=[1], top_k=2), tuning=labelled, **kw)
    torch.testing.assert_close(again.sigmas, given.sigmas)
    with pytest.raises(DataError, match="not both"):
        fit_iti(lm, pairs, ITI(layers=[1]), tuning=texts, tuning_fraction=0.3, **kw)
    with pytest.raises(DataError, match="tuning_fraction"):
        fit_iti(lm, pairs, ITI(layers=[1]), tuning_fraction=1.0, **kw)
    with pytest.warns(UserWarning, match="too few questions"):
        tiny = fit_iti(lm, pairs[:2], ITI(layers=[1], top_k=1), **kw)
    assert tiny.fit_info["tuning"] == "probe rows"
    none = fit_iti(lm, pairs, ITI(layers=[1], top_k=1), tuning_fraction=0.0, **kw)
    assert none.fit_info["tuning"] == "probe rows" and none.fit_info["n_tuning"] == 20


def test_paper_preset_is_the_references_configuration() -> None:
    """validate_2fold.py L60-67 and README.md L112: K 48, α 15, val_ratio 0.2, seed 42, the
    centre-of-mass direction; every layer; the last token."""
    preset = ITI.presets["paper"]
    assert dict(preset.hyperparameters) == {
        "layers": None, "top_k": 48, "alpha": 15.0, "direction": "mass_mean",
        "val_fraction": 0.2, "seed": 42, "recipe": "last", "scope": "last"}
    assert dict(preset.fit) == {"tuning_fraction": 0.5}
    assert "validate_2fold.py" in preset.source and "utils.py" in preset.source
    iti = ITI.from_preset("paper", alpha=5.0)
    assert (iti.top_k, iti.alpha, iti.fit_options) == (48, 5.0, {"tuning_fraction": 0.5})
    assert iti.fit_option("tuning_fraction", None, 0.2) == 0.5
    assert iti.fit_option("tuning_fraction", 0.3, 0.2) == 0.3
