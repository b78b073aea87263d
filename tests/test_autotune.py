"""Calibrated defaults: ``fit_method(..., auto=True)`` and ``steerlab fit --auto`` choose the
block, scope and strength on a validation slice of the training data under a fluency budget,
by generating (free-text pairs) or teacher-forced (labelled texts, A/B letters)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steerlab import artifacts
from steerlab.autotune import (
    _GenerationScorer,
    _rows,
    _Scorer,
    layer_candidates,
    resolve_objective,
    stored_strength,
    validation_split,
)
from steerlab.cli import app
from steerlab.data import ContrastivePair, ContrastiveSet, LabeledSet, LabeledText
from steerlab.errors import DataError
from steerlab.fitting import fit_method
from steerlab.runtime import Steer
from tiny_models import save_tiny_model, tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# On the seeded tiny model, adding these pairs' direction raises log p(positive completion):
# the random network has no semantics, so which way works is a property of this set.
PAIRS = ContrastiveSet([
    ContrastivePair(f"Tell me about day {i}.", f"It was awful and sad {i}.",
                    f"It was wonderful and happy {i}.") for i in range(8)
], name="tiny-auto")


def test_auto_chooses_the_best_admissible_point_and_records_it() -> None:
    lm = tiny_model("llama", chat=True)
    c = fit_method(lm, "odesteer", PAIRS, auto=True, budget=0.5, objective="teacher")
    a = c.fit_info["auto"]
    assert (a["objective"], a["fluency_metric"]) == ("teacher", "kl")
    assert a["layer"] == c.layer and a["fluency"] <= 0.5 and a["change"] > 0
    admissible = [p for p in a["points"] if p["kl"] <= 0.5 and p["strength"] > 0]
    assert a["change"] == max(p["change"] for p in admissible)
    assert {p["layer"] for p in a["points"]} == set(layer_candidates("odesteer", lm, None))
    assert stored_strength(c) == a["strength"]
    # fitted on the training part only (the other pairs validate; ODESteer holds out part of
    # its training rows for its own accuracy figure)
    train, val = validation_split(PAIRS, 0.2, 0)
    held = c.fit_info.get("n_heldout", [0, 0])
    assert c.fit_info["n_train"][0] + held[0] == len(train) and a["val_rows"] == 2 * len(val)
    # the recorded point is what the scorer measures for the returned controller
    scorer = _Scorer(lm, _rows(lm, val), 8)
    change, kl = scorer.measure(Steer(c, a["strength"]))
    assert change == pytest.approx(a["change"], abs=1e-4) and kl == pytest.approx(a["fluency"],
                                                                                 abs=1e-4)


def test_methods_without_a_block_have_one_candidate_and_nothing_feasible_raises() -> None:
    lm = tiny_model("llama", chat=True)
    assert layer_candidates("alqr", lm, None) == [None]
    assert layer_candidates("caa", lm, [1]) == [1]
    flipped = ContrastiveSet([ContrastivePair(p.prompt, p.negative, p.positive)
                              for p in PAIRS], name="flipped")
    with pytest.raises(DataError, match="no strength of caa raised"):
        fit_method(lm, "caa", flipped, auto=True, budget=0.5, recipe="last",
                   objective="teacher")
    with pytest.raises(DataError, match="budget"):
        fit_method(lm, "caa", PAIRS, auto=True, budget=float("nan"))
    with pytest.raises(DataError, match="perplexity ratio above 1"):
        fit_method(lm, "caa", PAIRS, auto=True, budget=0.9, objective="generate")


def test_cli_auto_stores_the_choice_and_generate_uses_it(tmp_path: Path) -> None:
    folder = save_tiny_model("llama", 0, tmp_path / "m")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p.prompt, "positive": p.positive,
                                          "negative": p.negative}) for p in PAIRS) + "\n")
    art = tmp_path / "auto.safetensors"
    runner = CliRunner()
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "odesteer", "--data",
                            str(data), "--auto", "--budget", "0.5", "--objective", "teacher",
                            "--out", str(art)])
    assert r.exit_code == 0, r.output
    a = artifacts.read_metadata(art)["fit"]["auto"]
    assert a["objective"] == "teacher" and a["fluency"] <= 0.5
    r1 = runner.invoke(app, ["generate", "hello", "--model", str(folder), "--steer", str(art),
                             "--max-new-tokens", "6"])
    r2 = runner.invoke(app, ["generate", "hello", "--model", str(folder), "--steer", str(art),
                             "--max-new-tokens", "6", "--strength", str(a["strength"])])
    r3 = runner.invoke(app, ["generate", "hello", "--model", str(folder), "--steer", str(art),
                             "--max-new-tokens", "6", "--strength", "1"])
    assert r1.exit_code == r2.exit_code == 0, r1.output
    assert r1.output.splitlines()[-1] == r2.output.splitlines()[-1]
    assert a["strength"] == 1.0 or r3.output != r1.output


def test_auto_tries_the_paper_scope_and_all_and_stores_the_chosen_scope() -> None:
    lm = tiny_model("llama", chat=True)
    c = fit_method(lm, "caa", PAIRS, auto=True, budget=5.0, recipe="last", objective="teacher")
    a = c.fit_info["auto"]
    # CAA's own scope (from:-1, the paper's) and every position, each on the same ladder
    assert {p["scope"] for p in a["points"]} == {"from:-1", "all"}
    assert c.scope == a["scope"] and str(c.default_scope) == a["scope"]
    admissible = [p for p in a["points"] if p["kl"] <= 5.0 and p["strength"] > 0]
    top = max(admissible, key=lambda p: p["change"])
    assert (a["scope"], a["strength"], a["change"]) == (top["scope"], top["strength"],
                                                       top["change"])
    # the negative strength is the best one at the chosen scope
    neg = [p for p in a["points"] if p["scope"] == a["scope"] and p["strength"] < 0
           and p["kl"] <= 5.0 and p["change"] < 0]
    if neg:
        assert a["strength_negative"] == min(neg, key=lambda p: p["change"])["strength"]
    # the artifact's hyper-parameter is the chosen scope, measured as recorded
    assert c.hyperparameters()["scope"] == a["scope"]
    _train, val = validation_split(PAIRS, 0.2, 0)
    change, _ = _Scorer(lm, _rows(lm, val), 8).measure(Steer(c, a["strength"]))
    assert change == pytest.approx(a["change"], abs=1e-4)
    # a scope the user gives is the only one tried
    given = fit_method(lm, "caa", PAIRS, auto=True, budget=5.0, recipe="last", scope="last",
                       objective="teacher")
    assert {p["scope"] for p in given.fit_info["auto"]["points"]} == {"last"}
    assert given.scope == "last"


def test_the_objective_follows_the_data() -> None:
    ab = ContrastiveSet([ContrastivePair(f"Question {i}? (A) yes (B) no", "(A", "(B")
                         for i in range(4)], name="ab")
    labelled = LabeledSet([LabeledText("good day", 1), LabeledText("bad day", 0)], name="l")
    assert resolve_objective("auto", PAIRS, None) == "generate"
    assert resolve_objective("auto", PAIRS, "ab") == "teacher"
    assert resolve_objective("auto", ab, None) == "teacher"
    assert resolve_objective("auto", labelled, None) == "teacher"
    assert resolve_objective("teacher", PAIRS, None) == "teacher"
    for data, recipe in ((ab, None), (labelled, None), (PAIRS, "ab")):
        with pytest.raises(DataError, match="generate objective needs"):
            resolve_objective("generate", data, recipe)
    with pytest.raises(DataError, match="unknown --auto objective"):
        resolve_objective("sampled", PAIRS, None)


def test_generate_objective_chooses_the_best_admissible_generation_and_records_it() -> None:
    lm = tiny_model("llama", chat=True)
    c = fit_method(lm, "caa", PAIRS, auto=True, budget=5.0)
    a = c.fit_info["auto"]
    assert (a["objective"], a["fluency_metric"], a["budget"]) == ("generate", "ppl_ratio", 5.0)
    assert {p["scope"] for p in a["points"]} == {"from:-1", "all"}
    admissible = [p for p in a["points"] if p["ppl_ratio"] is not None and p["ppl_ratio"] <= 5.0
                  and p["degenerate"] == 0 and p["strength"] > 0]
    top = max(admissible, key=lambda p: p["change"])
    assert (a["layer"], a["scope"], a["strength"], a["change"], a["fluency"]) == (
        top["layer"], top["scope"], top["strength"], top["change"], top["ppl_ratio"])
    # each (block, scope, sign) ladder stops at its first inadmissible point
    for key in {(p["layer"], p["scope"], p["strength"] > 0) for p in a["points"]}:
        ladder = [p for p in a["points"] if (p["layer"], p["scope"], p["strength"] > 0) == key]
        ok = [p["ppl_ratio"] is not None and p["ppl_ratio"] <= 5.0 and p["degenerate"] == 0
              for p in ladder]
        assert all(ok[:-1])
    # the recorded point is what greedy generation under the returned controller gives
    train, val = validation_split(PAIRS, 0.2, 0)
    again = _GenerationScorer(lm, train, val, 32, 8).point(Steer(c, a["strength"]))
    assert again["change"] == pytest.approx(a["change"], abs=1e-4)
    assert again["ppl_ratio"] == pytest.approx(a["fluency"], rel=1e-4)
    assert c.scope == a["scope"] and a["val_rows"] == len(val)


def test_contrast_judge_reads_the_side_of_real_sentences() -> None:
    from steerlab.evals.judges import ContrastJudge

    judge = ContrastJudge(
        ["I loved the trip; the weather was glorious and everyone was kind.",
         "What a wonderful meal, I am delighted."],
        ["I hated the trip; the weather was awful and everyone was rude.",
         "What a dreadful meal, I am disgusted."])
    up, down, _ = judge.lean(["It was a delightful, happy day and I enjoyed every minute.",
                              "It was a miserable, horrible day and I regretted every minute.",
                              "The train leaves at nine."])
    assert up > 0 > down
    assert judge.lean([]) == []
    with pytest.raises(DataError):
        judge.lean("one string")
    with pytest.raises(DataError):
        ContrastJudge([], ["x"])


def test_cli_refuses_an_unknown_objective_in_one_line(tmp_path: Path) -> None:
    folder = save_tiny_model("llama", 0, tmp_path / "m")
    r = CliRunner().invoke(app, ["fit", "--model", str(folder), "--method", "caa", "--data",
                                 "sentiment", "--auto", "--objective", "sampled", "--out",
                                 str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "unknown --objective" in r.output
    assert len(r.output.strip().splitlines()) == 1
