"""docs/adding-a-method.md, checked: its toy method (docs/examples/toy_clamp.py) goes through
exactly the guide's steps on a tiny random model.

The guide cannot rot: its one full code block is the example file, every other Python block
is an excerpt of this file, its ``pyproject.toml`` block is the entry point the
subprocesses use, and its ``steerlab fit`` / ``steerlab serve`` lines are the commands run
here (with the guide's file names replaced by temporary ones). In this process the method is
registered with ``register``; the CLI and the server run as subprocesses, which find it
through the entry point (a ``.dist-info`` folder written here, as ``pip install`` would).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from steerlab import artifacts
from steerlab.data import load_dataset
from steerlab.fitting import fit_method
from steerlab.methods import METHODS, Controller
from steerlab.methods.base import StepContext
from steerlab.models import LoadedModel, load_model
from steerlab.runtime import Steer, generate, steering, tokenize_prompts
from steerlab.sites import Site
from tiny_models import save_tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "adding-a-method.md"
EXAMPLE = ROOT / "docs" / "examples" / "toy_clamp.py"
PROMPT = "Tell me about the day."
PAIRS = [
    {"prompt": f"Tell me about day {i}.", "positive": f"It was wonderful and happy {i}.",
     "negative": f"It was awful and sad {i}."} for i in range(8)
]


def blocks(language: str) -> list[str]:
    """The guide's fenced code blocks in ``language``."""
    return re.findall(rf"^```{language}\n(.*?)^```$", GUIDE.read_text(), re.S | re.M)


# -- the guide is this file and the example ------------------------------------------------------
def test_the_guides_code_is_the_example_file_and_excerpts_of_this_test() -> None:
    example = EXAMPLE.read_text()
    python = blocks("python")
    assert python.count(example) == 1, "the guide must show docs/examples/toy_clamp.py as is"
    source = Path(__file__).read_text()
    for block in python:
        if block != example:
            assert any(textwrap.indent(block, " " * n) in source for n in range(0, 17, 4)), block
    assert len(blocks("toml")) == 1 and len(blocks("bash")) >= 1


@pytest.fixture(scope="module")
def toy() -> Iterator[type[Controller]]:
    """The guide's registration, in this process (removed afterwards: other tests check
    that every registered method has a golden artifact)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLE.parent))
        from toy_clamp import ToyClamp

        from steerlab.methods import register

        register(ToyClamp)
        try:
            yield ToyClamp
        finally:
            METHODS.pop(ToyClamp.method, None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", 7, tmp_path_factory.mktemp("my-model"))


@pytest.fixture(scope="module")
def lm(folder: Path) -> LoadedModel:
    return load_model(str(folder))  # the weights the subprocesses load


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    return path


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A subprocess environment in which the guide's package is installed: its entry point
    (from the guide's pyproject.toml block) in a .dist-info folder, the file on the path."""
    project = tomllib.loads(blocks("toml")[0])["project"]
    site = tmp_path_factory.mktemp("site-packages")
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                   f"Version: {project['version']}\n")
    points = project["entry-points"]["steerlab.methods"]
    (info / "entry_points.txt").write_text(
        "[steerlab.methods]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    path = [str(site), str(EXAMPLE.parent), os.environ.get("PYTHONPATH", "")]
    env = {k: v for k, v in os.environ.items() if k != "STEERLAB_API_KEY"}
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in path if p), "OMP_NUM_THREADS": "1"}


def guide_command(name: str, files: dict[str, Path]) -> list[str]:
    """The guide's ``steerlab NAME ...`` line as ``python -m steerlab.cli`` arguments, its
    file names replaced by ``files``."""
    lines = [line for b in blocks("bash") for line in b.splitlines()
             if line.startswith(f"steerlab {name} ")]
    assert len(lines) == 1, lines
    args = shlex.split(lines[0])[1:]
    return [sys.executable, "-m", "steerlab.cli", *(str(files.get(a, a)) for a in args)]


