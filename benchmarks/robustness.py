"""Robustness of the server, the artifacts and the command line against bad input.

Runs every bad input of the hardening issue (and a few of the same families) and prints one
table row per input: what was sent, what the project's rules expect, what was observed, and
the verdict. The rules: bad input gets a clear error and loses nothing; a server error is an
OpenAI-shaped 4xx with a message, never a 500 (nor a 200 carrying an error); artifacts are
checked when they are loaded, not when they are used; a CLI error is one line with exit
status 2, never a traceback.

Server inputs go to a real uvicorn server on 127.0.0.1 (in a thread of this process, on the
tests' tiny random llama), started from a controllers folder that holds good and bad
artifacts; CLI inputs run through ``typer.testing.CliRunner`` on ``steerlab.cli:app``. It
takes well under a minute on two cores. Exit status 1 if any row is a defect.

Run: ``python benchmarks/robustness.py``
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from steerlab import artifacts  # noqa: E402
from steerlab.cli import app as cli_app  # noqa: E402
from steerlab.errors import ArtifactError, SteerlabError  # noqa: E402
from steerlab.methods.base import Controller, StepContext  # noqa: E402
from steerlab.methods.caa import CAA  # noqa: E402
from steerlab.serve.app import ServerConfig, create_app  # noqa: E402
from steerlab.serve.background import background  # noqa: E402
from steerlab.serve.engine import EngineConfig  # noqa: E402
from steerlab.serve.registry import ControllerRegistry, ServedController  # noqa: E402
from steerlab.sites import Site  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

KEY = "robustness-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
Check = Callable[[], tuple[str, bool]]
ROWS: list[tuple[str, str, str, str, str]] = []  # item, input, expected, observed, verdict


def row(item: str, what: str, expected: str, check: Check) -> None:
    try:
        observed, ok = check()
    except Exception as exc:  # a crash is a defect, reported, not raised
        observed, ok = f"crashed: {type(exc).__name__}: {exc}"[:160], False
    ROWS.append((item, what, expected, observed, "ok" if ok else "DEFECT"))


def clip(text: object, n: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# -- artifacts ------------------------------------------------------------------------------------
def caa(info: Any, vector: torch.Tensor, layer: int = 1) -> CAA:
    c = CAA(layers=[layer], scope="all")
    c.vectors = {Site("resid_post", layer): vector}
    c.sites = [Site("resid_post", layer)]
    c.model_info = info
    return c


def write_meta(path: Path, meta: Any, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    save_file(tensors if tensors is not None else {"resid_post.1": torch.ones(32)}, str(path),
              metadata={"steerlab": json.dumps(meta)})
    return path


def with_field(meta: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(meta))
    where, _, leaf = key.rpartition(".")
    (out[where] if where else out)[leaf] = value
    return out


MALFORMED: list[tuple[str, Any]] = [
    ("format_version", "abc"), ("format_version", 1.5), ("format_version", True),
    ("format_version", -1), ("method", 5), ("method", ""), ("sites", 8),
    ("sites", "resid_post.1"), ("sites", []), ("sites", [1]), ("sites", ["resid_mid.1"]),
    ("model", "tiny-llama"), ("model", [1, 2]), ("model.hidden_size", "abc"),
    ("model.hidden_size", True), ("model.hidden_size", 0), ("model.num_layers", "2"),
    ("model.model_id", 5), ("model.is_chat", "yes"), ("fit", [1, 2]), ("fit", "fast"),
    ("hyperparameters", [1]), ("hyperparameters", "layers=1"), ("data_fingerprint", 5),
    ("library_version", 1), ("created", {"y": 2026}),
]


def cli(args: list[str]) -> tuple[int, list[str], str]:
    result = CliRunner(env={"COLUMNS": "10000"}).invoke(cli_app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines, result.output


def one_line_exit2(args: list[str], needle: str) -> tuple[str, bool]:
    code, lines, output = cli(args)
    ok = (code == 2 and len(lines) == 1 and lines[0].startswith("error:")
          and needle in lines[0] and "Traceback" not in output)
    return f"exit {code}, {len(lines)} line(s): {clip(lines[0] if lines else '')}", ok


class Raising(Controller):
    """A controller whose steer raises (as a width mismatch would)."""

    method = "raising"

    def __init__(self) -> None:
        super().__init__()
        self.sites = [Site("resid_post", 0)]

    def steer(self, site: Site, h: torch.Tensor, strength: torch.Tensor,
              ctx: StepContext) -> torch.Tensor:
        raise RuntimeError("The size of tensor a (575) must match the size of tensor b (576)")

    def hyperparameters(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        self.sites = list(sites)


class CountingTokenizer:
    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def main() -> int:
    torch.set_num_threads(1)
    # the skipped controllers' warnings are rows of the table, not lines on stderr
    logging.getLogger("steerlab.serve").setLevel(logging.ERROR)
    started = time.perf_counter()
    lm = build_tiny_model("llama", seed=3, chat=True)
    d = lm.info.hidden_size
    tmp = Path(tempfile.mkdtemp(prefix="robustness-"))
    ctl = tmp / "controllers"
    ctl.mkdir()
    g = torch.Generator().manual_seed(0)
    artifacts.save(caa(lm.info, torch.randn(d, generator=g)), ctl / "mood.safetensors")
    artifacts.save(caa(lm.info, torch.randn(d, generator=g), 0), ctl / "topic.safetensors")
    artifacts.save(caa(lm.info, torch.randn(2, d, generator=g)), ctl / "flat.safetensors")
    artifacts.save(caa(lm.info, torch.tensor(2.0)), ctl / "scalar.safetensors")
    artifacts.save(caa(lm.info, torch.randn(d - 1, generator=g)), ctl / "short.safetensors")
    good_meta = artifacts.read_metadata(ctl / "mood.safetensors")
    write_meta(ctl / "header.safetensors", with_field(good_meta, "model.hidden_size", "abc"))
    (ctl / "controllers.json").write_text(json.dumps({
        "positive": {"file": "mood.safetensors", "strength": 4.0, "max_strength": 10},
        "negative": {"file": "mood.safetensors", "strength": -4.0, "max_strength": 10}}))

    # -- 1: controllers checked at start-up ---------------------------------------------------
    registry = ControllerRegistry.from_dir(ctl, lm=lm, max_strength=8)
    skipped = {p.name: why for p, why in registry.skipped}
    for name, what, needle in (("flat.safetensors", "a 2-D vector", "shape (2, 32)"),
                               ("scalar.safetensors", "a scalar vector", "shape ()"),
                               ("short.safetensors", "a vector one short of the width",
                                "shape (31,)"),
                               ("header.safetensors", "a header with hidden_size 'abc'",
                                "model.hidden_size")):
        row("1/12", f"controllers folder holding {what} ({name})",
            "skipped at start-up, the warning names the file and the reason",
            lambda name=name, needle=needle: (  # type: ignore[misc]
                clip(skipped.get(name, "not skipped")), needle in skipped.get(name, "")))

    def strict() -> tuple[str, bool]:
        try:
            ControllerRegistry.from_dir(ctl, lm=lm, strict_controllers=True)
        except ArtifactError as exc:
            return f"ArtifactError: {clip(exc)}", True
        return "started", False

    row("1", "the same folder with --strict-controllers", "refuses to start (ArtifactError)",
        strict)

    def library_load() -> tuple[str, bool]:
        try:
            artifacts.load(ctl / "flat.safetensors", lm.info)
        except ArtifactError as exc:
            return f"ArtifactError: {clip(exc, 70)}", True
        return "loaded", False

    row("1", "artifacts.load of the 2-D vector", "ArtifactError at load", library_load)

    def hand_built() -> tuple[str, bool]:
        reg = ControllerRegistry({"r": ServedController("r", Raising(), Path("r"))})
        try:
            create_app(lm, reg, ServerConfig(served_name="tiny"))
        except ArtifactError as exc:
            return f"ArtifactError: {clip(exc, 70)}", True
        return "app created", False

    row("1", "create_app with a controller whose dry steer raises", "refuses (ArtifactError)",
        hand_built)

    # -- 7: manifest paths ----------------------------------------------------------------------
    outside_root = tmp / "outside"
    outside_root.mkdir()
    artifacts.save(caa(lm.info, torch.ones(d)), tmp / "elsewhere.safetensors")
    for file in ("../elsewhere.safetensors", str(tmp / "elsewhere.safetensors")):
        def manifest(file: str = file, allow: bool = False) -> tuple[str, bool]:
            (outside_root / "controllers.json").write_text(json.dumps({"x": {"file": file}}))
            try:
                reg = ControllerRegistry.from_dir(outside_root, lm=lm, allow_outside=allow)
            except ArtifactError as exc:
                return clip(exc, 80), not allow and "--allow-outside" in str(exc)
            return f"loaded {reg.names}", allow and reg.names == ["x"]

        row("7", f"controllers.json naming {file if file.startswith('..') else 'an absolute path'}",
            "refused, saying why and naming --allow-outside", manifest)
        row("7", "  ... with --allow-outside", "loaded",
            lambda manifest=manifest: manifest(allow=True))  # type: ignore[misc]

    # -- 3 (library): non-finite bounds ---------------------------------------------------------
    def bound(value: float) -> tuple[str, bool]:
        try:
            ControllerRegistry.from_dir(ctl, lm=lm, max_strength=value)
        except SteerlabError as exc:
            return clip(exc), "finite" in str(exc)
        return "accepted", False

    row("3", "ControllerRegistry.from_dir(max_strength=nan)", "refused", lambda: bound(math_nan))
    row("3", "ControllerRegistry.from_dir(max_strength=inf)", "refused", lambda: bound(math_inf))

    # -- CLI: 3 and 12 --------------------------------------------------------------------------
    for value in ("nan", "inf", "-inf"):
        row("3", f"steerlab serve --max-strength {value}", "one-line error, exit 2",
            lambda value=value: one_line_exit2(  # type: ignore[misc]
                ["serve", "--model", str(tmp / "absent"), "--max-strength", value],
                "--max-strength must be a finite"))
    for i, (key, value) in enumerate(MALFORMED):
        path = write_meta(tmp / f"malformed{i}.safetensors", with_field(good_meta, key, value))

        def header(path: Path = path, key: str = key) -> tuple[str, bool]:
            seen = []
            for read in (artifacts.read_metadata, artifacts.load):
                try:
                    read(path)
                    seen.append("accepted")
                except ArtifactError as exc:
                    seen.append("ArtifactError" if key in str(exc) else f"unnamed: {exc}")
            code, lines, output = cli(["inspect", str(path)])
            inspect_ok = code == 2 and len(lines) == 1 and key in lines[0] and \
                "Traceback" not in output
            seen.append(f"inspect exit {code} ({len(lines)} line)")
            return ", ".join(seen), seen[:2] == ["ArtifactError"] * 2 and inspect_ok

        row("12", f"header {key} = {value!r}",
            "read_metadata/load: ArtifactError naming it; inspect: exit 2, 1 line", header)
    bad_hp = write_meta(tmp / "hp.safetensors",
                        with_field(good_meta, "hyperparameters", {"layers": "abc"}))
    row("12", "export-gguf of hyperparameters {'layers': 'abc'}", "one-line error, exit 2",
        lambda: one_line_exit2(["export-gguf", str(bad_hp), str(tmp / "o.gguf")],
                               "hyper-parameters"))
    row("12", "export-gguf of a header with hidden_size 'abc'", "one-line error, exit 2",
        lambda: one_line_exit2(["export-gguf", str(ctl / "header.safetensors"),
                                str(tmp / "o.gguf")], "model.hidden_size"))

    # -- the server -----------------------------------------------------------------------------
    config = ServerConfig(served_name="tiny", api_key=KEY, max_tokens=64, max_prompt_tokens=200,
                          default_max_tokens=8, max_n=8,
                          engine=EngineConfig(max_batch=8, max_queue=32))
    application = create_app(lm, registry, config)
    counting = CountingTokenizer(application.state.server.tokenizer)
    application.state.server.tokenizer = counting
    with background(application) as url, httpx.Client(timeout=120) as http:
        def send(path: str, body: Any, *, raw: bool = False, auth: bool = True) -> httpx.Response:
            headers = {**(AUTH if auth else {}), "Content-Type": "application/json"}
            content = body if raw else json.dumps(body).encode()
            return http.post(f"{url}{path}", content=content, headers=headers)

        def answer(path: str, body: Any, status: int, needle: str = "", *, raw: bool = False,
                   stream: bool = False) -> tuple[str, bool]:
            if stream:
                with http.stream("POST", f"{url}{path}", json=body, headers=AUTH) as r:
                    text = "".join(r.iter_text())
                    code = r.status_code
            else:
                r = send(path, body, raw=raw)
                code, text = r.status_code, r.text
            try:
                err = json.loads(text).get("error") if code != 200 else None
            except json.JSONDecodeError:
                err = None
            message = (err or {}).get("message", "") if isinstance(err, dict) else ""
            shaped = code == 200 or bool(message.strip())
            observed = f"{code} {clip(message, 70)}" if code != 200 else "200"
            return observed, code == status and shaped and needle in (message or text)

        completion = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}

        for name in ("flat", "scalar", "short"):
            for stream in (False, True):
                row("1", f"request steering {name!r} ({'streamed' if stream else 'plain'})",
                    "400 unknown controller (not 500, not a 200 with an error event)",
                    lambda name=name, stream=stream: answer(  # type: ignore[misc]
                        "/v1/completions", {**completion, "stream": stream,
                                            "steering": [{"controller": name}]},
                        400, "unknown controller"))
        row("3", "steering strength 1e30", "400 out of bounds",
            lambda: answer("/v1/completions", {**completion, "steering": [
                {"controller": "positive", "strength": 1e30}]}, 400, "out of bounds"))

        def tokens(body: dict[str, Any], path: str, want: int) -> tuple[str, bool]:
            r = send(path, {**body, "ignore_eos": True})
            if r.status_code != 200:
                return f"{r.status_code} {clip(r.text, 60)}", False
            got = r.json()["usage"]["completion_tokens"]
            return f"200, {got} tokens", got == want

        row("5", "chat without max_tokens", "stops at --default-max-tokens (8)",
            lambda: tokens(chat, "/v1/chat/completions", 8))
        row("5", "completion with max_tokens null", "stops at --default-max-tokens (8)",
            lambda: tokens({"model": "tiny", "prompt": "hi", "max_tokens": None},
                           "/v1/completions", 8))
        row("5", "completion without max_tokens", "OpenAI's 16",
            lambda: tokens({"model": "tiny", "prompt": "hi"}, "/v1/completions", 16))

        odd: list[tuple[str, object]] = [
            ("max_tokens", "5"), ("max_tokens", True), ("max_tokens", 5.0), ("temperature", "1"),
            ("n", True), ("stream", "true"), ("seed", "1"), ("top_p", True)]
        for name, odd_value in odd:
            row("6", f"{name}: {odd_value!r}", "422 naming the field", functools.partial(
                answer, "/v1/completions", {**completion, name: odd_value}, 422, name))
        row("6", "temperature: 1 (an int where a number is expected)", "200",
            lambda: answer("/v1/completions", {**completion, "temperature": 1}, 200))
        row("6", "top_p: 1e-300 with temperature 1", "200 (samples the top token)",
            lambda: answer("/v1/completions", {**completion, "temperature": 1.0,
                                                "top_p": 1e-300}, 200))

        for depth in (5_000, 100_000):
            nested = (b'{"model": "tiny", "prompt": "x", "user": ' + b"[" * depth
                      + b"]" * depth + b"}")
            row("8", f"JSON nested {depth} levels deep", "400 with a message",
                lambda nested=nested: answer(  # type: ignore[misc]
                    "/v1/completions", nested, 400, "too deeply", raw=True))
        row("8", "a body that is not UTF-8", "4xx with a message",
            lambda: (lambda o: (o[0], o[0][:1] == "4" and len(o[0]) > 4))(
                answer("/v1/completions", b'{"model": "tiny", "prompt": "\xff"}', 0, raw=True)))

        def before_tokenizing(body: dict[str, Any], path: str, status: int,
                              needle: str) -> tuple[str, bool]:
            calls = counting.calls
            observed, ok = answer(path, body, status, needle)
            return observed, ok and counting.calls == calls

        hostile = [
            ("170,000 one-character prompts", "/v1/completions",
             {"model": "tiny", "prompt": ["a"] * 170_000, "max_tokens": 1}, 400, "x n=1"),
            ("one 1 MB text prompt", "/v1/completions",
             {"model": "tiny", "prompt": "x" * 1_000_000, "max_tokens": 1}, 400, "characters"),
            ("20,000 chat messages", "/v1/chat/completions",
             {"model": "tiny", "max_tokens": 1,
              "messages": [{"role": "user", "content": "x"}] * 20_000}, 422, "messages"),
            ("a prompt of 200,000 floats", "/v1/completions",
             {"model": "tiny", "prompt": [1.5] * 200_000, "max_tokens": 1}, 422, "prompt[0]"),
            ("100,000 token ids", "/v1/completions",
             {"model": "tiny", "prompt": [5] * 100_000, "max_tokens": 1}, 400, "at most"),
        ]
        for what, route, body, status, needle in hostile:
            row("10", what, f"{status} before any tokenization",
                functools.partial(before_tokenizing, body, route, status, needle))

        def health_under_fire() -> tuple[str, bool]:
            data = json.dumps(hostile[1][2]).encode()
            stop = threading.Event()

            def fire() -> None:
                with httpx.Client(timeout=120) as h:
                    for _ in range(8):
                        if stop.is_set():
                            return
                        h.post(f"{url}/v1/completions", content=data,
                               headers={**AUTH, "Content-Type": "application/json"})

            t = threading.Thread(target=fire)
            t.start()
            worst = 0.0
            for _ in range(20):
                t0 = time.perf_counter()
                ok = http.get(f"{url}/health").status_code == 200
                worst = max(worst, time.perf_counter() - t0)
                time.sleep(0.02)
            stop.set()
            t.join(120)
            return f"200, worst latency {worst:.3f} s", ok and worst < 2.0

        row("10", "/health while 1 MB prompts arrive", "answers at once (< 2 s)",
            health_under_fire)

        row("11", "8 entries of one controller at its bound 8 (effective 64)",
            "400: the entries add up over the bound",
            lambda: answer("/v1/completions", {**completion, "steering": [
                {"controller": "topic", "strength": 8}] * 8}, 400, "add up"))
        row("11", "positive 6 + negative -6 (one file, bound 10)", "400",
            lambda: answer("/v1/completions", {**completion, "steering": [
                {"controller": "positive", "strength": 6},
                {"controller": "negative", "strength": -6}]}, 400, "add up"))
        row("11", "topic 4 + topic 4 (bound 8)", "200",
            lambda: answer("/v1/completions", {**completion, "steering": [
                {"controller": "topic", "strength": 4}] * 2}, 200))

        def get(route: str, want: int, headers: dict[str, str]) -> tuple[str, bool]:
            r = http.get(f"{url}{route}", headers=headers)
            return str(r.status_code), r.status_code == want

        for route in ("/docs", "/openapi.json"):
            row("13", f"GET {route} without the key", "401", functools.partial(get, route, 401, {}))
            row("13", f"GET {route} with the key", "200", functools.partial(get, route, 200, AUTH))
        row("13", "GET /health without the key", "200", functools.partial(get, "/health", 200, {}))
        row("-", "a normal steered chat request after all that", "200",
            lambda: answer("/v1/chat/completions", {**chat, "max_tokens": 4, "steering": [
                {"controller": "positive"}]}, 200))

    shutil.rmtree(tmp, ignore_errors=True)
    defects = sum(1 for r in ROWS if r[4] != "ok")
    print("# robustness: bad inputs, what the rules expect, what happened")
    print()
    print("| item | input | expected | observed | verdict |")
    print("|---|---|---|---|---|")
    for item, what, expected, observed, verdict in ROWS:
        cells = [c.replace("|", "\\|") for c in (item, what, expected, observed, verdict)]
        print("| " + " | ".join(cells) + " |")
    print()
    print(f"{len(ROWS)} inputs, {defects} defects ({time.perf_counter() - started:.0f} s)")
    return 1 if defects else 0


math_nan, math_inf = float("nan"), float("inf")

if __name__ == "__main__":
    raise SystemExit(main())
