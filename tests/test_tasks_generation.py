"""Generation tasks (refusal, sentiment, offensive, concept), their judges and fluency."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from steerlab.data import ContrastiveSet, LabeledSet, neutral_prompts
from steerlab.errors import DataError
from steerlab.evals.fluency import dist_n, generation_fluency, repetition_rate
from steerlab.evals.metrics import conditional_perplexity
from steerlab.evals.tasks.generation import (
    ADVBENCH_PATH,
    Concept,
    Offensive,
    Refusal,
    Sentiment,
    available_concepts,
    is_refusal,
    load_concepts,
    load_harmless_instructions,
    refusal_rate,
)
from steerlab.fitting import fit_method
from steerlab.methods import CAA
from steerlab.runtime import Steer
from steerlab.sites import Site
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

needs_advbench = pytest.mark.skipif(not ADVBENCH_PATH.is_file(),
                                    reason=f"AdvBench not found at {ADVBENCH_PATH}")
FLUENCY = ("ppl", "dist1", "dist2", "dist3", "repetition")


def big_steer(seed: int = 0) -> Steer:
    """A CAA with a large random vector at block 1, on every token."""
    c = CAA(layers=1)
    g = torch.Generator().manual_seed(seed)
    c.set_vectors({Site("resid_post", 1): torch.randn(32, generator=g) * 20})
    return Steer(c, 4.0, "all")


# --------------------------------------------------------------------------- fluency


def test_dist_n_against_hand_counts() -> None:
    texts = ["the cat sat", "The CAT ran"]
    # unigrams: the cat sat the cat ran -> 4 distinct of 6 (lowercased)
    assert dist_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 of 4
    assert dist_n(texts, 2) == pytest.approx(3 / 4)
    assert dist_n(texts, 3) == pytest.approx(1.0)
    # n-grams stay within a text: (a b) (b a) | nothing from "b" -> 2 of 2, not 2 of 3
    assert dist_n(["a b a", "b"], 2) == pytest.approx(1.0)
    assert dist_n(["one", "two"], 2) == 0.0  # no bigram at all
    with pytest.raises(DataError):
        dist_n([], 1)
    with pytest.raises(DataError):
        dist_n(["a b"], 0)


def test_repetition_rate_against_hand_counts() -> None:
    # 4-grams: abcd bcda cdab dabc abcd -> 4 distinct of 5 -> 1 - 4/5
    loop = "a b c d a b c d"
    assert repetition_rate([loop]) == pytest.approx(0.2)
    assert repetition_rate(["w x y z v"]) == 0.0
    assert repetition_rate([loop, "w x y z v"]) == pytest.approx(0.1)
    assert repetition_rate([loop, "too short"]) == pytest.approx(0.2)  # no 4-gram: left out
    assert repetition_rate(["x x x"], n=1) == pytest.approx(2 / 3)


def test_generation_fluency_uses_the_unsteered_perplexity() -> None:
    lm = tiny_model("llama", chat=True)
    prompts, texts = ["hi", "tell me more"], ["the cat sat", "on the mat the cat"]
    out = generation_fluency(lm, prompts, texts)
    assert set(out) == set(FLUENCY)
    assert out["ppl"] == pytest.approx(conditional_perplexity(lm, prompts, texts))
    assert out["dist1"] == pytest.approx(dist_n(texts, 1))
    assert math.isnan(generation_fluency(lm, ["hi"], [""])["ppl"])
    with pytest.raises(DataError):
        generation_fluency(lm, ["hi"], ["a", "b"])


# --------------------------------------------------------------------------- judges


def test_offensive_probability_orders_an_insult_above_a_polite_reply() -> None:
    from steerlab.evals.judges import offensive_probability

    rude, polite = offensive_probability(["Shut up, you stupid idiot.",
                                          "Thank you, that is very kind of you."])
    assert 0.0 <= polite < rude <= 1.0
    assert rude > 0.5 > polite
    assert offensive_probability([]) == []


def test_minilm_similarity_prefers_on_concept_text() -> None:
    from steerlab.evals.judges import ConceptJudge

    judge = ConceptJudge(load_concepts()["ocean"]["description"])
    on, off = judge.similarity(["Dolphins swam beside the boat as waves rolled onto the beach.",
                                "The accountant filed the quarterly tax return on Tuesday."])
    assert on > off + 0.2
    emb = judge.embed(["a first sentence", "another one entirely", ""])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # similar texts score higher than unrelated ones, in the embedding itself
    a, b, c = judge.embed(["A cat sat on the mat.", "A kitten rested on the rug.",
                           "Interest rates rose by half a point."])
    assert float(a @ b) > float(a @ c) + 0.2
    assert judge.similarity([]) == []


def test_refusal_matcher_on_crafted_strings() -> None:
    refusals = ["I'm sorry, but I can't help with that.", "I\u2019m sorry, no.",
                "AS AN AI language model I must decline.", "I cannot provide that.",
                "Unfortunately I won't do this.", "I am unable to comply."]
    answers = ["Sure, here is a recipe for pancakes.", "The capital of Australia is Canberra.",
               "Step 1: gather the materials.", ""]
    assert all(is_refusal(t) for t in refusals)
    assert not any(is_refusal(t) for t in answers)
    assert refusal_rate(refusals[:2] + answers[:2]) == pytest.approx(0.5)
    with pytest.raises(DataError):
        refusal_rate([])


# --------------------------------------------------------------------------- data files


def test_builtin_data_files() -> None:
    harmless = load_harmless_instructions()
    assert len(harmless) >= 120 and len(set(harmless)) == len(harmless)
    concepts = load_concepts()
    assert len(concepts) >= 3
    for c in concepts.values():
        assert len(c["sentences"]) >= 30 and c["keywords"] and c["description"]
    offensive = Offensive().fit_set()
    assert len(offensive) >= 40
    neutral = set(neutral_prompts())
    assert not neutral & {p.prompt for p in offensive}
    assert not neutral & set(harmless)


def test_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="max_new_tokens"):
        Sentiment(max_new_tokens=0)
    with pytest.raises(DataError, match="empty"):
        Sentiment(prompts=[])
    with pytest.raises(DataError, match="fold"):
        Sentiment().fit_set(1)
    with pytest.raises(DataError, match=r"available: .*music.*ocean"):
        Concept("volcano")
    bad = tmp_path / "concepts.json"
    bad.write_text(json.dumps({"concepts": {
        "a": {"description": "x", "keywords": ["x"]},
        "b": {"description": "y", "keywords": ["y"], "sentences": ["y1", "y2"]}}}))
    with pytest.raises(DataError, match=r"concept 'a'.*missing field 'sentences'"):
        Concept("b", bad)
    bad.write_text(json.dumps({"items": []}))
    with pytest.raises(DataError, match="missing field 'concepts'"):
        available_concepts(bad)
    bad.write_text("{not json")
    with pytest.raises(DataError, match="malformed JSON"):
        available_concepts(bad)
    harmless = tmp_path / "harmless.json"
    harmless.write_text(json.dumps({"prompts": ["a", "b"]}))
    with pytest.raises(DataError, match="missing field 'instructions'"):
        load_harmless_instructions(harmless)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "positive": "a", "negative": "b"}\n'
                     '{"prompt": "q", "positive": "c"}\n')
    with pytest.raises(DataError, match="missing field 'negative'"):
        Offensive(pairs).fit_set()
    with pytest.raises(DataError, match="tokenizer"):
        Refusal(harmless=["a", "b", "c"]).fit_set()


# --------------------------------------------------------------------------- tasks end to end


@pytest.mark.parametrize("make", [
    lambda: Sentiment(n_test=4, max_new_tokens=8, batch_size=4),
    lambda: Offensive(n_test=4, max_new_tokens=8, batch_size=4),
    lambda: Concept("music", n_train=10, n_test=4, max_new_tokens=8, batch_size=4),
], ids=["sentiment", "offensive", "concept"])
def test_neutral_prompt_task_end_to_end(make: object) -> None:
    lm = tiny_model("llama", chat=True)
    task = make()  # type: ignore[operator]
    data = task.fit_set()
    prompts = task.eval_prompts()
    if isinstance(data, ContrastiveSet):
        assert {p.prompt for p in data}.isdisjoint(prompts)
        assert all(p.positive != p.negative for p in data)
        controller = fit_method(lm, "caa", data, layer=1, recipe="last")
    else:
        assert isinstance(data, LabeledSet) and set(data.labels()) == {0, 1}
        assert not set(data.texts()) & set(prompts)
        controller = fit_method(lm, "probe", data, layer=1)
    assert controller.fit_info["position"]
    plain = task.evaluate(lm)
    steered = task.evaluate(lm, big_steer())
    for r in (plain, steered):
        assert r.task == task.name and r.n == 4 and len(r.examples) == 3
        assert {task.primary, f"{task.primary}_shift", *FLUENCY} <= set(r.metrics)
        assert all(math.isfinite(v) for v in r.metrics.values()), r.metrics
    assert plain.metrics[f"{task.primary}_shift"] == 0.0
    assert steered.metrics[f"{task.primary}_shift"] == pytest.approx(
        steered.metrics[task.primary] - plain.metrics[task.primary])
    assert steered.examples != plain.examples
    assert json.loads(json.dumps(task.describe()))["name"] == task.name


def test_concept_fit_set_and_mentions() -> None:
    task = Concept("ocean", n_train=12)
    data = task.fit_set()
    concepts = load_concepts()
    pos = [t.text for t in data if t.label == 1]
    neg = [t.text for t in data if t.label == 0]
    assert pos == concepts["ocean"]["sentences"][:12] and len(neg) == 12
    others = {name: set(c["sentences"]) for name, c in concepts.items() if name != "ocean"}
    assert all(any(t in s for s in others.values()) for t in neg)
    assert {name for name, s in others.items() if s & set(neg)} == set(others)  # interleaved
    assert task.name == "concept:ocean" and Concept("music").name == "concept:music"
    assert task.mentions("Whales swim in the OCEANS.") and task.mentions("big waves")
    assert not task.mentions("It was a seasonal menu.")  # 'sea' only as a whole word
    assert task.describe()["concept"] == "ocean"


def test_batched_generation_equals_one_at_a_time() -> None:
    lm = tiny_model("llama", chat=True)
    steer = big_steer(1)
    one = Sentiment(n_test=5, max_new_tokens=10, batch_size=1)
    many = Sentiment(n_test=5, max_new_tokens=10, batch_size=5)
    for steers in (None, steer):
        p1, t1 = one.generations(lm, steers)
        p5, t5 = many.generations(lm, steers)
        assert p1 == p5 and t1 == t5
    assert t1 != one.generations(lm, None)[1]


def test_unsteered_value_is_cached_per_model() -> None:
    lm = tiny_model("llama", chat=True)
    task = Sentiment(n_test=3, max_new_tokens=6, batch_size=3)
    steered = task.evaluate(lm, [big_steer(2)])
    assert len(task._baseline) == 1
    base = next(iter(task._baseline.values()))
    assert steered.metrics["vader_shift"] == pytest.approx(steered.metrics["vader"] - base)
    assert task.evaluate(lm, []).metrics["vader"] == pytest.approx(base)
    assert len(task._baseline) == 1


@needs_advbench
def test_refusal_end_to_end() -> None:
    from steerlab.data import load_advbench

    lm = tiny_model("llama", chat=True)
    full = Refusal()
    h_train, h_test, s_train, s_test = full.splits()
    n_goals = len(load_advbench(ADVBENCH_PATH))
    # scikit-learn's train_test_split(test_size=0.2, random_state=42): ceil(0.2 n) held out
    assert len(h_test) == math.ceil(n_goals * 0.2) and len(h_train) + len(h_test) == n_goals
    assert not set(h_train) & set(h_test) and not set(s_train) & set(s_test)

    task = Refusal(n_train=4, n_test=3, max_new_tokens=8, batch_size=4)
    assert task.splits()[1] == h_test[:3]  # the same seeded split, capped
    data = task.fit_set(lm=lm)
    assert sorted(data.labels()) == [0] * 4 + [1] * 4
    texts = data.texts()
    assert all(t.endswith("assistant:") and not t.startswith("<bos>") for t in texts)
    assert all(p not in t for p in task.eval_prompts() for t in texts)
    assert texts[0] == "user: " + h_train[0] + "\nassistant:"
    fit_method(lm, "probe", data, layer=1)
    plain = task.evaluate(lm)
    steered = task.evaluate(lm, big_steer())
    for r in (plain, steered):
        assert r.n == 6 and len(r.examples) == 3
        assert {"refusal_rate", "harmless_refusal_rate", "refusal_rate_shift", *FLUENCY} \
            <= set(r.metrics)
        assert all(math.isfinite(v) for v in r.metrics.values()), r.metrics
        assert 0.0 <= r.metrics["refusal_rate"] <= 1.0
    assert steered.examples != plain.examples
    assert json.loads(json.dumps(task.describe()))["seed"] == 42
