"""Log-probabilities and ``echo`` on the server, and lm-evaluation-harness against it.

The server runs for real on loopback (uvicorn in a thread, and ``steerlab serve`` as a process
for the default-steering run), driven with the ``openai`` client, ``httpx`` and lm-eval's own
``local-completions`` model on local YAML tasks over local JSON (``HF_DATASETS_OFFLINE=1``).
References are computed with transformers on a second copy of the model (the server's copy
belongs to its engine thread).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from lm_eval_tasks import write_tasks
from steerlab import artifacts
from steerlab.methods.caa import CAA
from steerlab.models import LoadedModel, load_model
from steerlab.runtime import Steer, steering
from steerlab.serve.app import ServerConfig, create_app
from steerlab.serve.background import background
from steerlab.serve.engine import Engine
from steerlab.serve.registry import ControllerRegistry, SteeringSpec
from steerlab.serve.sampling import SamplingParams
from steerlab.sites import Site
from tiny_models import save_tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("serve-logprobs")
    folder = save_tiny_model("llama", 0, d / "model")
    ref = load_model(str(folder))  # the reference copy: never the server's
    caa = CAA(layers=1, scope="all")
    g = torch.Generator().manual_seed(0)
    caa.set_vectors({Site("resid_post", 1): torch.randn(ref.info.hidden_size, generator=g) * 4})
    caa.model_info = ref.info
    (d / "ctl").mkdir()
    artifacts.save(caa, d / "ctl" / "mood.safetensors")
    write_tasks(d, "sv")
    return {"dir": d, "folder": folder, "ref": ref, "caa": caa}


@pytest.fixture(scope="module")
def live(setup: dict[str, Any]) -> Iterator[str]:
    lm = load_model(str(setup["folder"]))
    registry = ControllerRegistry.from_dir(setup["dir"] / "ctl", lm.info)
    config = ServerConfig(served_name="tiny", max_tokens=40, max_n=4)
    with background(create_app(lm, registry, config)) as url:
        yield url


@pytest.fixture
def client(live: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def ref_logprobs(lm: LoadedModel, ids: list[int], steers: Any = None) -> torch.Tensor:
    """transformers' own log-softmax over every position of ``ids`` (one row, no padding)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        if steers is not None:
            with steering(lm, steers, prompt_len=[len(ids)]):
                logits = lm.model(x).logits
        else:
            logits = lm.model(x).logits
    return torch.log_softmax(logits.float(), -1)[0]


def prompt_ids(lm: LoadedModel, text: str = PROMPT) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])


def strings(lm: LoadedModel, ids: list[int]) -> list[str]:
    """The tokens as the legacy layout spells them: their text, and a token that is part of
    a character as its bytes (``bytes:\\xe2``), as OpenAI does."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    out = []
    for i in ids:
        text = lm.tokenizer.decode([i], skip_special_tokens=False)
        if "\ufffd" in text:
            piece = lm.tokenizer.convert_ids_to_tokens(i)
            text = "bytes:" + "".join(f"\\x{byte_of[c]:02x}" for c in piece)
        out.append(text)
    return out


# -- echo: the prompt scored -------------------------------------------------------------------
def test_echo_scores_the_prompt_as_transformers(live: str, client: openai.OpenAI,
                                                setup: dict[str, Any]) -> None:
    ref = setup["ref"]
    ids = prompt_ids(ref)
    want = ref_logprobs(ref, ids)
    for prompt in (PROMPT, ids):  # a string (the server adds the BOS) or token ids
        r = client.completions.create(model="tiny", prompt=prompt, echo=True, max_tokens=0,
                                      logprobs=3)
        c = r.choices[0]
        lp = c.logprobs
        assert lp is not None and lp.tokens == strings(ref, ids)
        assert c.text == (PROMPT if isinstance(prompt, str) else ref.tokenizer.decode(ids))
        assert r.usage.completion_tokens == 0 and c.finish_reason == "length"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        got = lp.token_logprobs[1:]
        expect = [float(want[i - 1, t]) for i, t in enumerate(ids) if i > 0]
        assert max(abs(a - b) for a, b in zip(got, expect, strict=True)) < 1e-4
        for i, top in enumerate(lp.top_logprobs[1:], start=1):
            assert 3 <= len(top) <= 4  # the top 3, and the prompt's token when not among them
            assert abs(max(top.values()) - float(want[i - 1].max())) < 1e-4
            assert top[lp.tokens[i]] == lp.token_logprobs[i]
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]


def test_echo_with_one_token_is_what_lm_eval_sends(live: str, setup: dict[str, Any]) -> None:
    """``echo: true, max_tokens: 1, logprobs: 1, temperature: 0`` on token ids, batched as
    lm-eval's local-completions sends it: the prompt's scores, then the greedy token's."""
    ref = setup["ref"]
    prompts = [prompt_ids(ref), prompt_ids(ref, "we went to the")]
    r = post(live, "/v1/completions", {"model": "tiny", "prompt": prompts, "echo": True,
                                       "max_tokens": 1, "logprobs": 1, "temperature": 0,
                                       "seed": 1234})
    assert r.status_code == 200, r.text
    for ids, choice in zip(prompts, sorted(r.json()["choices"], key=lambda c: c["index"]),
                           strict=True):
        lp = choice["logprobs"]
        want = ref_logprobs(ref, ids)
        assert len(lp["token_logprobs"]) == len(ids) + 1
        nxt = int(want[-1].argmax())
        assert lp["tokens"][-1] == strings(ref, [nxt])[0]
        assert abs(lp["token_logprobs"][-1] - float(want[-1, nxt])) < 1e-4
        # lm-eval: sum(token_logprobs[ctxlen:-1]) and greedy = each equals max(top)
        ctxlen = 3
        total = sum(lp["token_logprobs"][ctxlen:-1])
        expect = sum(float(want[i - 1, ids[i]]) for i in range(ctxlen, len(ids)))
        assert abs(total - expect) < 1e-4
        assert all(len(t) in (1, 2) for t in lp["top_logprobs"][1:])


