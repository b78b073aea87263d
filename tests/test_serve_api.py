"""The OpenAI-compatible server, driven live on loopback with the official ``openai`` client.

Each server runs in a background thread of the test process on its own tiny model instance
(two engines must never share one model: the steering hooks live on the model).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from steerlab import artifacts
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.caa import CAA
from steerlab.models import LoadedModel
from steerlab.runtime import Steer, generate
from steerlab.serve.app import ServerConfig, create_app
from steerlab.serve.background import background
from steerlab.serve.engine import EngineConfig
from steerlab.serve.registry import ControllerRegistry, ServedController
from steerlab.sites import Site
from tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

KEY = "test-key"
PROMPT = "the cat sat on"


def make_caa(lm: LoadedModel, layer: int = 1, seed: int = 0) -> CAA:
    c = CAA(layers=[layer], scope="all")
    g = torch.Generator().manual_seed(seed)
    c.set_vectors({Site("resid_post", layer): torch.randn(lm.info.hidden_size, generator=g)})
    c.model_info = lm.info
    return c


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return build_tiny_model("llama", seed=3, chat=True)


@pytest.fixture(scope="module")
def controllers_dir(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("controllers")
    artifacts.save(make_caa(tiny, 1, 0), folder / "mood.safetensors")
    artifacts.save(make_caa(tiny, 0, 1), folder / "topic.safetensors")
    (folder / "controllers.json").write_text(json.dumps({
        "positive": {"file": "mood.safetensors", "strength": 4.0, "max_strength": 10,
                     "description": "the mood vector, up"},
        "negative": {"file": "mood.safetensors", "strength": -4.0, "max_strength": 10},
    }))
    return folder


@pytest.fixture(scope="module")
def registry(tiny: LoadedModel, controllers_dir: Path) -> ControllerRegistry:
    return ControllerRegistry.from_dir(controllers_dir, tiny.info, max_steers=3)


@pytest.fixture(scope="module")
def live(tiny: LoadedModel, registry: ControllerRegistry) -> Iterator[str]:
    config = ServerConfig(served_name="tiny", api_key=KEY, max_tokens=40, max_prompt_tokens=60,
                          max_n=4, max_body_bytes=32 * 1024,
                          engine=EngineConfig(max_batch=4, max_queue=16))
    with background(create_app(tiny, registry, config)) as url:
        yield url


@pytest.fixture
def client(live: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live}/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client: openai.OpenAI, steering: list[dict[str, Any]] | None = None,
         **kw: Any) -> Any:
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}],
        extra_body={"steering": steering} if steering is not None else None, **kw)


def health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/health").json()


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


# -- listing -------------------------------------------------------------------------------------
def test_models_and_steering_listing(client: openai.OpenAI, live: str) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    r = httpx.get(f"{live}/v1/steering", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    body = r.json()
    by_id = {c["id"]: c for c in body["data"]}
    assert sorted(by_id) == ["negative", "positive", "topic"]
    assert by_id["positive"]["method"] == "caa"
    assert by_id["positive"]["default_strength"] == 4.0
    assert by_id["negative"]["default_strength"] == -4.0
    assert by_id["positive"]["max_strength"] == 10
    assert by_id["topic"]["sites"] == ["resid_post.0"]
    assert by_id["topic"]["default_scope"] == "all"
    assert body["max_steering_entries"] == 3
    h = health(live)
    assert h["status"] == "ok" and h["model"] == "tiny"


# -- generation ----------------------------------------------------------------------------------
def test_chat_and_completions_match_the_library(client: openai.OpenAI, tiny: LoadedModel,
                                                registry: ControllerRegistry) -> None:
    mood = registry.get("positive").controller
    for steering, steers in ((None, None), ([{"controller": "positive"}], Steer(mood, 4.0)),
                             ([{"controller": "positive", "strength": -6.5, "scope": "generated"}],
                              Steer(mood, -6.5, scope="generated"))):
        want = generate(tiny, [PROMPT], steers=steers, max_new_tokens=12)[0]
        r = chat(client, steering)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason in ("stop", "length")
        rendered = tiny.tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
        assert r.usage.prompt_tokens == len(tiny.tokenizer(rendered, add_special_tokens=False)[
            "input_ids"])
        want_plain = generate(tiny, [PROMPT], steers=steers, max_new_tokens=10, render=False)[0]
        c = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                      extra_body={"steering": steering} if steering else None)
        assert c.choices[0].text == want_plain
    unsteered = chat(client).choices[0].message.content
    assert chat(client, [{"controller": "positive"}]).choices[0].message.content != unsteered
    # two entries add up: +4 and -4 of the same controller is no steering at all
    both = chat(client, [{"controller": "positive"}, {"controller": "negative"}])
    assert both.choices[0].message.content == unsteered


def test_streaming_equals_the_full_response(client: openai.OpenAI) -> None:
    steering = [{"controller": "positive"}, {"controller": "topic", "strength": 2.0}]
    full = chat(client, steering, max_tokens=20).choices[0].message.content
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=20,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"steering": steering})
    parts, finish, usage, roles = [], None, None, []
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            roles.append(c.delta.role)
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == full
    assert roles[0] == "assistant" and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens >= 1
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=15, temperature=0,
                                     extra_body={"steering": steering}).choices[0].text
    pieces = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=15,
                                       temperature=0, stream=True,
                                       extra_body={"steering": steering})
    assert "".join(p.choices[0].text for p in pieces if p.choices) == text


def test_streams_carry_the_steering_in_their_first_chunk(live: str) -> None:
    """As the non-streamed body does, a stream names its resolved steering: in its first
    chunk only, on both endpoints (unsteered: an empty list)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    steering = [{"controller": "positive"}, {"controller": "topic", "strength": 2.0,
                                             "scope": "last"}]
    bodies = {"/v1/completions": {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "n": 2},
              "/v1/chat/completions": {"model": "tiny", "max_tokens": 4, "n": 2,
                                       "messages": [{"role": "user", "content": PROMPT}]}}
    with httpx.Client(timeout=60, headers=auth) as http:
        for path, body in bodies.items():
            for field in (steering, None):
                sent = {**body, "temperature": 0}
                if field is not None:
                    sent["steering"] = field
                want = http.post(f"{live}{path}", json=sent).json()["steering"]
                assert len(want) == (2 if field else 0)
                with http.stream("POST", f"{live}{path}", json={**sent, "stream": True}) as r:
                    chunks = [json.loads(line[6:]) for line in r.iter_lines()
                              if line.startswith("data: {")]
                assert len(chunks) > 2 and chunks[0]["steering"] == want, (path, chunks[0])
                assert all("steering" not in c for c in chunks[1:])
    # the openai client keeps the field on the chunk
    client = openai.OpenAI(base_url=f"{live}/v1", api_key=KEY, max_retries=0, timeout=60)
    first = next(iter(client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=3, stream=True,
        extra_body={"steering": [{"controller": "positive"}]})))
    assert (first.model_extra or {})["steering"][0]["controller"] == "positive"


