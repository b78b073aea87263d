"""The shared comparison table (steerlab.evals.compare) against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from steerlab.errors import DataError
from steerlab.evals import metrics
from steerlab.evals.compare import (
    compare_configs,
    format_row,
    sentiment_sweep,
    strength_configs,
)
from steerlab.evals.fluency import degenerate_fraction, is_degenerate
from steerlab.evals.metrics import conditional_perplexity, vader_compound
from steerlab.evals.tasks import Offensive, Sentiment
from steerlab.methods import CAA
from steerlab.runtime import Steer, generate
from steerlab.sites import Site
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = ["hi", "tell me more", "what is this?"]


def _caa(scale: float = 5.0) -> CAA:
    torch.manual_seed(0)
    c = CAA(layers=1)
    c.set_vectors({Site("resid_post", 1): torch.randn(32) * scale})
    return c


def test_degenerate_against_hand_counts() -> None:
    loop = "the cat the cat the cat the cat"  # 5 four-grams, 2 distinct: rate 0.6
    fine = "a b c d e f"
    assert is_degenerate("") and is_degenerate("  \n ")
    assert is_degenerate(loop) and not is_degenerate(fine)
    assert not is_degenerate(loop, threshold=0.6)  # "above", not "at least"
    assert not is_degenerate("too short")  # no 4-gram: nothing repeats
    assert degenerate_fraction(["", loop, fine, "too short"]) == pytest.approx(2 / 4)
    with pytest.raises(DataError):
        degenerate_fraction([])
    with pytest.raises(DataError):
        degenerate_fraction("a text")


def test_vader_is_wrapped_once() -> None:
    assert metrics._vader() is metrics._vader()
    with pytest.raises(DataError):
        vader_compound("a single string")
    assert vader_compound([]) == []


def test_strength_configs() -> None:
    c = _caa()
    got = strength_configs(c, [1.0, 2.5], "CAA x{s:g}")
    assert [n for n, _ in got] == ["CAA x1", "CAA x2.5"]
    assert [s for _, steers in got for s in steers] == [Steer(c, 1.0), Steer(c, 2.5)]
    scoped = strength_configs(c, [3.0], "A {s}", scope="all")
    assert scoped == [("A 3.0", [Steer(c, 3.0, "all")])]


def test_compare_configs_against_direct_computation() -> None:
    lm = tiny_model("llama", chat=True)
    c = _caa()
    task = Sentiment(prompts=PROMPTS, max_new_tokens=6, batch_size=2, ppl_batch_size=1)
    rows = compare_configs(lm, task, [("caa +4", [Steer(c, 4.0)]), ("caa -4", [Steer(c, -4.0)])])
    assert [r["config"] for r in rows] == ["unsteered", "caa +4", "caa -4"]
    texts = [generate(lm, PROMPTS, steers=steers, max_new_tokens=6, batch_size=2)
             for steers in (None, [Steer(c, 4.0)], [Steer(c, -4.0)])]
    vader = [sum(vader_compound(t)) / len(t) for t in texts]
    ppl = [conditional_perplexity(lm, PROMPTS, t, batch_size=1) for t in texts]
    for r, t, v, p in zip(rows, texts, vader, ppl, strict=True):
        assert r["vader"] == pytest.approx(v)
        assert r["ppl"] == pytest.approx(p)
        assert r["shift"] == pytest.approx(v - vader[0])
        assert r["ppl_ratio"] == pytest.approx(p / ppl[0])
        assert r["example"] == t[0][:100]
        want = sum((not x.strip()) or _rep4(x) > 0.5 for x in t) / len(t)
        assert r["degenerate"] == pytest.approx(want)
        assert {"dist1", "dist2", "dist3", "repetition"} <= set(r)
    assert rows[0]["shift"] == 0.0 and rows[0]["ppl_ratio"] == 1.0


def _rep4(text: str) -> float:
    """4-gram repetition rate of one text, counted here without steerlab's helpers."""
    toks = text.lower().split()
    grams = [" ".join(toks[i:i + 4]) for i in range(len(toks) - 3)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def test_compare_configs_other_task_and_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    lm = tiny_model("llama", chat=True)
    task = Offensive(prompts=PROMPTS[:2], max_new_tokens=4, batch_size=2)
    rows = compare_configs(lm, task, strength_configs(_caa(), [2.0], "caa x{s:g}"),
                           verbose=True)
    assert [r["config"] for r in rows] == ["unsteered", "caa x2"]
    assert 0.0 <= rows[1]["offensive_prob"] <= 1.0
    line = capsys.readouterr().out.strip()
    assert line.startswith("caa x2") and "offensive_prob" in line and "ppl ratio" in line


def test_sentiment_sweep_is_the_sentiment_task() -> None:
    lm = tiny_model("llama", chat=True)
    configs = [("caa +4", [Steer(_caa(), 4.0)])]
    rows = sentiment_sweep(lm, PROMPTS, configs, max_new_tokens=5, batch_size=2)
    task = Sentiment(prompts=PROMPTS, max_new_tokens=5, batch_size=2, ppl_batch_size=8)
    assert rows == compare_configs(lm, task, configs)
    assert metrics.sentiment_sweep is sentiment_sweep  # the old import path still works
    with pytest.raises(AttributeError):
        _ = metrics.no_such_name  # type: ignore[attr-defined]


def test_measure_is_what_evaluate_reports() -> None:
    lm = tiny_model("llama", chat=True)
    task = Sentiment(prompts=PROMPTS, max_new_tokens=4, batch_size=3)
    result = task.evaluate(lm)
    prompts, texts = task.generations(lm)
    got = task.measure(lm, prompts, texts)
    assert got == pytest.approx({k: v for k, v in result.metrics.items()
                                 if k != "vader_shift"})
    with pytest.raises(DataError):
        Sentiment(ppl_batch_size=0)


def test_format_row() -> None:
    row = {"config": "CAA x2", "vader": 0.25, "shift": -0.125, "ppl_ratio": 1.234}
    assert format_row(row, "vader", "VADER", width=8) == \
        "  CAA x2   VADER +0.250 shift -0.125 ppl ratio 1.23"
    assert format_row({**row, "x": math.pi}, "x", width=6).startswith("  CAA x2 x +3.142")
