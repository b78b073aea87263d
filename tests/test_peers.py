"""steerlab's CAA against the peers' own code (steering-vectors, repeng) on a tiny model.

Skipped cleanly unless both peers are importable (``pip install --no-deps
steering-vectors==0.12.2 repeng==0.4.0``, the ``peers`` extra; see benchmarks/peers.py).

Positions read, aligned here:

* steerlab ``CAA(recipe="last")`` at ``resid_post.L`` reads the output of decoder block L
  at the last token of chat-rendered prompt + completion (``Position.last``; rendered text is
  tokenized without added special tokens, since the template writes the BOS).
* steering-vectors ``train_steering_vector(layers=[L], read_token_index=-1)`` reads the
  output of ``model.layers[L]`` (its ``decoder_block`` layer type) at the last token of the
  string it is given, tokenized *with* the tokenizer's special tokens. The tiny tokenizer
  adds a BOS and its chat template writes one too, so the strings given to steering-vectors
  are the rendered texts without the template's leading BOS: the same token ids.
* repeng ``ControlVector.train(hidden_layers=[L])`` reads ``hidden_states[L + 1]`` (the
  output of block L) at the last non-padding token, tokenized like steering-vectors.

Applying: steering-vectors' ``SteeringVector.apply(model, multiplier=m)`` and repeng's
``ControlModel.set_control(v, c)`` add to the block output at every position, which is
steerlab's scope ``all``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

sv = pytest.importorskip("steering_vectors")
if not hasattr(np, "float_"):  # repeng 0.4.0 annotates with np.float_ (removed in NumPy 2)
    np.float_ = np.float64  # type: ignore[attr-defined]
repeng = pytest.importorskip("repeng")

from steerlab.data import ContrastivePair, ContrastiveSet, Renderer  # noqa: E402
from steerlab.fitting import fit_caa  # noqa: E402
from steerlab.methods import CAA  # noqa: E402
from steerlab.runtime import Steer, steering  # noqa: E402
from steerlab.sites import Site  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PAIRS = ContrastiveSet([
    ContrastivePair("How was the trip?", "It was wonderful.", "It was awful."),
    ContrastivePair("What about the food?", "Delicious, I loved it!", "Bland, I hated it."),
    ContrastivePair("And the weather", "Sunny and warm", "Cold and grey, sadly"),
    ContrastivePair("Your new job?", "Great team", "Terrible boss"),
], name="tiny-sentiment")
PROMPTS = ["Describe a river.", "Tell me about your week, please"]


def _lm():  # type: ignore[no-untyped-def]
    return tiny_model("llama", chat=True)


def _peer_text(lm, text: str) -> str:  # type: ignore[no-untyped-def]
    """``text`` as the peers must be given it to see the ids steerlab reads: the peers
    tokenize with special tokens, so a BOS the template already wrote is dropped."""
    tok = lm.tokenizer
    bos = tok.bos_token
    ids_steerlab = tok(text, add_special_tokens=False)["input_ids"]
    out = text[len(bos):] if bos and text.startswith(bos) and \
        tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2 else text
    assert tok(out)["input_ids"] == ids_steerlab
    return out


def _samples(lm) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    r = Renderer(lm.tokenizer)
    return [(_peer_text(lm, r.full(p.prompt, p.positive)),
             _peer_text(lm, r.full(p.prompt, p.negative))) for p in PAIRS]


@pytest.mark.parametrize("layer", [0, 1])
def test_steering_vectors_mean_difference_equals_steerlab_caa(layer: int) -> None:
    lm = _lm()
    ours = fit_caa(lm, PAIRS, CAA(layers=layer, recipe="last", scope="all"), cache=False,
                   progress=False).vectors[Site("resid_post", layer)]
    theirs = sv.train_steering_vector(lm.model, lm.tokenizer, _samples(lm), layers=[layer],
                                      read_token_index=-1, batch_size=1)
    v = theirs.layer_activations[layer].float().cpu()
    assert v.shape == ours.shape
    assert float(ours.norm()) > 0
    torch.testing.assert_close(v, ours, atol=1e-5, rtol=1e-5)


def _logits(lm, ctx) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    r = Renderer(lm.tokenizer)
    enc = lm.tokenizer([r.prompt(p) for p in PROMPTS], add_special_tokens=False,
                       padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad(), ctx:
        out = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return out.logits, enc["attention_mask"].bool()


@pytest.mark.parametrize("m", [2.5, -1.5])
def test_steering_vectors_apply_equals_caa_scope_all(m: float) -> None:
    lm = _lm()
    layer = 1
    caa = fit_caa(lm, PAIRS, CAA(layers=layer, recipe="last", scope="all"), cache=False,
                  progress=False)
    vec = sv.SteeringVector({layer: caa.vectors[Site("resid_post", layer)].clone()},
                            "decoder_block")
    plain, mask = _logits(lm, torch.no_grad())
    theirs, _ = _logits(lm, vec.apply(lm.model, multiplier=m))
    ours, _ = _logits(lm, steering(lm, [Steer(caa, m, scope="all")]))
    assert not torch.allclose(theirs[mask], plain[mask], atol=1e-3)  # it does steer
    # steering-vectors also adds to the left padding, steerlab never does; the real tokens
    # do not attend to padding, so their logits agree
    torch.testing.assert_close(theirs[mask], ours[mask], atol=1e-5, rtol=1e-5)

    # and greedy generation (KV cache: one new token per forward pass) agrees too
    r = Renderer(lm.tokenizer)
    enc = lm.tokenizer([r.prompt(p) for p in PROMPTS], add_special_tokens=False,
                       padding=True, padding_side="left", return_tensors="pt")
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": lm.tokenizer.pad_token_id}
    with torch.no_grad():
        with vec.apply(lm.model, multiplier=m):
            g_theirs = lm.model.generate(**enc, **kw)
        with steering(lm, [Steer(caa, m, scope="all")]):
            g_ours = lm.model.generate(**enc, **kw)
    assert torch.equal(g_theirs, g_ours)


def test_repeng_pca_direction_and_control_match_steerlab() -> None:
    from sklearn.decomposition import PCA

    from steerlab.activations import Position, Sample, collect

    lm = _lm()
    # block 0 of the 2: transformers' hidden_states of the last block come after the final
    # norm, so repeng's reading at the last block is not the block output
    layer = 0
    samples = _samples(lm)
    entries = [repeng.DatasetEntry(positive=p, negative=n) for p, n in samples]
    vec = repeng.ControlVector.train(lm.model, lm.tokenizer, entries, hidden_layers=[layer],
                                     batch_size=1)
    u = torch.from_numpy(np.asarray(vec.directions[layer], dtype=np.float32))

    # the same first principal component of the paired last-token differences, from
    # steerlab's collection at resid_post.L
    r = Renderer(lm.tokenizer)
    site = Site("resid_post", layer)
    pos = collect(lm, [Sample(r.prompt(p.prompt), p.positive) for p in PAIRS], [site],
                  Position.last(), cache=False, progress=False)[site]
    neg = collect(lm, [Sample(r.prompt(p.prompt), p.negative) for p in PAIRS], [site],
                  Position.last(), cache=False, progress=False)[site]
    pc = torch.from_numpy(PCA(n_components=1).fit((pos - neg).numpy()).components_[0])
    cos = float(torch.nn.functional.cosine_similarity(u, pc.float(), dim=0))
    assert abs(cos) == pytest.approx(1.0, abs=1e-4)
    assert float(((pos - neg) @ u).mean()) > 0  # repeng orients it towards the positive side

    # repeng's control at coefficient c is steerlab's CAA with vector u at strength c, all
    # positions (one unpadded prompt: repeng 0.4.0 builds its padding mask from the
    # position ids, which transformers 5 gives as (1, T) to a plain forward pass)
    c = 3.0
    caa = CAA(layers=layer, scope="all")
    caa.set_vectors({site: u})
    enc = lm.tokenizer([r.prompt(PROMPTS[0])], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        with steering(lm, [Steer(caa, c)]):
            ours = lm.model(**enc).logits
        cm = repeng.ControlModel(lm.model, [layer])
        try:
            cm.set_control(vec, c)
            theirs = lm.model(**enc).logits
        finally:
            cm.reset()
            cm.unwrap()
        plain = lm.model(**enc).logits
    assert not torch.allclose(theirs, plain, atol=1e-3)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert type(lm.model.model.layers[layer]).__name__ == "LlamaDecoderLayer"  # unwrapped
