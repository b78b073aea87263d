"""Reports: the equal-fluency comparison on hand-made cells, Pareto fronts, and the files
(report.json, report.md, PNGs it references) from hand-made cells and from a real sweep."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from steerlab.evals.report import aggregate, compare_table, pareto_front, write_report
from steerlab.evals.sweep import SweepResults, cell_id


def cell(method: str | None, layer: int | None, strength: float, value: float | None,
         kl: float | None, *, fold: int = 0, status: str = "ok", ppl: float = 10.0,
         task: str = "t") -> dict[str, Any]:
    c: dict[str, Any] = {
        "cell": cell_id(task, fold, method, layer, strength), "task": task,
        "kind": "behaviour", "primary": "match", "fold": fold, "method": method,
        "label": method, "layer": layer, "strength": strength, "status": status,
        "kl": kl, "fit_seconds": 0.5 if method else None, "eval_seconds": 0.1,
    }
    if status == "ok":
        c.update(metrics={"match": value, "ppl": ppl}, primary_value=value)
    else:
        c["error"] = {"stage": "evaluate", "type": "RuntimeError", "message": "boom | bad"}
    return c


def hand_made() -> list[dict[str, Any]]:
    return [
        cell(None, None, 0.0, 0.5, 0.0),
        cell("a", 0, 1.0, 0.6, 0.1),
        cell("a", 0, 2.0, 0.8, 0.5, ppl=30.0),
        cell("a", 1, 1.0, 0.7, 0.2),
        cell("a", 1, 2.0, 0.75, 0.9),
        cell("b", 0, 1.0, 0.55, 0.05),
        cell("b", 0, 4.0, 0.9, 2.0),
        cell("b", 1, 1.0, 0.2, 0.04),
        cell("b", 1, 4.0, None, None, status="failed"),
    ]


def test_compare_table_picks_the_best_cell_within_the_budget() -> None:
    cells = hand_made()
    t = compare_table(cells, "kl", 0.3)["t"]
    assert t["a"] is not None and t["b"] is not None
    assert (t["a"]["layer"], t["a"]["strength"]) == (1, 1.0)
    assert t["a"]["delta"] == pytest.approx(0.2)
    assert (t["b"]["layer"], t["b"]["strength"], t["b"]["delta"]) == (0, 1.0, pytest.approx(0.05))
    free = compare_table(cells, "kl", math.inf)["t"]
    assert free["a"] is not None and free["a"]["delta"] == pytest.approx(0.3)
    assert free["b"] is not None and free["b"]["strength"] == 4.0
    assert compare_table(cells, "kl", 0.01)["t"] == {"a": None, "b": None}
    # lowering the metric is the goal: b at layer 1 lowers it most
    down = compare_table(cells, "kl", 0.3, direction=-1)["t"]["b"]
    assert down is not None and (down["layer"], down["delta"]) == (1, pytest.approx(-0.3))
    # a task metric as the budget: ppl <= 20 rules out a's strength 2 at layer 0
    by_ppl = compare_table(cells, "ppl", 20.0)["t"]["a"]
    assert by_ppl is not None and (by_ppl["layer"], by_ppl["strength"]) == (1, 2.0)
    # two folds: a row counts only when every fold finished
    two = [*cells, cell(None, None, 0.0, 0.4, 0.0, fold=1), cell("a", 1, 1.0, 0.6, 0.2, fold=1),
           cell("a", 0, 1.0, None, None, fold=1, status="failed")]
    rows = {(r["label"], r["layer"], r["strength"]): r for r in aggregate(two)["t"]["rows"]}
    assert rows[("a", 1, 1.0)]["complete"] and rows[("a", 1, 1.0)]["delta"] == \
        pytest.approx(0.2)  # (0.2 + 0.2) / 2
    assert not rows[("a", 0, 1.0)]["complete"] and rows[("a", 0, 1.0)]["delta"] is None


def test_pareto_front() -> None:
    pts = [(0.0, 0.0), (0.1, 0.1), (0.2, 0.05), (0.3, 0.4), (0.3, 0.2), (1.0, 0.4), (2.0, 0.5)]
    assert pareto_front(pts) == [0, 1, 3, 6]


def referenced_images(md: str, root: Path) -> list[Path]:
    return [root / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)]


def test_report_files_tables_plots_and_failures(tmp_path: Path) -> None:
    res = SweepResults(hand_made(), spec={"model": {"model_id": "tiny"}})
    md_path = write_report(res, tmp_path / "rep", title="Toy report", budget=0.3)
    assert md_path == tmp_path / "rep" / "report.md"
    md = md_path.read_text()
    images = referenced_images(md, md_path.parent)
    assert {p.name for p in images} == {"t_strength.png", "t_pareto.png", "t_layers.png"}
    for p in images:
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.startswith("# Toy report") and "`tiny`" in md
    assert "| t | +0.2 (L1, s=1, cost 0.2) | +0.05 (L0, s=1, cost 0.05) |" in md
    assert "RuntimeError: boom \\| bad" in md and "Failures (1)" in md
    assert "| a | 1 | 1 | 0.7 | +0.2 | 0.2 | 10 |" in md  # ppl column
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["budget"] == 0.3 and doc["failed"] == 1 and doc["cells"] == 9
    t = doc["tasks"]["t"]
    assert t["baseline"] == 0.5 and len(t["rows"]) == 8
    assert t["chosen"]["a"] == {"layer": 1, "strength": 1.0, "within_budget": True}
    front = [(p["label"], p["layer"], p["strength"]) for p in t["pareto"]]
    assert front[0] == ("unsteered", None, 0.0) and ("b", 0, 4.0) in front
    assert ("a", 1, 2.0) not in front  # dominated by a at layer 0, strength 2
    # the budget by default: the median cost, stated
    md2 = write_report(hand_made(), tmp_path / "auto").read_text()
    assert "the median cost of all cells" in md2
    # nothing usable: still a report, no dangling image links
    md3 = write_report([cell(None, None, 0.0, None, None, status="failed")],
                       tmp_path / "empty").read_text()
    assert referenced_images(md3, tmp_path / "empty") == [] and "Failures (1)" in md3


def test_report_of_a_real_sweep_folder(tmp_path: Path) -> None:
    from tests.test_sweep import TEXTS, ToyAB, lm

    from steerlab.evals.sweep import SweepSpec, run_sweep

    spec = SweepSpec(methods=["caa", "probe", "nope"], layers=[0, 1], strengths=[1.0, 3.0],
                     tasks=[ToyAB()], fluency_texts=TEXTS)
    run_sweep(lm(), spec, tmp_path / "sweep", progress=False)
    md_path = write_report(tmp_path / "sweep", tmp_path / "sweep", title="Tiny sweep",
                           budget=math.inf)
    md = md_path.read_text()
    images = referenced_images(md, md_path.parent)
    assert len(images) == 3 and all(p.is_file() for p in images)
    assert "tiny-llama-0" in md
    # the unknown method's cells are one line: where, stage, error with the known methods
    assert re.search(r"- \*\*nope\*\* \(4 cells: layers 0, 1; strengths 1, 3; folds 0\): "
                     r"fit failed with SteeringError: unknown method 'nope'; known: .*caa", md)
    doc = json.loads((tmp_path / "sweep" / "report.json").read_text())
    rows = doc["tasks"]["toy_ab"]["rows"]
    assert len(rows) == 12 and sum(r["complete"] for r in rows) == 8
    assert doc["compare"]["toy_ab"]["nope"] is None
    assert set(doc["compare"]["toy_ab"]) == {"caa", "probe", "nope"}
    assert doc["compare"]["toy_ab"]["caa"]["delta"] > 0
