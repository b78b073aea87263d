"""Hardening of the server against bad input: every bad request gets an OpenAI-shaped 4xx with
a message, before any work it would waste (tokenization, generation), and loses nothing.

Driven live on loopback with httpx and the ``openai`` client, as ``test_serve_api.py``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from steerlab import artifacts
from steerlab.errors import ArtifactError, SteeringError
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.caa import CAA
from steerlab.models import LoadedModel
from steerlab.serve.app import ServerConfig, create_app
from steerlab.serve.background import background
from steerlab.serve.engine import EngineConfig
from steerlab.serve.registry import ControllerRegistry, ServedController, SteeringSpec
from steerlab.sites import Site
from tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def caa(lm: LoadedModel, vector: torch.Tensor, layer: int = 1) -> CAA:
    c = CAA(layers=[layer], scope="all")
    c.vectors = {Site("resid_post", layer): vector}  # as a crafted file would hold it
    c.sites = [Site("resid_post", layer)]
    c.model_info = lm.info
    return c


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return build_tiny_model("llama", seed=7, chat=True)


@pytest.fixture(scope="module")
def controllers_dir(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One good controller under two names, and three that load but cannot steer."""
    folder = tmp_path_factory.mktemp("hardening-controllers")
    d = tiny.info.hidden_size
    g = torch.Generator().manual_seed(0)
    artifacts.save(caa(tiny, torch.randn(d, generator=g)), folder / "mood.safetensors")
    artifacts.save(caa(tiny, torch.randn(2, d, generator=g)), folder / "flat.safetensors")
    artifacts.save(caa(tiny, torch.tensor(1.5)), folder / "scalar.safetensors")
    artifacts.save(caa(tiny, torch.randn(d - 1, generator=g)), folder / "short.safetensors")
    (folder / "controllers.json").write_text(json.dumps({
        "positive": {"file": "mood.safetensors", "strength": 4.0, "max_strength": 10},
        "negative": {"file": "mood.safetensors", "strength": -4.0, "max_strength": 10},
        "flat_alias": {"file": "flat.safetensors"},
    }))
    return folder


@pytest.fixture(scope="module")
def registry(tiny: LoadedModel, controllers_dir: Path) -> ControllerRegistry:
    return ControllerRegistry.from_dir(controllers_dir, lm=tiny, max_strength=8)