def test_steering_applies_to_the_scored_tokens_by_scope(live: str,
                                                        setup: dict[str, Any]) -> None:
    """The runtime is told the whole prompt's length: ``all`` steers every scored token (as
    the library's ``steering`` does), ``last`` only the position after the prompt, so it
    changes the generated token's score alone."""
    ref, caa = setup["ref"], setup["caa"]
    ids = prompt_ids(ref)

    def scores(steering_field: list[dict[str, Any]] | None) -> list[float]:
        body: dict[str, Any] = {"model": "tiny", "prompt": ids, "echo": True, "max_tokens": 1,
                                "logprobs": 0, "temperature": 0}
        if steering_field is not None:
            body["steering"] = steering_field
        r = post(live, "/v1/completions", body)
        assert r.status_code == 200, r.text
        assert r.json()["steering"] == ([] if not steering_field else [
            {"controller": "mood", "method": "caa", "strength": 2.0,
             "scope": steering_field[0]["scope"]}])
        return r.json()["choices"][0]["logprobs"]["token_logprobs"][1:]

    plain = scores(None)
    steered = scores([{"controller": "mood", "strength": 2.0, "scope": "all"}])
    last = scores([{"controller": "mood", "strength": 2.0, "scope": "last"}])
    want = ref_logprobs(ref, ids, Steer(caa, 2.0, scope="all"))
    expect = [float(want[i - 1, t]) for i, t in enumerate(ids) if i > 0]
    assert max(abs(a - b) for a, b in zip(steered[:-1], expect, strict=True)) < 1e-4
    assert max(abs(a - b) for a, b in zip(steered[:-1], plain[:-1], strict=True)) > 1e-2
    assert last[:-1] == plain[:-1] and abs(last[-1] - plain[-1]) > 1e-3


