"""Behaviour/fluency metrics on a tiny model."""

from __future__ import annotations

import pytest
import torch

from steerlab.evals.metrics import conditional_perplexity, sentiment_sweep, vader_compound
from steerlab.methods import CAA
from steerlab.runtime import Steer
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