def test_n_choices_prompt_lists_and_seeds(client: openai.OpenAI) -> None:
    r = chat(client, n=3, temperature=1.0, seed=7, max_tokens=10)
    again = chat(client, n=3, temperature=1.0, seed=7, max_tokens=10)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # each choice its own seed
    c = client.completions.create(model="tiny", prompt=["I", "we went"], max_tokens=5,
                                  temperature=0)
    assert [ch.index for ch in c.choices] == [0, 1]
    single = client.completions.create(model="tiny", prompt="we went", max_tokens=5,
                                       temperature=0)
    assert c.choices[1].text == single.choices[0].text
    ids = client.completions.create(model="tiny", prompt=[1, 80, 75], max_tokens=4,
                                    temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_stop_strings(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[6:9]
    assert stop and len(full) > 12
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    s = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0,
                                  stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(p.choices[0].text for p in s if p.choices) == full[: full.index(stop)]


def test_concurrent_requests_equal_the_same_requests_alone(
        client: openai.OpenAI, tiny: LoadedModel, registry: ControllerRegistry) -> None:
    mood, topic = registry.get("positive").controller, registry.get("topic").controller
    configs: list[tuple[list[dict[str, Any]] | None, Any]] = [
        (None, None), ([{"controller": "positive"}], Steer(mood, 4.0)),
        ([{"controller": "negative", "scope": "last"}], Steer(mood, -4.0, scope="last")),
        ([{"controller": "topic", "strength": 3.0}], Steer(topic, 3.0)),
    ]
    prompts = ["I", "the cat sat on", "in the house there was a", "we went", "he said", "a"]
    jobs = [(p, configs[i % len(configs)]) for i, p in enumerate(prompts * 2)]

    def one(job: tuple[str, Any]) -> str:
        p, (steering, _) = job
        return client.completions.create(
            model="tiny", prompt=p, max_tokens=12, temperature=0,
            extra_body={"steering": steering} if steering else None).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    for (p, (_, steers)), text in zip(jobs, got, strict=True):
        assert text == generate(tiny, [p], steers=steers, max_new_tokens=12, render=False)[0]


# -- failures ------------------------------------------------------------------------------------
def test_auth(live: str) -> None:
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=f"{live}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.post(f"{live}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{live}/v1/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 401  # checked before the body is read
    r = httpx.get(f"{live}/v1/steering", headers={"Authorization": f"Basic {KEY}"})
    assert r.status_code == 401
    assert httpx.get(f"{live}/health").status_code == 200  # health needs no key


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"steering": [{"controller": "nope"}]}, 400, "unknown controller 'nope'"),
    ({"steering": [{"controller": "positive", "strength": 11}]}, 400, "out of bounds"),
    ({"steering": [{"controller": "positive", "scope": "sideways"}]}, 400, "scope"),
    ({"steering": [{"controller": "positive", "scope": "from:" + "9" * 35}]}, 400,
     "out of range"),
    ({"steering": [{"controller": "positive"}] * 4}, 400, "at most 3"),
    ({"steering": [{"controller": "positive", "code": "import os"}]}, 422, "code"),
    ({"steering": {"controller": "positive"}}, 422, "steering"),
    ({"max_tokens": 41}, 400, "at most 40"),
    ({"messages": [{"role": "user", "content": "word " * 80}]}, 400, "at most 60"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),  # needs logprobs: true
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"n": 5}, 400, "limit of 4"),
    ({"temperature": -1}, 422, "temperature"),
    ({"top_p": 0}, 422, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "role"),
    ({"steerign": [{"controller": "positive"}]}, 422, "steerign"),
    ({"max_tokens": "many"}, 422, "max_tokens"),
    ({"tools": [{"type": "function"}]}, 400, "tools"),
])
def test_bad_requests_get_clear_errors(live: str, body: dict[str, Any], status: int,
                                       needle: str) -> None:
    payload: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 4}
    payload.update(body)
    r = httpx.post(f"{live}/v1/chat/completions", json=payload,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] or needle == err.get("param"), err