# -- generated tokens, streams and chat ---------------------------------------------------------
def test_generated_logprobs_streamed_or_not(live: str, client: openai.OpenAI,
                                            setup: dict[str, Any]) -> None:
    ref = setup["ref"]
    ids = prompt_ids(ref)
    kw: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                          "logprobs": 2, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kw).choices[0]
    lp = full.logprobs
    assert lp is not None and len(lp.tokens) == 6 and lp.text_offset[0] == 0
    # greedy: each chosen token is the most likely; values are transformers' on prompt + output
    for top, value in zip(lp.top_logprobs, lp.token_logprobs, strict=True):
        assert max(top.values()) == value and len(top) == 2
    seq = list(ids)
    for tok_text, value in zip(lp.tokens, lp.token_logprobs, strict=True):
        want = ref_logprobs(ref, seq)[-1]
        nxt = int(want.argmax())
        assert strings(ref, [nxt])[0] == tok_text and abs(float(want[nxt]) - value) < 1e-4
        seq.append(nxt)
    stream = client.completions.create(stream=True, **kw)
    tokens, values, offsets, text = [], [], [], ""
    for ch in stream:
        for c in ch.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert text == full.text and tokens == lp.tokens and values == lp.token_logprobs
    assert offsets == lp.text_offset
    # echo streamed: the prompt's text and scores open the stream
    echo = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0,
                                     logprobs=1, echo=True, stream=True)
    first = next(iter(echo))
    assert first.choices[0].text.startswith(PROMPT)
    assert first.choices[0].logprobs.token_logprobs[0] is None
    assert first.choices[0].logprobs.tokens[:len(ids)] == strings(ref, ids)


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob
        assert e.top_logprobs[0].token == e.token
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == (
        r.choices[0].message.content)
    plain = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=5,
        temperature=0, logprobs=True, extra_body={"ignore_eos": True})
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert plain.choices[0].message.content == r.choices[0].message.content
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=3, stream=True,
        extra_body={"ignore_eos": True})
    streamed = [e for ch in stream for c in ch.choices if c.logprobs is not None
                for e in c.logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_default_steering_option_is_parsed() -> None:
    from steerlab.cli_serve import parse_default_steering
    from steerlab.errors import SteeringError

    assert parse_default_steering(["mood", "mood:2.5", "mood::all", "up:-1:from:-3"]) == (
        SteeringSpec("mood"), SteeringSpec("mood", 2.5), SteeringSpec("mood", None, "all"),
        SteeringSpec("up", -1.0, "from:-3"))
    assert parse_default_steering(None) == ()
    for bad in (":2", "mood:lots", "mood:nan", "mood:inf", "mood:1:sideways"):
        with pytest.raises(SteeringError):
            parse_default_steering([bad])


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/completions", {"logprobs": 21}, 422, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, 422, "logprobs"),
    ("/v1/completions", {"logprobs": True}, 422, "logprobs"),
    ("/v1/completions", {"logprobs": "1"}, 422, "logprobs"),
    ("/v1/completions", {"logprobs": 1.0}, 422, "logprobs"),
    ("/v1/completions", {"echo": "yes"}, 422, "echo"),
    ("/v1/completions", {"max_tokens": -1, "echo": True}, 422, "max_tokens"),
    ("/v1/completions", {"max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"logprobs": 1}, 422, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"max_tokens": 0, "logprobs": True}, 422, "max_tokens"),
])
def test_logprobs_options_are_validated(live: str, path: str, body: dict[str, Any],
                                        status: int, param: str) -> None:
    base: dict[str, Any] = {"model": "tiny", "max_tokens": 2}
    base.update({"prompt": "hi"} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "hi"}]})
    base.update(body)
    r = post(live, path, base)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"].split(".")[0] == param


def test_echo_of_ids_outside_the_vocabulary_is_a_400(live: str) -> None:
    r = post(live, "/v1/completions", {"model": "tiny", "prompt": [5, 10**7], "echo": True,
                                       "max_tokens": 0, "logprobs": 1})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