# -- registration ------------------------------------------------------------------------------
def test_register_and_entry_points(toy: type[Controller],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``register`` is idempotent and refuses a clash or a non-controller; a declared entry
    point that fails to import, is misnamed or clashes is skipped with a warning."""
    from importlib.metadata import EntryPoint

    import steerlab.methods as methods
    from steerlab.errors import SteeringError

    assert methods.register(toy) is toy and METHODS["toy_clamp"] is toy
    twin = type("Twin", (toy,), {})
    with pytest.raises(SteeringError, match=r"already registered by toy_clamp\.ToyClamp"):
        methods.register(twin)
    with pytest.raises(SteeringError, match="Controller subclass"):
        methods.register(dict)  # type: ignore[type-var]
    declared = [EntryPoint(name, value, methods.ENTRY_POINT_GROUP) for name, value in (
        ("toy_clamp", "toy_clamp:ToyClamp"), ("absent", "no_such_module:Method"),
        ("misnamed", "toy_clamp:ToyClamp"), ("caa", "toy_clamp:ToyClamp"))]
    monkeypatch.setattr(methods, "entry_points", lambda group: declared)
    with pytest.warns(UserWarning) as caught:
        assert methods.load_entry_points() == ["toy_clamp"]
    assert [str(w.message).split(" = ")[0].split()[-1] for w in caught] == [
        "absent", "misnamed", "caa"]
    assert METHODS["caa"].__name__ == "CAA"


# -- 1-4: the estimator on tensors, steer, state ---------------------------------------------
def test_the_estimator_learns_on_tensors_and_steers_by_the_strength_rule(
        toy: type[Controller]) -> None:
    g = torch.Generator().manual_seed(0)
    site = Site("resid_post", 1)
    positive = {site: torch.randn(12, 32, generator=g) + 2.0}
    negative = {site: torch.randn(10, 32, generator=g) - 2.0}
    clamp = toy(layers=1, target="median").fit(positive, negative)
    assert clamp.hyperparameters() == {"layers": [1], "target": "median", "recipe": "mean",
                                       "scope": "all"}
    u, (tau_pos, tau_neg) = clamp.directions[site], clamp.targets[site]
    assert float(u.norm()) == pytest.approx(1.0)
    assert float(tau_pos) == float((positive[site] @ u).median())
    h = torch.randn(3, 5, 32, generator=g)
    ctx = StepContext(positions=torch.arange(5).expand(3, 5), prompt_len=torch.full((3,), 5))
    out = clamp.steer(site, h, torch.tensor([1.0, -1.0, 0.0]), ctx)
    assert torch.allclose(out[0] @ u, tau_pos.expand(5), atol=1e-5)  # s = 1: clamped to τ⁺
    assert torch.allclose(out[1] @ u, tau_neg.expand(5), atol=1e-5)  # s = -1: to τ⁻
    assert torch.equal(out[2], h[2])  # s = 0: untouched
    across = out - h  # only the component along u moves
    assert torch.allclose(across - (across @ u)[..., None] * u, torch.zeros_like(h), atol=1e-5)
    half = clamp.steer(site, h, torch.tensor([0.5, 0.5, 0.5]), ctx)  # half of the way
    assert torch.allclose(half[0] @ u, (h[0] @ u + tau_pos) / 2, atol=1e-5)


# -- fit by name, save, load, strength 0 -------------------------------------------------------
def test_fit_by_name_save_load_and_strength_zero(toy: type[Controller], lm: LoadedModel,
                                                 data: Path, tmp_path: Path) -> None:
    pairs = load_dataset(str(data))
    clamp = fit_method(lm, "toy_clamp", pairs, layer=-1, target="median")
    assert type(clamp) is toy and clamp.hyperparameters()["layers"] == [1]
    path = artifacts.save(clamp, tmp_path / "clamp.safetensors")
    loaded = artifacts.load(path, lm.info)
    assert type(loaded) is toy and loaded.hyperparameters() == clamp.hyperparameters()
    assert artifacts.read_metadata(path)["fit"]["position"] == "completion_mean"

    enc = tokenize_prompts(lm, [PROMPT, "a longer prompt than the first one"], rendered=False)
    with torch.no_grad():
        plain = lm.model(**enc).logits
        with steering(lm, Steer(clamp, 2.0)):
            fitted = lm.model(**enc).logits
        with steering(lm, Steer(loaded, 2.0)):
            reloaded = lm.model(**enc).logits
        with steering(lm, Steer(loaded, 0.0)):
            zero = lm.model(**enc).logits
    assert torch.equal(reloaded, fitted)  # the loaded artifact steers bit-identically
    assert torch.equal(zero, plain)  # strength 0 is the unsteered model
    assert not torch.equal(fitted, plain)

    robust = fit_method(lm, "toy_clamp", pairs, layer=-1, preset="robust")
    assert robust.hyperparameters()["target"] == "median"
    assert robust.fit_info["preset"]["name"] == "robust"


# -- the CLI, in a subprocess (the entry point) ------------------------------------------------
@pytest.fixture(scope="module")
def controllers(folder: Path, data: Path, plugin: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guide's ``steerlab fit`` line, run in a subprocess: controllers/clamp.safetensors."""
    out = tmp_path_factory.mktemp("controllers")
    files = {"./my-model": folder, "pairs.jsonl": data, "controllers": out,
             "controllers/clamp.safetensors": out / "clamp.safetensors"}
    proc = subprocess.run(guide_command("fit", files), env=plugin, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_steerlab_fit_in_another_process_equals_fit_method(
        toy: type[Controller], controllers: Path, lm: LoadedModel, data: Path) -> None:
    meta = artifacts.read_metadata(controllers / "clamp.safetensors")
    assert meta["method"] == "toy_clamp" and meta["sites"] == ["resid_post.1"]
    assert meta["hyperparameters"] == {"layers": [1], "target": "median", "recipe": "mean",
                                       "scope": "all"}
    here = fit_method(lm, "toy_clamp", load_dataset(str(data)), layer=-1, target="median")
    there = artifacts.load(controllers / "clamp.safetensors", lm.info)
    for name, tensor in here.state_dict().items():
        assert torch.equal(there.state_dict()[name], tensor), name


# -- sweep ---------------------------------------------------------------------------------
def test_sweep(toy: type[Controller], lm: LoadedModel, tmp_path: Path) -> None:
    from steerlab.evals.sweep import SweepSpec, run_sweep
    from steerlab.evals.tasks import BehaviourAB

    ab_file = tmp_path / "toy-ab.json"
    ab_file.write_text(json.dumps([
        {"question": f"Is day {i} good?\n (A) yes\n (B) no",
         "answer_matching_behavior": "(A)" if i % 2 else "(B)",
         "answer_not_matching_behavior": "(B)" if i % 2 else "(A)"} for i in range(12)]))
    spec = SweepSpec(methods=["toy_clamp"], layers=[1], strengths=[-1.0, 0.0, 1.0],
                     tasks=[BehaviourAB("toy", path=ab_file, n_train=8, n_test=4)],
                     hyperparameters={"toy_clamp": {"target": "median"}}, kl=False)
    results = run_sweep(lm, spec, tmp_path / "sweep", progress=False)
    assert not results.failures() and results.stats["fits"] == 1
    rows = {row["strength"]: row for row in results.frame()}
    assert rows[0.0]["delta"] == 0.0  # strength 0 scores as the unsteered baseline
    assert rows[1.0]["value"] != rows[-1.0]["value"]
    again = run_sweep(lm, spec, tmp_path / "sweep", progress=False)  # resumed: nothing to do
    assert again.stats["skipped"] == len(again) and again.stats["fits"] == 0


# -- the server, in a subprocess (the entry point) ------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_health(proc: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.25)


def test_serve(toy: type[Controller], controllers: Path, folder: Path, lm: LoadedModel,
               plugin: dict[str, str]) -> None:
    port = _free_port()
    command = guide_command("serve", {"./my-model": folder, "controllers": controllers})
    proc = subprocess.Popen([*command, "--port", str(port), "--threads", "1"], env=plugin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, served = f"http://127.0.0.1:{port}", str(folder)
    try:
        _wait_for_health(proc, url)
        steering_list = httpx.get(f"{url}/v1/steering").json()["data"]
        assert [(c["id"], c["method"]) for c in steering_list] == [("clamp", "toy_clamp")]
        replies = {}
        for strength in (2.0, -2.0, 0.0):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
            reply = client.chat.completions.create(
                model=served, messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
                temperature=0, extra_body={"steering": [{"controller": "clamp",
                                                         "strength": strength}]})
            replies[strength] = reply.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    clamp = artifacts.load(controllers / "clamp.safetensors", lm.info)
    for strength, text in replies.items():
        want = generate(lm, [PROMPT], steers=Steer(clamp, strength), max_new_tokens=12)[0]
        assert text == want, strength
    assert replies[0.0] == generate(lm, [PROMPT], max_new_tokens=12)[0]
    assert replies[2.0] != replies[0.0] or replies[-2.0] != replies[0.0]