def test_malformed_bodies_and_routes(live: str, client: openai.OpenAI) -> None:
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{live}/v1/chat/completions"
    for content in (b"{not json", b"[1, 2]", b"",
                    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
                    b'"steering": [{"controller": "positive", "strength": NaN}]}',
                    b'{"model": "tiny", "prompt": "x", "max_tokens": 1e999}'):
        r = httpx.post(url, content=content, headers=auth)
        assert r.status_code == 422, (content, r.text)
        assert "error" in r.json()
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 40_000}]}
    r = httpx.post(url, json=big, headers=auth)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        yield json.dumps(big).encode()

    r = httpx.post(url, content=chunks(), headers=auth)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.get(f"{live}/v1/nothing-here", headers=auth)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(f"{live}/v1/completions", json={"model": "tiny", "prompt": [10**7]},
                   headers=auth)
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="unknown controller"):
        chat(client, [{"controller": "missing"}])
    # after all that the server still serves
    assert health(live)["status"] == "ok"
    assert chat(client).choices[0].finish_reason in ("stop", "length")


class Slow(Controller):
    """Adds nothing, slowly: makes a tiny model's requests last long enough to race them."""

    method = "slow"

    def __init__(self, delay: float = 0.01) -> None:
        super().__init__()
        self.delay = delay
        self.sites = [Site("resid_post", 0)]

    def steer(self, site: Site, h: torch.Tensor, strength: torch.Tensor,
              ctx: StepContext) -> torch.Tensor:
        time.sleep(self.delay)
        return h

    def hyperparameters(self) -> dict[str, Any]:
        return {"delay": self.delay}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        pass


@pytest.fixture(scope="module")
def slow_server() -> Iterator[tuple[str, list[logging.LogRecord]]]:
    lm = build_tiny_model("llama", seed=4, chat=True)
    registry = ControllerRegistry({"slow": ServedController("slow", Slow(), Path("slow"))})
    config = ServerConfig(served_name="tiny", max_tokens=200,
                          engine=EngineConfig(max_batch=1, max_queue=1),
                          disconnect_poll_s=0.05)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("steerlab.serve")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with background(create_app(lm, registry, config)) as url:
            yield url, records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _long(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={
        "model": "tiny", "prompt": "secret prompt text", "max_tokens": 200, "temperature": 0,
        "ignore_eos": True, "steering": [{"controller": "slow"}]}, timeout=120)