def test_an_end_of_sequence_token_is_scored(setup: dict[str, Any]) -> None:
    """A row that stops on end-of-sequence lists that token in its log-probabilities (as
    vLLM and OpenAI do), so lm-eval's ``token_logprobs[ctxlen:-1]`` drops it and not the
    continuation's last token; the engine stepped by hand, with the greedy token as EOS."""
    lm = load_model(str(setup["folder"]))
    ids = prompt_ids(lm)
    nxt = int(ref_logprobs(setup["ref"], ids)[-1].argmax())
    engine = Engine(lm)
    engine.eos_ids = frozenset({nxt})
    h = engine.submit(ids, SamplingParams(max_tokens=4, logprobs=1, prompt_logprobs=1))
    none = engine.submit(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
    while engine.step():
        pass
    done = h.wait(1)
    assert done.finish_reason == "stop" and done.token_ids == [] and done.text == ""
    assert [e.token for e in done.logprobs] == [nxt]
    assert done.prompt_logprobs is not None and len(done.prompt_logprobs) == len(ids)
    only = none.wait(1)
    assert only.finish_reason == "length" and only.logprobs == []
    assert only.prompt_logprobs is not None and all(e.top == () for e in only.prompt_logprobs)
    assert [e.logprob for e in only.prompt_logprobs] == [e.logprob for e in done.prompt_logprobs]
    with pytest.raises(Exception, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_default_steering_applies_to_requests_without_the_field(
        setup: dict[str, Any]) -> None:
    lm = load_model(str(setup["folder"]))
    registry = ControllerRegistry.from_dir(setup["dir"] / "ctl", lm.info)
    config = ServerConfig(served_name="tiny", default_steering=(
        SteeringSpec("mood", 2.0, "all"),))
    ids = prompt_ids(lm)
    body = {"model": "tiny", "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 0}
    with background(create_app(lm, registry, config)) as url:
        listed = httpx.get(f"{url}/v1/steering").json()["default_steering"]
        default = post(url, "/v1/completions", body).json()
        none = post(url, "/v1/completions", {**body, "steering": []}).json()
    assert listed == default["steering"] == [
        {"controller": "mood", "method": "caa", "strength": 2.0, "scope": "all"}]
    assert none["steering"] == []
    a = default["choices"][0]["logprobs"]["token_logprobs"][1:]
    b = none["choices"][0]["logprobs"]["token_logprobs"][1:]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-2
    with pytest.raises(Exception, match="default steering"):
        create_app(lm, registry, ServerConfig(served_name="tiny", default_steering=(
            SteeringSpec("nope"),)))


# -- lm-evaluation-harness ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def steered_process(setup: dict[str, Any]) -> Iterator[str]:
    """``steerlab serve`` with ``--default-steering mood:2:all``: lm-eval cannot add body
    fields, so the server steers every request that sends none."""
    _need_lm_eval()  # before starting a server nobody would use
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "steerlab.cli", "serve", "--model", str(setup["folder"]),
         "--controllers", str(setup["dir"] / "ctl"), "--port", str(port), "--threads", "1",
         "--served-name", "tiny", "--default-steering", "mood:2:all", "--log-level",
         "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "steerlab serve did not start"
            time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _need_lm_eval() -> Any:
    lm_eval = pytest.importorskip("lm_eval")
    for name in ("tenacity", "aiohttp", "requests"):  # lm-eval's API models: lm-eval[api]
        pytest.importorskip(name, reason="lm-eval's local-completions needs lm-eval[api]")
    return lm_eval


def _evaluate(setup: dict[str, Any], url: str) -> dict[str, Any]:
    lm_eval = _need_lm_eval()
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # token ids in (tokenized_requests, the default): the server scores exactly lm-eval's
    # tokens, without adding a BOS to a text prompt
    args = (f"base_url={url}/v1/completions,model=tiny,tokenizer_backend=huggingface,"
            f"tokenizer={setup['folder']},tokenized_requests=True,num_concurrent=1,"
            f"max_retries=1,max_length=256")
    return lm_eval.simple_evaluate(
        model="local-completions", model_args=args, tasks=["sv_mc", "sv_gen"], limit=5,
        task_manager=TaskManager(include_path=str(setup["dir"] / "tasks")), log_samples=True)


def _reference(setup: dict[str, Any], result: dict[str, Any], steers: Any) -> list[float]:
    """log p(continuation | context) with transformers, tokenised as lm-eval does."""
    ref = setup["ref"]
    tok = ref.tokenizer
    out = []
    for s in result["samples"]["sv_mc"]:
        for context, continuation in s["arguments"]:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            cont = tok(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):]
            logp = ref_logprobs(ref, ctx + cont, steers)
            out.append(float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))))
    return out


def _loglikelihoods(result: dict[str, Any]) -> list[float]:
    return [resp[0][0] for s in result["samples"]["sv_mc"] for resp in s["resps"]]


def test_lm_eval_local_completions_against_the_server(
        setup: dict[str, Any], live: str, steered_process: str) -> None:
    """lm-eval's ``local-completions`` model: a loglikelihood task and a generate_until task
    with limit 5, against the server unsteered and against ``steerlab serve
    --default-steering``; unsteered log-likelihoods equal transformers' own to 1e-4, steered
    ones the library's ``steering`` (scope all) to 1e-4, and steering changes both tasks."""
    plain = _evaluate(setup, live)
    steered = _evaluate(setup, steered_process)
    for r in (plain, steered):
        assert r["results"]["sv_mc"]["sample_len"] == 5
        assert "exact_match,none" in r["results"]["sv_gen"]
    a, b = _loglikelihoods(plain), _loglikelihoods(steered)
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, _reference(setup, plain, None), strict=True)) < 1e-4
    want = _reference(setup, steered, Steer(setup["caa"], 2.0, scope="all"))
    assert max(abs(x - y) for x, y in zip(b, want, strict=True)) < 1e-4
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-2
    gens = [[s["resps"] for s in r["samples"]["sv_gen"]] for r in (plain, steered)]
    assert gens[0] != gens[1]
