"""SAS: the sparse vector, steering, composition, artifacts; corpus activations and the
spliced-in loss (issue 6)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from steerlab.corpus import builtin_corpus, corpus_activations, load_corpus
from steerlab.errors import DataError, SteeringError
from steerlab.methods.base import StepContext
from steerlab.methods.sas import SAS, sas_vector
from steerlab.runtime import Steer, generate
from steerlab.sae import SAEConfig, SparseAutoencoder, save_saelens
from steerlab.sites import Site
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SITE = Site("resid_post", 1)


def _ctx(batch: int, seq: int) -> StepContext:
    pos = torch.arange(seq).expand(batch, seq)
    return StepContext(positions=pos, prompt_len=torch.full((batch,), seq))


def _sae(arch: str = "relu", d: int = 8, m: int = 32, seed: int = 0,
         site: str = "resid_post.1") -> SparseAutoencoder:
    """A random SAE whose features fire on about half of N(0, 1) inputs."""
    cfg = SAEConfig(d_in=d, d_sae=m, architecture=arch,  # type: ignore[arg-type]
                    k=6 if arch == "topk" else None, site=site,
                    jumprelu_init_threshold=0.05)
    sae = SparseAutoencoder(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(m, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae


def _data(d: int = 8, n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(d)
    shift[0] = 2.0
    return torch.randn(n, d, generator=g) + shift, torch.randn(n, d, generator=g) - shift


def _reference_vector(S_pos: torch.Tensor, S_neg: torch.Tensor, tau: float) -> torch.Tensor:
    """Algorithm 1 with explicit loops over features."""
    m = S_pos.shape[1]
    sides = []
    for S in (S_pos, S_neg):
        v = torch.zeros(m)
        for c in range(m):
            rows = [float(S[r, c]) for r in range(S.shape[0]) if S[r, c] != 0]
            if rows and len(rows) / S.shape[0] >= tau:
                v[c] = sum(rows) / len(rows)
        sides.append(v)
    vp, vn = sides
    for c in range(m):
        if vp[c] != 0 and vn[c] != 0:
            vp[c] = vn[c] = 0
    return vp - vn


# -- the vector --------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.3, 0.6])
def test_vector_matches_algorithm_1_loops(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    S_pos = torch.relu(torch.randn(30, 20, generator=g) - 0.5)
    S_neg = torch.relu(torch.randn(25, 20, generator=g) - 0.8)
    v, vp, vn = sas_vector(S_pos, S_neg, tau)
    torch.testing.assert_close(v, _reference_vector(S_pos, S_neg, tau))
    assert not bool(((vp != 0) & (vn != 0)).any())


def test_fit_exposes_features_and_reports_no_survivors() -> None:
    pos, neg = _data()
    c = SAS(1, sae=_sae(), tau=0.2).fit(pos, neg)
    assert c.vector is not None
    assert c.feature_ids and len(c.feature_ids) == int((c.vector != 0).sum())
    vals = c.feature_values
    assert all(abs(a) >= abs(b) for a, b in itertools.pairwise(vals))
    assert c.fit_info["n_features"] == len(c.feature_ids)
    with pytest.raises(SteeringError, match="lower tau"):
        SAS(1, sae=_sae(), tau=1.0).fit(pos, pos + 1e-3)


# -- steering ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_steering_equals_the_literal_formula(arch: str) -> None:
    pos, neg = _data()
    sae = _sae(arch)
    c = SAS(1, sae=sae, tau=0.1).fit(pos, neg)
    assert c.vector is not None
    h = torch.randn(3, 4, 8)
    lam = torch.tensor([1.5, -2.0, 4.0])
    out = c.steer(SITE, h, lam, _ctx(3, 4))
    with torch.no_grad():
        s = sae.encode(h)
        literal = sae.decode(sae.activation(s + lam[:, None, None] * c.vector)) \
            + (h - sae.decode(s))
    torch.testing.assert_close(out, literal, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_strength_is_bit_identical_and_rows_are_independent(dtype: torch.dtype) -> None:
    pos, neg = _data()
    c = SAS(1, sae=_sae(), tau=0.1).fit(pos, neg)
    h = torch.randn(3, 5, 8).to(dtype)
    lam = torch.tensor([0.0, 2.0, 0.0])
    out = c.steer(SITE, h, lam, _ctx(3, 5))
    assert out.dtype == dtype
    assert torch.equal(out[0], h[0]) and torch.equal(out[2], h[2])
    assert not torch.equal(out[1], h[1])
    torch.testing.assert_close(c.steer(SITE, h[1:2], lam[1:2], _ctx(1, 5))[0], out[1])
    assert torch.equal(c.steer(SITE, h, torch.zeros(3), _ctx(3, 5)), h)


def test_composition_adds_vectors_in_sparse_space() -> None:
    sae = _sae()
    a = SAS(1, sae=sae, tau=0.1).fit(*_data(seed=0))
    b_pos, b_neg = _data(seed=1)
    b = SAS(1, sae=sae, tau=0.1).fit(b_neg, b_pos)
    both = SAS.compose([(a, 1.0), (b, 0.5)])
    assert a.vector is not None and b.vector is not None and both.vector is not None
    torch.testing.assert_close(both.vector, a.vector + 0.5 * b.vector)
    h = torch.randn(2, 3, 8)
    lam = torch.tensor([2.0, 1.0])
    with torch.no_grad():
        s = sae.encode(h)
        literal = sae.decode(sae.activation(s + lam[:, None, None] * both.vector)) \
            + (h - sae.decode(s))
    torch.testing.assert_close(both.steer(SITE, h, lam, _ctx(2, 3)), literal, rtol=1e-4,
                               atol=1e-4)
    other = SAS(1, sae=_sae(seed=5), tau=0.1).fit(*_data())
    with pytest.raises(SteeringError, match="different SAEs"):
        SAS.compose([(a, 1.0), (other, 1.0)])


def test_bad_input() -> None:
    pos, neg = _data()
    for tau in (-0.1, 1.5, float("nan")):
        with pytest.raises(SteeringError, match="tau"):
            SAS(1, sae=_sae(), tau=tau)
    with pytest.raises(SteeringError, match=r"trained at resid_post\.3"):
        SAS(1, sae=_sae(site="resid_post.3"))
    with pytest.raises(SteeringError, match="width"):
        SAS(1, sae=_sae()).fit(pos[:, :4], neg[:, :4])
    bad = pos.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError, match="non-finite"):
        SAS(1, sae=_sae()).fit(bad, neg)
    with pytest.raises(SteeringError, match="needs an SAE"):
        SAS(1).fit(pos, neg)
    c = SAS(1, sae=_sae(), tau=0.1).fit(pos, neg)
    with pytest.raises(SteeringError, match="width"):
        c.steer(SITE, torch.randn(1, 2, 6), torch.ones(1), _ctx(1, 2))
    with pytest.raises(SteeringError, match="finite"):
        c.steer(SITE, torch.randn(1, 2, 8), torch.tensor([float("inf")]), _ctx(1, 2))


# -- on a model --------------------------------------------------------------------------------
@pytest.mark.parametrize("embed", [True, False])
def test_artifact_round_trip_and_generation(embed: bool, tmp_path: Path) -> None:
    from steerlab import artifacts

    lm = tiny_model("llama")
    d = lm.info.hidden_size
    sae = _sae("topk", d=d, m=4 * d)
    folder = tmp_path / "sae"
    save_saelens(sae, folder)
    c = SAS(1, sae=str(folder) if not embed else sae, tau=0.1, embed_sae=embed, scope="all")
    c.fit(*_data(d=d))
    c.model_info = lm.info
    path = artifacts.save(c, tmp_path / "sas.safetensors")
    loaded = artifacts.load(path, lm.info)
    assert isinstance(loaded, SAS) and loaded.vector is not None and c.vector is not None
    assert torch.equal(loaded.vector, c.vector)
    prompts = ["hello there", "a much longer prompt than that one"]
    plain = generate(lm, prompts, max_new_tokens=5, render=False)
    a = generate(lm, prompts, steers=Steer(c, 8.0), max_new_tokens=5, render=False)
    b = generate(lm, prompts, steers=Steer(loaded, 8.0), max_new_tokens=5, render=False)
    uncached = generate(lm, prompts, steers=Steer(c, 8.0), max_new_tokens=5, render=False,
                        use_cache=False)
    assert a == b == uncached
    assert a != plain
    assert generate(lm, prompts, steers=Steer(c, 0.0), max_new_tokens=5, render=False) == plain


def test_corpus_activations_shards_and_cache(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    texts = builtin_corpus()[:20]
    shards = corpus_activations(lm, texts, "resid_post.1", max_tokens=150, batch_size=4,
                                cache_dir=tmp_path, progress=False)
    assert shards.n_tokens == 150 and shards.width == lm.info.hidden_size
    x = shards.tensor()
    assert x.shape == (150, lm.info.hidden_size)
    # the first token of each text is skipped: the first row is the second token of text 0
    from steerlab.activations import token_activations

    first = token_activations(lm, texts[0], "resid_post.1")
    torch.testing.assert_close(x[: first.shape[0] - 1], first[1:], rtol=1e-4, atol=1e-4)
    again = corpus_activations(lm, texts, "resid_post.1", max_tokens=150, batch_size=4,
                               cache_dir=tmp_path, progress=False)
    assert again.files == shards.files
    with pytest.raises(DataError, match="empty"):
        corpus_activations(lm, [], "resid_post.1", cache_dir=tmp_path)


def test_load_corpus_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one text\n\nanother text\n")
    assert load_corpus(tmp_path / "a.txt") == ["one text", "another text"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x y"}) + "\n")
    assert load_corpus(tmp_path / "b.jsonl") == ["x y"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="text"):
        load_corpus(tmp_path / "c.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    assert len(load_corpus(tmp_path)) == 3  # the folder: a.txt and b.jsonl (c.jsonl skipped)


def test_spliced_loss_is_zero_for_an_exact_sae_and_not_for_a_bad_one() -> None:
    from steerlab.evals.sae import spliced_loss

    lm = tiny_model("llama")
    d = lm.info.hidden_size
    exact = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu",
                                        apply_b_dec_to_input=False))
    eye = torch.eye(d)
    with torch.no_grad():  # relu(x) − relu(−x) = x
        exact.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        exact.b_enc.zero_()
        exact.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        exact.b_dec.zero_()
    texts = builtin_corpus()[:4]
    r = spliced_loss(lm, exact, "resid_post.1", texts)
    assert abs(r["increase"]) < 1e-4 and r["n_tokens"] > 0
    broken = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu"))
    with torch.no_grad():
        broken.W_dec.zero_()
    # a random tiny model: zeroing its residual stream changes the loss (either way)
    assert abs(spliced_loss(lm, broken, "resid_post.1", texts)["increase"]) > 0.01


def test_top_activating_snippets() -> None:
    from steerlab.features import top_activating

    lm = tiny_model("llama")
    d = lm.info.hidden_size
    sae = _sae("relu", d=d, m=16, site="")
    out = top_activating(lm, sae, "resid_post.1", [0, 3], builtin_corpus()[:10], n_snippets=2)
    assert set(out) == {0, 3}
    for snippets in out.values():
        assert len(snippets) <= 2
        assert all("«" in s and "»" in s for _, s in snippets)
        assert all(a > 0 for a, _ in snippets)
    with pytest.raises(DataError, match="feature ids"):
        top_activating(lm, sae, "resid_post.1", [99], ["text"])