class CountingTokenizer:
    """The app's tokenizer, counting its calls and the threads they run on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.threads: list[str] = []

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        return self.inner(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def server(tiny: LoadedModel, registry: ControllerRegistry) -> Iterator[tuple[str, Any]]:
    config = ServerConfig(served_name="tiny", api_key=KEY, max_tokens=40, max_prompt_tokens=60,
                          max_n=4, default_max_tokens=5,
                          engine=EngineConfig(max_batch=4, max_queue=16))
    app = create_app(tiny, registry, config)
    counting = CountingTokenizer(app.state.server.tokenizer)
    app.state.server.tokenizer = counting
    with background(app) as url:
        yield url, counting


@pytest.fixture(scope="module")
def url(server: tuple[str, Any]) -> str:
    return server[0]


def post(url: str, path: str, body: dict[str, Any] | bytes, **kw: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{url}{path}", content=body, timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"}, **kw)
    return httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=60, **kw)


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"].strip(), err
    return dict(err)


# -- 1: controllers are checked when loaded, never when used -------------------------------------
def test_invalid_controllers_are_skipped_at_start_with_the_reason(
        registry: ControllerRegistry) -> None:
    assert registry.names == ["negative", "positive"]
    reasons = {p.name: why for p, why in registry.skipped}
    assert sorted(reasons) == ["flat.safetensors", "scalar.safetensors", "short.safetensors"]
    assert "shape (2, 32)" in reasons["flat.safetensors"]
    assert "shape ()" in reasons["scalar.safetensors"]
    assert "shape (31,)" in reasons["short.safetensors"]


def test_strict_controllers_refuse_the_folder(tiny: LoadedModel, controllers_dir: Path) -> None:
    with pytest.raises(ArtifactError, match=r"flat\.safetensors.*shape \(2, 32\)"):
        ControllerRegistry.from_dir(controllers_dir, lm=tiny, strict_controllers=True)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_naming_a_skipped_controller_gets_a_400(url: str, stream: bool) -> None:
    for name in ("flat", "scalar", "short", "flat_alias"):
        r = post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2,
                                          "stream": stream, "steering": [{"controller": name}]})
        err = error_of(r, 400)
        assert f"unknown controller {name!r}" in err["message"]


class Broken(Controller):
    """A controller whose steer misbehaves in one of several ways."""

    method = "broken"

    def __init__(self, how: str = "raise") -> None:
        super().__init__()
        self.how = how
        self.sites = [Site("resid_post", 0)]

    def steer(self, site: Site, h: torch.Tensor, strength: torch.Tensor,
              ctx: StepContext) -> torch.Tensor:
        if self.how == "raise":
            raise IndexError("index 7 is out of bounds")
        if self.how == "shape":
            return h[:, :, :-1]
        if self.how == "nan":
            return h + float("nan")
        if self.how == "reads":
            return h + ctx.reads[Site("resid_pre", 0)]
        return h

    @property
    def read_sites(self) -> list[Site]:
        return [Site("resid_pre", 0)] if self.how == "reads" else []

    def hyperparameters(self) -> dict[str, Any]:
        return {"how": self.how}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        self.sites = list(sites)


@pytest.mark.parametrize(("how", "needle"), [
    ("raise", "raised IndexError"), ("shape", "returned shape"), ("nan", "NaN"),
])
def test_create_app_refuses_a_controller_that_cannot_steer(tiny: LoadedModel, how: str,
                                                           needle: str) -> None:
    reg = ControllerRegistry({"b": ServedController("b", Broken(how), Path("b"))})
    with pytest.raises(ArtifactError, match=needle):
        create_app(tiny, reg, ServerConfig(served_name="tiny"))
    # a controller that reads its read sites is given them in the dry steer
    ok = ControllerRegistry({"r": ServedController("r", Broken("reads"), Path("r"))})
    create_app(tiny, ok, ServerConfig(served_name="tiny"))


def test_sites_out_of_range_are_refused_at_start(tiny: LoadedModel) -> None:
    far = CAA(layers=[5])
    far.set_vectors({Site("resid_post", 5): torch.zeros(tiny.info.hidden_size)})
    reg = ControllerRegistry({"far": ServedController("far", far, Path("far"))})
    with pytest.raises(ArtifactError, match="out of range"):
        create_app(tiny, reg, ServerConfig(served_name="tiny"))


# -- 3: bounds must be finite ---------------------------------------------------------------------
def test_non_finite_strength_bounds_are_refused(tiny: LoadedModel,
                                                controllers_dir: Path, tmp_path: Path) -> None:
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        with pytest.raises(SteeringError, match="finite, positive"):
            ControllerRegistry.from_dir(controllers_dir, lm=tiny, max_strength=bad)
    artifacts.save(caa(tiny, torch.ones(tiny.info.hidden_size)), tmp_path / "m.safetensors")
    for text in ("Infinity", "NaN", '"big"', "-2"):  # Python's json reads Infinity and NaN
        (tmp_path / "controllers.json").write_text(f'{{"m": {{"max_strength": {text}}}}}')
        with pytest.raises(ArtifactError, match="max_strength must be a finite, positive"):
            ControllerRegistry.from_dir(tmp_path, lm=tiny)


# -- 5: a server-side default cap on max_tokens ---------------------------------------------------
def test_requests_without_max_tokens_get_the_default_cap(url: str) -> None:
    chat = post(url, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 5  # --default-max-tokens
    assert chat.json()["choices"][0]["finish_reason"] == "length"
    null = post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": None,
                                         "ignore_eos": True})
    assert null.json()["usage"]["completion_tokens"] == 5
    absent = post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "ignore_eos": True})
    assert absent.json()["usage"]["completion_tokens"] == 16  # OpenAI's legacy default


def test_default_max_tokens_must_fit_the_limit() -> None:
    assert ServerConfig(served_name="m", max_tokens=8).default_tokens == 8
    assert ServerConfig(served_name="m").default_tokens == 256
    with pytest.raises(SteeringError, match="exceeds max_tokens"):
        ServerConfig(served_name="m", max_tokens=8, default_max_tokens=9)
    with pytest.raises(SteeringError, match="positive integer"):
        ServerConfig(served_name="m", max_tokens=0)


# -- 6: strict types ------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "5"), ("max_tokens", True), ("max_tokens", 5.0), ("n", "2"), ("n", True),
    ("temperature", "0.5"), ("temperature", True), ("top_p", "1"), ("seed", "3"),
    ("stream", "true"), ("stream", 1), ("ignore_eos", "yes"), ("echo", 0),
    ("steering", [{"controller": "positive", "strength": "4"}]),
    ("steering", [{"controller": "positive", "strength": True}]),
    ("stream_options", {"include_usage": "true"}), ("user", 5), ("prompt", [1.0, 2.0]),
])
def test_numbers_and_booleans_are_not_coerced(url: str, field: str, value: Any) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, field: value}
    err = error_of(post(url, "/v1/completions", body), 422)
    assert err["param"] is not None and err["param"].split(".")[0] == field, err


def test_ints_are_numbers_and_tiny_top_p_samples(url: str) -> None:
    r = post(url, "/v1/completions", {
        "model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 1, "top_p": 1,
        "steering": [{"controller": "positive", "strength": 4}]})
    assert r.status_code == 200, r.text
    for top_p in (1e-300, 5e-324, 1e-8):
        r = post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3,
                                          "temperature": 1.0, "top_p": top_p, "seed": 1})
        assert r.status_code == 200, r.text
        greedy = post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3,
                                               "temperature": 0})
        assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


# -- 7: a manifest names files in its folder only -------------------------------------------------
def test_manifest_files_outside_the_folder_are_refused(tiny: LoadedModel,
                                                       tmp_path: Path) -> None:
    root = tmp_path / "ctl"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "elsewhere.safetensors"
    artifacts.save(caa(tiny, torch.ones(tiny.info.hidden_size)), outside)
    artifacts.save(caa(tiny, torch.ones(tiny.info.hidden_size)), root / "sub" / "in.safetensors")
    for file in ("../elsewhere.safetensors", str(outside), "sub/../../elsewhere.safetensors"):
        (root / "controllers.json").write_text(json.dumps({"x": {"file": file}}))
        with pytest.raises(ArtifactError, match=r"outside the controllers folder.*allow-outside"):
            ControllerRegistry.from_dir(root, lm=tiny)
        assert ControllerRegistry.from_dir(root, lm=tiny, allow_outside=True).names == ["x"]
    (root / "controllers.json").write_text(json.dumps({"y": {"file": "sub/in.safetensors"}}))
    assert ControllerRegistry.from_dir(root, lm=tiny).names == ["y"]  # a subfolder is inside
    (root / "controllers.json").write_text(json.dumps({"z": {"file": 5}}))
    with pytest.raises(ArtifactError, match="file must be a file name"):
        ControllerRegistry.from_dir(root, lm=tiny)


# -- 8: bodies that cannot be parsed --------------------------------------------------------------
def test_deeply_nested_and_undecodable_bodies_get_a_message(url: str) -> None:
    for depth in (5_000, 100_000):
        body = (b'{"model": "tiny", "prompt": "x", "user": ' + b"[" * depth + b"]" * depth
                + b"}")
        err = error_of(post(url, "/v1/completions", body), 400)
        assert "too deeply" in err["message"] and err["code"] == "invalid_body"
    r = post(url, "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}')
    assert r.status_code in (400, 422) and r.json()["error"]["message"].strip(), r.text
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200  # and it still serves


# -- 10: counts and sizes before tokenization, tokenization off the event loop -------------------
def test_oversized_prompts_are_refused_before_tokenization(server: tuple[str, Any]) -> None:
    url, counting = server
    before = counting.calls
    many = post(url, "/v1/completions", {"model": "tiny", "prompt": ["a"] * 170_000,
                                         "max_tokens": 1})
    assert "170000 prompt(s) x n=1" in error_of(many, 400)["message"]
    huge = post(url, "/v1/completions", {"model": "tiny", "prompt": "x" * 1_000_000,
                                         "max_tokens": 1})
    assert error_of(huge, 400)["code"] == "context_length_exceeded"
    ids = post(url, "/v1/completions", {"model": "tiny", "prompt": [5] * 100_000,
                                        "max_tokens": 1})
    assert error_of(ids, 400)["code"] == "context_length_exceeded"
    chat = post(url, "/v1/chat/completions", {
        "model": "tiny", "max_tokens": 1,
        "messages": [{"role": "user", "content": "x"}] * 20_000})
    assert error_of(chat, 422)["param"] == "messages"  # the schema's cap, before validation
    chat = post(url, "/v1/chat/completions", {
        "model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}] * 100})
    assert error_of(chat, 400)["param"] == "messages"  # more than 60 prompt tokens can hold
    parts = post(url, "/v1/chat/completions", {"model": "tiny", "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "text", "text": ""}] * 200}] * 40})
    assert "at most 4096 per request" in error_of(parts, 422)["message"]
    floats = post(url, "/v1/completions", {"model": "tiny", "prompt": [1.5] * 150_000,
                                           "max_tokens": 1})
    err = error_of(floats, 422)  # one error for the first bad item, not one per item
    assert "prompt[0] is a float" in err["message"] and err["message"].count("prompt") < 5
    late = post(url, "/v1/completions", {"model": "tiny", "prompt": ["a"] * 1000 + [3],
                                         "max_tokens": 1})
    assert "prompt[1000] is not a string" in error_of(late, 422)["message"]
    long_chat = post(url, "/v1/chat/completions", {
        "model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "y" * 9000}]})
    assert error_of(long_chat, 400)["code"] == "context_length_exceeded"
    assert counting.calls == before  # none of them reached the tokenizer
    ok = post(url, "/v1/completions", {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 1})
    assert ok.status_code == 200
    assert counting.calls == before + 2
    loop_thread = "steerlab-http"  # background() runs uvicorn's event loop on this thread
    assert loop_thread not in counting.threads[-2:]


# -- 11: strengths of one controller add up -------------------------------------------------------
def test_the_sum_of_strengths_per_controller_is_bounded(url: str,
                                                        registry: ControllerRegistry) -> None:
    eight = [{"controller": "positive", "strength": 8}] * 3
    err = error_of(post(url, "/v1/completions", {"model": "tiny", "prompt": "hi",
                                                 "max_tokens": 2, "steering": eight}), 400)
    assert "add up to |strength| 24" in err["message"] and err["code"] == "invalid_steering"
    # two names of one file are one controller: +6 and -6 is 12 > 10
    both = [{"controller": "positive", "strength": 6}, {"controller": "negative",
                                                        "strength": -6}]
    err = error_of(post(url, "/v1/completions", {"model": "tiny", "prompt": "hi",
                                                 "max_tokens": 2, "steering": both}), 400)
    assert "'positive' / 'negative'" in err["message"]
    fits = [{"controller": "positive", "strength": 5}, {"controller": "negative",
                                                        "strength": -5}]
    assert post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2,
                                         "steering": fits}).status_code == 200
    big = ControllerRegistry({"m": ServedController(
        "m", registry.get("positive").controller, Path("m"), max_strength=8)}, max_steers=8)
    with pytest.raises(SteeringError, match="8 entries"):
        big.resolve([SteeringSpec("m", 8.0)] * 8)
    assert len(big.resolve([SteeringSpec("m", 1.0)] * 8)) == 8


# -- 13: the API docs need the key too ------------------------------------------------------------
def test_docs_and_openapi_need_the_key(url: str) -> None:
    for path in ("/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.get(f"{url}/openapi.json", headers=AUTH).status_code == 200
    assert httpx.get(f"{url}/docs", headers=AUTH).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
