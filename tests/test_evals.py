"""Behaviour/fluency metrics on a tiny model."""

from __future__ import annotations

import pytest
import torch

from steerlab.evals.metrics import conditional_perplexity, sentiment_sweep, vader_compound
from steerlab.methods import CAA
from steerlab.runtime import Steer, steering
from steerlab.sites import Site
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_vader_orders_sentiment() -> None:
    good, bad = vader_compound(["What a wonderful, lovely day!", "This is awful and sad."])
    assert good > 0.5 > -0.5 > bad


def test_sentiment_sweep_rows() -> None:
    lm = tiny_model("llama", chat=True)
    c = CAA(layers=1)
    c.set_vectors({Site("resid_post", 1): torch.randn(32) * 5})
    rows = sentiment_sweep(lm, ["hi", "tell me more"], [("caa +4", [Steer(c, 4.0)])],
                           max_new_tokens=4)
    assert [r["config"] for r in rows] == ["unsteered", "caa +4"]
    assert rows[0]["shift"] == 0.0 and rows[0]["ppl_ratio"] == 1.0
    ppl0 = conditional_perplexity(lm, ["hi"], [rows[0]["example"]])
    assert ppl0 > 1.0
    assert rows[1]["ppl"] / rows[0]["ppl"] == pytest.approx(rows[1]["ppl_ratio"])


def test_ab_match_probability_against_a_manual_forward() -> None:
    from steerlab.data import ContrastivePair, ContrastiveSet, Renderer
    from steerlab.evals.ab import ab_match_probability

    lm = tiny_model("llama", chat=True)
    data = ContrastiveSet([
        ContrastivePair("Pick one.\n (A) yes\n (B) no", "(A)", "(B)"),
        ContrastivePair("Again?\n (A) no\n (B) yes", "(B)", "(A)"),
    ])
    p = ab_match_probability(lm, data)
    renderer = Renderer(lm.tokenizer)
    tok = lm.tokenizer
    a, b = (tok.encode(x, add_special_tokens=False)[0] for x in ("A", "B"))
    manual = []
    for pair, want in zip(data, (0, 1), strict=True):
        ids = tok(renderer.prompt(pair.prompt) + "(", add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0, -1]
        manual.append(float(torch.softmax(logits[[a, b]], dim=0)[want]))
    assert p == pytest.approx(sum(manual) / 2, abs=1e-6)
    c = CAA(layers=1)
    c.set_vectors({Site("resid_post", 1): torch.randn(32) * 20})
    assert ab_match_probability(lm, data, Steer(c, 5.0, "all")) != pytest.approx(p, abs=1e-6)


def test_ab_match_probability_batched_equals_one_at_a_time_when_steered() -> None:
    from steerlab.data import ContrastivePair, ContrastiveSet
    from steerlab.evals.ab import ab_match_probability

    lm = tiny_model("llama", chat=True)
    data = ContrastiveSet([
        ContrastivePair("Pick one.\n (A) yes\n (B) no", "(A)", "(B)"),
        ContrastivePair("A much longer question, padded less?\n (A) no\n (B) yes", "(B)", "(A)"),
        ContrastivePair("Short?\n (A) x\n (B) y", "(A)", "(B)"),
    ])
    c = CAA(layers=1)
    c.set_vectors({Site("resid_post", 1): torch.randn(32, generator=torch.Generator()
                                                        .manual_seed(0)) * 3})
    for scope in ("all", "last"):
        one = ab_match_probability(lm, data, Steer(c, 2.0, scope), batch_size=1)
        many = ab_match_probability(lm, data, Steer(c, 2.0, scope), batch_size=3)
        assert many == pytest.approx(one, abs=1e-5)
    assert lm.tokenizer.padding_side == "left"  # restored


def test_next_token_kl_zero_unsteered_positive_steered_and_batch_invariant() -> None:
    from steerlab.evals.metrics import next_token_kl

    lm = tiny_model("llama")
    texts = ["the cat sat on the mat", "a", "in the beginning there was a long sentence"]
    c = CAA(layers=1)
    c.set_vectors({Site("resid_post", 1): torch.randn(32, generator=torch.Generator()
                                                        .manual_seed(1)) * 3})
    assert next_token_kl(lm, texts, None) == pytest.approx(0.0, abs=1e-6)
    one = next_token_kl(lm, texts, Steer(c, 1.0, "all"), batch_size=1)
    many = next_token_kl(lm, texts, Steer(c, 1.0, "all"), batch_size=3)
    assert one > 1e-4
    assert many == pytest.approx(one, rel=1e-4)
    # manual reference on the first text
    ids = lm.tokenizer(texts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p = torch.log_softmax(lm.model(input_ids=ids).logits.float(), -1)
        with steering(lm, Steer(c, 1.0, "all")):
            q = torch.log_softmax(lm.model(input_ids=ids).logits.float(), -1)
    manual = float((p.exp() * (p - q)).sum(-1).mean())
    assert next_token_kl(lm, texts[:1], Steer(c, 1.0, "all")) == pytest.approx(manual, rel=1e-4)