def test_full_queue_answers_429_and_disconnects_cancel(
        slow_server: tuple[str, list[logging.LogRecord]]) -> None:
    url, _ = slow_server
    before = health(url)["cancelled"]
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/v1/completions", json={
            "model": "tiny", "prompt": "first", "max_tokens": 200, "stream": True,
            "ignore_eos": True, "steering": [{"controller": "slow"}]}) as first:
        lines = first.iter_lines()
        next(lines)  # running: the only row
        results: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: results.setdefault("second", _long(url)))
        waiter.start()
        wait_for(lambda: health(url)["waiting"] == 1)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError, match="capacity"):
            c.completions.create(model="tiny", prompt="third", max_tokens=2)
    # leaving the stream closed the connection: the first request is cancelled, the second runs
    wait_for(lambda: health(url)["cancelled"] >= before + 1)
    waiter.join(120)
    assert results["second"].status_code == 200
    assert results["second"].json()["usage"]["completion_tokens"] == 200
    assert health(url)["rejected"] >= 1
    r = httpx.post(f"{url}/v1/completions", json={
        "model": "tiny", "prompt": "word " * 40, "max_tokens": 200})  # context 256
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # a non-streamed request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={
            "model": "tiny", "prompt": "x", "max_tokens": 200, "ignore_eos": True,
            "steering": [{"controller": "slow"}]}, timeout=0.5)
    wait_for(lambda: health(url)["cancelled"] >= before + 2)
    wait_for(lambda: health(url)["running"] == 0)


def test_request_logs_are_structured_and_omit_prompts(
        slow_server: tuple[str, list[logging.LogRecord]]) -> None:
    url, records = slow_server
    r = httpx.post(f"{url}/v1/completions", json={
        "model": "tiny", "prompt": "secret prompt text", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    rid = r.json()["id"]
    wait_for(lambda: any(isinstance(x.msg, dict) and x.msg.get("id") == rid for x in records))
    rec = next(x.msg for x in records if isinstance(x.msg, dict) and x.msg.get("id") == rid)
    assert isinstance(rec, dict)
    assert rec["status"] == 200 and rec["completion_tokens"] == 3
    assert rec["prompt_tokens"] > 0 and rec["finish_reasons"] == ["length"]
    assert "latency_ms" in rec and "ttft_ms" in rec and rec["steering"] == []
    assert "secret" not in json.dumps(rec)


def test_prompts_are_logged_only_when_asked(tiny: LoadedModel,
                                            caplog: pytest.LogCaptureFixture) -> None:
    lm = build_tiny_model("gpt2", seed=1, chat=True)
    config = ServerConfig(served_name="g", log_prompts=True)
    with caplog.at_level(logging.INFO, logger="steerlab.serve"), \
            background(create_app(lm, None, config)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "g", "messages": [{"role": "user", "content": "visible words"}],
            "max_tokens": 2})
        assert r.status_code == 200
    logged = [x.msg for x in caplog.records if isinstance(x.msg, dict)
              and x.msg.get("event") == "request"]
    assert logged and "visible words" in json.dumps(logged[0]["prompt"])


_ODD_VALUES: list[Any] = [None, True, 0, -1, 1, 3, 10**12, -(10**12), 1.5, -0.0, 1e308, "",
                          "x", "positive", "all", "from:-1", "from:x", "\u0000", "💥" * 50,
                          [], [1], [-5], [10**9], ["a"], [[1, 2]], [[]], {}, {"a": 1},
                          {"controller": "positive"}, [{"controller": "positive"}],
                          [{"controller": "positive", "strength": 1e308}],
                          [{"controller": "positive", "scope": "from:999999"}],
                          [{"controller": 5}], [{}], [None]]
_FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stream",
           "stop", "seed", "steering", "stream_options", "logprobs", "echo", "user",
           "ignore_eos", "max_completion_tokens", "response_format", "extra"]


def test_random_bodies_never_crash_the_server(live: str, client: openai.OpenAI) -> None:
    """Seeded random mutations of valid bodies: every answer is a 2xx or a 4xx with an
    OpenAI error body, never a 5xx, and the server serves normally afterwards."""
    import random

    rng = random.Random(1234)
    auth = {"Authorization": f"Bearer {KEY}"}
    base = {"/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 3,
                                "temperature": 0},
            "/v1/chat/completions": {"model": "tiny", "max_tokens": 3, "temperature": 0,
                                     "messages": [{"role": "user", "content": "hi"}]}}
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=60) as http:
        for _ in range(250):
            path = rng.choice(list(base))
            body = dict(base[path])
            for field in rng.sample(_FIELDS, rng.randint(1, 3)):
                body[field] = rng.choice(_ODD_VALUES)
            if body.get("stream") is True:
                with http.stream("POST", f"{live}{path}", json=body, headers=auth) as r:
                    text = "".join(r.iter_text())
                    status = r.status_code
            else:
                r = http.post(f"{live}{path}", json=body, headers=auth)
                status, text = r.status_code, r.text
            statuses[status] = statuses.get(status, 0) + 1
            assert status in (200, 400, 404, 422), (body, status, text)
            if status != 200:
                assert "error" in json.loads(text), text
    assert statuses.get(200, 0) > 0 and statuses.get(422, 0) > 0
    assert health(live)["status"] == "ok"
    assert chat(client).choices[0].finish_reason in ("stop", "length")
