"""steerlab eval / sweep / compare / calibrate on a tiny model saved to a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steerlab.cli import app
from tiny_models import save_tiny_model

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("torch_single_thread")
SMALL = ["--n-test", "3", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", 3, tmp_path_factory.mktemp("tiny-llama"))


def test_sweep_resume_compare_and_report(folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["sweep", "--model", str(folder), "--out", str(run), "--method", "caa",
            "--method", "probe", "--method", "no_such_method", "--task", "sentiment",
            "--layer", "0", "--layer", "1", "--strength", "1", "--strength", "4", *SMALL]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    cells = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    ok = [c for c in cells if c["status"] == "ok"]
    failed = [c for c in cells if c["status"] == "failed"]
    assert len(ok) == 1 + 2 * 2 * 2  # unsteered + 2 methods x 2 layers x 2 strengths
    assert failed and all("no_such_method" in c["method"] for c in failed)
    report = (run / "report.md").read_text()
    assert "no_such_method" in report and "figures/" in report
    # a rerun does nothing new
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert len((run / "results.jsonl").read_text().splitlines()) == len(cells)
    r = runner.invoke(app, ["compare", str(run), "--budget", "1000"])
    assert r.exit_code == 0, r.output
    assert "caa" in r.output and "probe" in r.output


def test_eval_artifact_and_calibrate(folder: Path, tmp_path: Path) -> None:
    art = tmp_path / "caa.safetensors"
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "caa", "--layers", "1",
                            "--out", str(art)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "eval.json"
    r = runner.invoke(app, ["eval", str(art), "--model", str(folder), "--task", "sentiment",
                            "--strength", "2", "--json", str(out), *SMALL])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert [x["artifact"] is None for x in rows] == [True, False]
    assert rows[1]["kl"] > 0
    saved = tmp_path / "cal.safetensors"
    r = runner.invoke(app, ["calibrate", "--model", str(folder), "--method", "caa", "--layer",
                            "1", "--task", "sentiment", "--target", "0.05", "--budget", "5",
                            "--max-evals", "4", "--save", str(saved), *SMALL])
    assert r.exit_code == 0, r.output
    assert "strength" in r.output and saved.is_file()


def test_bad_task_and_hp_fail_clearly(folder: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["sweep", "--model", str(folder), "--out", str(tmp_path / "x"),
                            "--method", "caa", "--task", "nope", "--layer", "0",
                            "--strength", "1"])
    assert r.exit_code == 2 and "unknown task" in r.output
    r = runner.invoke(app, ["sweep", "--model", str(folder), "--out", str(tmp_path / "y"),
                            "--method", "caa", "--task", "sentiment", "--layer", "0",
                            "--strength", "1", "--hp", "bad"])
    assert r.exit_code == 2 and "METHOD.NAME=VALUE" in r.output
