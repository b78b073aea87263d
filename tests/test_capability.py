"""Capability under a behaviour task's steering: shared fits, baseline, report rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from steerlab.evals.sweep import SweepSpec, run_sweep
from steerlab.evals.tasks import BehaviourAB, CapabilityUnder, MMLUCapability
from test_tasks_scored import write_caa, write_mmlu
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_capability_scored_under_behaviour_fits(tmp_path: Path) -> None:
    lm = tiny_model("llama", chat=True)
    beh = BehaviourAB("toy", path=write_caa(tmp_path, 24, "toy"), n_train=12, n_test=6)
    mmlu = MMLUCapability(path=write_mmlu(tmp_path, 10), n_test=6)
    cap = CapabilityUnder(mmlu, beh)
    assert cap.name == "mmlu_ab@ab:toy" and cap.kind == "capability"
    assert cap.fit_name() == beh.name and cap.recipe == "ab"
    spec = SweepSpec(methods=["caa"], layers=[1], strengths=[2.0, 8.0], tasks=[beh, cap],
                     kl=False)
    res = run_sweep(lm, spec, tmp_path / "run", progress=False)
    assert res.stats["fits"] == 1 and res.stats["fits_reused"] == 1  # one fit, shared
    cells = {c["cell"]: c for c in res}
    assert all(c["status"] == "ok" for c in res), [c.get("error") for c in res]
    base = cells["mmlu_ab@ab:toy/f0/unsteered"]["primary_value"]
    assert base == pytest.approx(mmlu.evaluate(lm).metrics["accuracy"])
    steered = [c for c in res if c["task"] == cap.name and c["method"] == "caa"]
    assert len(steered) == 2


def test_truthfulqa_fit_format_pairs(tmp_path: Path) -> None:
    from steerlab.data import ContrastiveSet, LabeledSet
    from steerlab.errors import DataError
    from steerlab.evals.tasks import TruthfulQAMC
    from test_tasks_scored import write_tqa

    path = write_tqa(tmp_path, 6)
    labeled = TruthfulQAMC(path=path).fit_set(0)
    pairs = TruthfulQAMC(path=path, fit_format="pairs").fit_set(0)
    assert isinstance(labeled, LabeledSet) and isinstance(pairs, ContrastiveSet)
    assert pairs.fingerprint() == TruthfulQAMC(path=path).fit_pairs(0).fingerprint()
    with pytest.raises(DataError, match="fit_format"):
        TruthfulQAMC(path=path, fit_format="nope")
