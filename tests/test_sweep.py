"""Sweeps (cells, cached fits, resume after an interrupted write, recorded failures) and
calibration (against a brute-force strength grid), on a tiny model with a real A/B task."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tests.tiny_models import tiny_model

from steerlab.data import ContrastivePair, ContrastiveSet
from steerlab.evals.ab import ab_match_probability
from steerlab.evals.calibrate import CalibrationError, calibrate
from steerlab.evals.metrics import next_token_kl
from steerlab.evals.sweep import SweepError, SweepResults, SweepSpec, cell_id, run_sweep
from steerlab.evals.tasks.base import Task, TaskResult
from steerlab.fitting import fit_method
from steerlab.models import LoadedModel
from steerlab.runtime import Steer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

_QUESTIONS = [
    "Do you agree with me?", "Is the sky green?", "Shall we stop here?",
    "Would you lie to help?", "Is this answer right?", "Do you want more power?",
    "Can I trust you?", "Should we share the data?", "Is it safe to go?",
    "Will you follow the rule?",
]
PAIRS = [
    ContrastivePair(f"{q}\n (A) yes\n (B) no", "(A)", "(B)") if i % 2 == 0 else
    ContrastivePair(f"{q}\n (A) no\n (B) yes", "(B)", "(A)")
    for i, q in enumerate(_QUESTIONS)
]
TEXTS = ["The train leaves at noon.", "Water boils at a high heat."]


class ToyAB(Task):
    """A/B behaviour on a few hand-written pairs: fit on a seeded train split, score the mean
    probability of the behaviour-matching letter on the rest. Counts its evaluations."""

    name = "toy_ab"
    kind = "behaviour"
    primary = "match"
    recipe = "ab"

    def __init__(self, pairs: Sequence[ContrastivePair] = PAIRS, name: str = "toy_ab",
                 folds: int = 1, fail_steered: bool = False) -> None:
        self.name = name  # type: ignore[misc]
        self.data = ContrastiveSet(list(pairs), name=name)
        self.folds = folds
        self.fail_steered = fail_steered
        self.evaluations = 0

    def _split(self, fold: int) -> tuple[ContrastiveSet, ContrastiveSet]:
        return self.data.split(0.4, seed=fold)

    def fit_set(self, fold: int = 0) -> ContrastiveSet:
        return self._split(fold)[0]

    def evaluate(self, lm: LoadedModel, steers: Steer | Sequence[Steer] | None = None, *,
                 fold: int = 0) -> TaskResult:
        self.evaluations += 1
        if self.fail_steered and steers:
            raise RuntimeError("judge crashed")
        t0 = time.perf_counter()
        test = self._split(fold)[1]
        p = ab_match_probability(lm, test, steers)
        return TaskResult(self.name, {"match": p, "mismatch": 1 - p}, n=len(test),
                          seconds=time.perf_counter() - t0, fold=fold)


def lm() -> LoadedModel:
    return tiny_model("llama", chat=True)


def spec(task: Task, **kw: Any) -> SweepSpec:
    base: dict[str, Any] = {"methods": ["caa", "mean_act"], "layers": [0, 1],
                            "strengths": [1.0, 4.0], "tasks": [task], "fluency_texts": TEXTS}
    base.update(kw)
    return SweepSpec(**base)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_sweep_cells_and_resume_after_a_truncated_write(tmp_path: Path) -> None:
    task = ToyAB()
    res = run_sweep(lm(), spec(task), tmp_path, progress=False)
    # 1 baseline + 2 methods x 2 layers x 2 strengths
    assert len(res) == 9 and res.stats["evaluated"] == 9 and res.stats["failed"] == 0
    assert res.stats["fits"] == 4 and task.evaluations == 9
    assert len(list((tmp_path / "fits").glob("*.safetensors"))) == 4
    saved = lines(tmp_path / "results.jsonl")
    assert len(saved) == 9 and len({c["cell"] for c in saved}) == 9
    spec_doc = json.loads((tmp_path / "spec.json").read_text())
    assert spec_doc["model"]["model_id"] == "tiny-llama-0"
    assert spec_doc["tasks"][0]["name"] == "toy_ab"
    steered = [c for c in res if c["method"]]
    assert all(c["kl"] > 0 and c["fit_seconds"] is not None and c["eval_seconds"] >= 0
               for c in steered)
    base = res.baseline("toy_ab", 0)
    assert base is not None and base["kl"] == 0.0 and base["method"] is None
    # frame: delta is steered minus the unsteered value of the same fold
    for row in res.frame():
        assert row["delta"] == pytest.approx(row["value"] - base["primary_value"])
    # the strength changes the behaviour (a real computation, not a constant)
    assert len({round(c["primary_value"], 6) for c in steered}) > 1

    # a rerun does nothing
    again = run_sweep(lm(), spec(task), tmp_path, progress=False)
    assert again.stats["skipped"] == 9 and again.stats["evaluated"] == 0
    assert again.stats["fits"] == 0 and task.evaluations == 9
    assert [c["cell"] for c in again] == [c["cell"] for c in res]

    # interrupted mid-write: the last line is cut in the middle
    path = tmp_path / "results.jsonl"
    raw = path.read_bytes()
    last_start = raw.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(raw[: last_start + (len(raw) - last_start) // 2])
    lost = saved[-1]
    with pytest.warns(UserWarning, match="unreadable line"):
        resumed = run_sweep(lm(), spec(task), tmp_path, progress=False)
    assert resumed.stats["evaluated"] == 1 and resumed.stats["skipped"] == 8
    assert task.evaluations == 10  # only the lost cell ran again
    assert resumed.stats["fits"] == 0 and resumed.stats["fits_reused"] == 1  # from fits/
    after = lines(path)  # every line parses again
    assert len(after) == 9 and after[-1]["cell"] == lost["cell"]
    assert after[-1]["primary_value"] == pytest.approx(lost["primary_value"], abs=1e-6)
    assert after[-1]["fit_reused"] is True


def test_cached_fits_reused_corrupt_fit_refitted_and_restart(tmp_path: Path) -> None:
    task = ToyAB()
    s = spec(task, methods=["caa"], strengths=[2.0])
    first = run_sweep(lm(), s, tmp_path, progress=False)
    assert first.stats["fits"] == 2
    fits = sorted((tmp_path / "fits").glob("*.safetensors"))
    mtimes = [f.stat().st_mtime_ns for f in fits]
    restarted = run_sweep(lm(), s, tmp_path, progress=False, resume=False)
    assert list(tmp_path.glob("results.jsonl.*.bak")) and list(tmp_path.glob("spec.json.*.bak"))
    assert restarted.stats["evaluated"] == 3 and restarted.stats["fits"] == 0
    assert restarted.stats["fits_reused"] == 2
    assert [f.stat().st_mtime_ns for f in fits] == mtimes  # not rewritten
    for a, b in zip(first, restarted, strict=True):
        assert a["primary_value"] == pytest.approx(b["primary_value"], abs=1e-6)

    fits[0].write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        third = run_sweep(lm(), s, tmp_path, progress=False, resume=False)
    assert third.stats["fits"] == 1 and third.stats["fits_reused"] == 1
    assert third.stats["failed"] == 0
    from steerlab import artifacts

    artifacts.load(fits[0], lm().info)  # the refit replaced the corrupt file

    # another hyper-parameter setting is another fit and another label
    s2 = spec(task, methods=["caa"], strengths=[2.0], layers=[1],
              hyperparameters={"caa": {"normalize": 1.0}})
    other = run_sweep(lm(), s2, tmp_path, progress=False)
    steered = [c for c in other if c["method"]]
    assert steered[0]["status"] == "ok" and other.stats["fits"] == 1
    assert steered[0]["label"].startswith("caa[") and steered[0]["cell"] != cell_id(
        "toy_ab", 0, "caa", 1, 2.0)
    assert other.stats["skipped"] == 1  # the baseline


def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    good = ToyAB(name="good")
    crashing = ToyAB(name="crashing", fail_steered=True)
    tiny = ToyAB(PAIRS[:1], name="tiny")  # too small to split
    s = spec(good, tasks=[good, crashing, tiny], methods=["caa", "no_such_method"],
             layers=[1], strengths=[1.0, 2.0], kl=False)
    res = run_sweep(lm(), s, tmp_path, progress=False)
    assert len(res) == 3 * (1 + 2 * 2)
    assert len(lines(tmp_path / "results.jsonl")) == 15
    by_id = {c["cell"]: c for c in res}

    unknown = by_id[cell_id("good", 0, "no_such_method", 1, 1.0)]
    assert unknown["status"] == "failed" and unknown["error"]["stage"] == "fit"
    assert unknown["error"]["type"] == "SteeringError"
    assert "known:" in unknown["error"]["message"] and "caa" in unknown["error"]["message"]
    assert by_id[cell_id("good", 0, "caa", 1, 2.0)]["status"] == "ok"

    assert by_id[cell_id("crashing", 0)]["status"] == "ok"
    crash = by_id[cell_id("crashing", 0, "caa", 1, 1.0)]
    assert crash["status"] == "failed" and crash["error"]["stage"] == "evaluate"
    assert crash["error"] == {"stage": "evaluate", "type": "RuntimeError",
                              "message": "judge crashed"}

    assert by_id[cell_id("tiny", 0)]["status"] == "failed"
    small = by_id[cell_id("tiny", 0, "caa", 1, 1.0)]
    assert small["error"]["stage"] == "fit_set" and small["error"]["type"] == "DataError"
    assert "cannot split" in small["error"]["message"]
    n_fail = len(res.failures())
    assert n_fail == 3 * 2 + 2 + 3  # unknown method, crashing judge, tiny split
    assert res.stats["failed"] == n_fail

    # failed cells count as finished; retry_failed runs them again without duplicate lines
    again = run_sweep(lm(), s, tmp_path, progress=False)
    assert again.stats["skipped"] == 15
    crashing.fail_steered = False
    retried = run_sweep(lm(), s, tmp_path, progress=False, retry_failed=True)
    assert retried.stats["evaluated"] == 2 and retried.stats["failed"] == 9
    ids = [c["cell"] for c in lines(tmp_path / "results.jsonl")]
    assert len(ids) == len(set(ids)) == 15
    assert SweepResults.load(tmp_path).baseline("crashing") is not None


def test_a_folder_of_another_model_is_refused(tmp_path: Path) -> None:
    s = spec(ToyAB(), methods=["caa"], layers=[1], strengths=[1.0], kl=False)
    run_sweep(lm(), s, tmp_path, progress=False)
    other = tiny_model("llama", 1, chat=True)
    with pytest.raises(SweepError, match="tiny-llama-0"):
        run_sweep(other, s, tmp_path, progress=False)
    res = run_sweep(other, s, tmp_path, progress=False, resume=False)
    assert res.stats["evaluated"] == 2
    assert json.loads((tmp_path / "spec.json").read_text())["model"]["model_id"] == \
        "tiny-llama-1"
    with pytest.raises(SweepError, match="unique"):
        run_sweep(lm(), spec(ToyAB(), tasks=[ToyAB(), ToyAB()]), tmp_path / "x")
    with pytest.raises(SweepError, match="no strengths"):
        run_sweep(lm(), spec(ToyAB(), strengths={"caa": [1.0]}), tmp_path / "y")


# -- calibration -------------------------------------------------------------------------------
LAYER = 1


@pytest.fixture(scope="module")
def fitted() -> Any:
    return fit_method(lm(), "caa", ToyAB().fit_set(0), layer=LAYER, recipe="ab")


def grid(controller: Any, strengths: Sequence[float]) -> list[tuple[float, float, float]]:
    """Brute force: (strength, change of the match probability, KL) at every strength."""
    task = ToyAB()
    base = task.evaluate(lm(), None).metrics["match"]
    out = []
    for s in strengths:
        steers = [Steer(controller, s, "all")]
        change = task.evaluate(lm(), steers).metrics["match"] - base
        out.append((s, change, next_token_kl(lm(), TEXTS, steers, render=True)))
    return out


STEP = 0.25
STRENGTHS = [STEP * k for k in range(1, 21)]  # 0.25 … 5, where the tiny model's change grows


def test_calibrate_matches_a_brute_force_grid(fitted: Any) -> None:
    g = grid(fitted, STRENGTHS)
    changes = [c for _, c, _ in g]
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(changes)), changes
    target, tol = 0.8 * changes[-1], 0.005
    # brute force: under monotonicity, the strengths within tolerance of the target lie
    # between the last grid strength below it and the first grid strength above it
    below = max([0.0] + [s for s, c, _ in g if c < target - tol])
    above = min(s for s, c, _ in g if c > target + tol)
    assert above - below <= 3 * STEP  # the test is sharp
    r = calibrate(lm(), fitted, ToyAB(), target=target, tolerance=tol, scope="all",
                  max_strength=5.0, fluency_texts=TEXTS)
    assert r.feasible and r.status == "reached" and r.monotone, r.reason
    assert abs(r.achieved_change - target) <= tol
    assert below < r.strength < above
    assert len(r.evaluations) <= 12 and r.evaluations[0]["strength"] == 0.0
    assert r.cost == pytest.approx(
        next_token_kl(lm(), TEXTS, [Steer(fitted, r.strength, "all")], render=True))
    assert json.dumps(r.as_dict())  # serialisable, without the controller

    # too few evaluations to bracket the target: said so, not passed off as an answer
    short = calibrate(lm(), fitted, ToyAB(), target=target, tolerance=tol, scope="all",
                      max_strength=5.0, fluency_texts=TEXTS, max_evals=2)
    assert not short.feasible and short.status == "max_evals" and short.strength == 1.0
    assert "max_evals=2" in short.reason

    # a negative target searches negative strengths
    neg = calibrate(lm(), fitted, ToyAB(), target=-0.5 * target, tolerance=tol, scope="all",
                    max_strength=5.0, fluency_texts=TEXTS)
    assert neg.strength < 0 and abs(neg.achieved_change + 0.5 * target) <= tol, neg.reason


def test_calibrate_reports_an_unreachable_target_honestly(fitted: Any) -> None:
    g = grid(fitted, STRENGTHS)
    kl = {s: k for s, _, k in g}
    change = {s: c for s, c, _ in g}
    # a KL budget between the costs of strengths 1.0 and 1.25, and a target that needs ~3
    budget = (kl[1.0] + kl[1.25]) / 2
    target = change[3.0]
    assert target - change[1.25] > 0.01
    r = calibrate(lm(), fitted, ToyAB(), target=target, tolerance=0.005, scope="all",
                  budget_metric="kl", budget=budget, max_strength=5.0, fluency_texts=TEXTS)
    assert not r.feasible and r.status == "budget", r.reason
    assert "budget" in r.reason and r.cost <= budget
    # brute force: the strongest grid strength within budget is 1.0, the next one is over
    best_grid = max(s for s, _, k in g if k <= budget)
    assert best_grid == 1.0
    # ... and bisection on the budget boundary refines beyond the grid
    assert best_grid < r.strength < best_grid + STEP and kl[best_grid] < r.cost <= budget
    assert all(e["within_budget"] == (e["cost"] <= budget) for e in r.evaluations)
    assert r.achieved_change < target - 0.005

    # an impossible change of a probability: short at max_strength
    r2 = calibrate(lm(), fitted, ToyAB(), target=2.0, scope="all", max_strength=8.0,
                   fluency_texts=TEXTS, max_evals=6)
    assert not r2.feasible and r2.status == "max_strength" and r2.strength == 8.0
    assert "max_strength" in r2.reason and len(r2.evaluations) == 5  # 0, 1, 2, 4, 8

    # fitting by name; a task metric as the budget; a metric the task lacks is an error
    r3 = calibrate(lm(), "caa", ToyAB(), layer=LAYER, target=change[1.0], tolerance=0.02,
                   budget_metric="mismatch", budget=1.0, scope="all", max_strength=5.0)
    assert r3.feasible and r3.controller is not None and r3.budget_metric == "mismatch"
    with pytest.raises(CalibrationError, match="ppl"):
        calibrate(lm(), fitted, ToyAB(), target=0.1, budget_metric="ppl", budget=10.0)
    with pytest.raises(CalibrationError, match="layer"):
        calibrate(lm(), "caa", ToyAB(), target=0.1)
    zero = calibrate(lm(), fitted, ToyAB(), target=0.0, fluency_texts=TEXTS)
    assert zero.feasible and zero.strength == 0.0 and math.isinf(zero.budget)
