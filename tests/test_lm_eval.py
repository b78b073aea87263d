"""lm-evaluation-harness (the real package) against steerlab: the in-process ``steerlab``
model (``python -m steerlab.lm_eval --model steerlab``) on local YAML tasks over local JSON
(lm-eval's stock tasks download from a hub, which is not reachable here)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from lm_eval_tasks import write_tasks  # noqa: E402
from steerlab import artifacts  # noqa: E402
from steerlab.methods import CAA  # noqa: E402
from steerlab.models import load_model  # noqa: E402
from steerlab.sites import Site  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")



@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("lm-eval")
    folder = save_tiny_model("llama", 0, d / "model")
    write_tasks(d, "sl")
    lm = load_model(str(folder))
    caa = CAA(layers=1, scope="all")
    g = torch.Generator().manual_seed(0)
    caa.set_vectors({Site("resid_post", 1): torch.randn(lm.info.hidden_size, generator=g) * 4})
    caa.model_info = lm.info
    art = artifacts.save(caa, d / "caa.safetensors")
    return {"dir": d, "folder": folder, "art": art, "lm": lm}


def _evaluate(setup: dict[str, Any], model_args: str) -> dict[str, Any]:
    import steerlab.lm_eval  # noqa: F401  (registers the "steerlab" model)

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return lm_eval.simple_evaluate(
        model="steerlab", model_args=model_args, tasks=["sl_mc", "sl_gen"], limit=5,
        task_manager=TaskManager(include_path=str(setup["dir"] / "tasks")), log_samples=True)


def _loglikelihoods(result: dict[str, Any]) -> list[float]:
    return [resp[0][0] for s in result["samples"]["sl_mc"] for resp in s["resps"]]


def test_in_process_model_steered_and_unsteered(setup: dict[str, Any]) -> None:
    """A loglikelihood task and a generate_until task with --limit 5: steering changes the
    scores, and the unsteered log-likelihoods equal transformers' own to 1e-4."""
    plain = _evaluate(setup, f"model={setup['folder']}")
    steered = _evaluate(setup, f"model={setup['folder']},steer={setup['art']},strength=2,"
                               f"scope=all")
    for r in (plain, steered):
        assert r["results"]["sl_mc"]["sample_len"] == 5
        assert "exact_match,none" in r["results"]["sl_gen"]
    a, b = _loglikelihoods(plain), _loglikelihoods(steered)
    assert len(a) == 10 and max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-2
    gens_plain = [s["resps"] for s in plain["samples"]["sl_gen"]]
    gens_steer = [s["resps"] for s in steered["samples"]["sl_gen"]]
    assert gens_plain != gens_steer
    # transformers' own: log p(" great" / " awful" | question), HFLM's tokenisation
    lm = setup["lm"]
    tok, model = lm.tokenizer, lm.model
    want = []
    for s in plain["samples"]["sl_mc"]:
        for arg in s["arguments"]:
            context, continuation = arg[0], arg[1]
            ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx_ids):]
            ids = torch.tensor([ctx_ids + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
            want.append(float(sum(logp[len(ctx_ids) - 1 + i, t] for i, t in enumerate(cont))))
    assert max(abs(x - y) for x, y in zip(a, want, strict=True)) < 1e-4


def test_the_lm_eval_command_line_runs_the_steerlab_model(setup: dict[str, Any]) -> None:
    """``python -m steerlab.lm_eval`` is lm-eval's own CLI with the model registered."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    out = setup["dir"] / "out"
    r = subprocess.run(
        [sys.executable, "-m", "steerlab.lm_eval", "--model", "steerlab", "--model_args",
         f"model={setup['folder']},steer={setup['art']},strength=2,scope=all", "--tasks",
         "sl_mc", "--include_path", str(setup["dir"] / "tasks"), "--limit", "5",
         "--output_path", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sl_mc" in r.stdout and "acc" in r.stdout
