"""``steerlab serve`` as a real process: start-up, one steered request, logs, shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from steerlab import artifacts
from steerlab.methods.caa import CAA
from steerlab.models import load_model
from steerlab.sites import Site
from tiny_models import build_tiny_model, save_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("qwen2", 5, tmp_path_factory.mktemp("tiny-qwen2-serve"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(folder: Path, controllers: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, STEERLAB_API_KEY="k1")
    return subprocess.Popen(
        [sys.executable, "-m", "steerlab.cli", "serve", "--model", str(folder),
         "--controllers", str(controllers), "--port", str(port), "--threads", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_serve_command_end_to_end(folder: Path, tmp_path: Path) -> None:
    info = load_model(str(folder)).info
    c = CAA(layers=[1], scope="all")
    c.set_vectors({Site("resid_post", 1): torch.randn(info.hidden_size)})
    c.model_info = info
    artifacts.save(c, tmp_path / "up.safetensors")
    flat = CAA(layers=[1], scope="all")  # a 2-D "vector": loads, but cannot steer
    flat.set_vectors({Site("resid_post", 1): torch.randn(2, info.hidden_size)})
    flat.model_info = info
    artifacts.save(flat, tmp_path / "flat.safetensors")
    port = free_port()
    proc = serve(folder, tmp_path, port, "--max-tokens", "16")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1",
                               max_retries=0)
        assert [x["id"] for x in client.get("/steering", cast_to=dict)["data"]] == ["up"]
        r = client.chat.completions.create(
            model=str(folder), messages=[{"role": "user", "content": "private words"}],
            max_tokens=6, temperature=0, extra_body={"steering": [{"controller": "up",
                                                                    "strength": 3}]})
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="at most 16"):
            client.completions.create(model=str(folder), prompt="x", max_tokens=17)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # the invalid controller was skipped at start-up, with the file and the reason
    warning = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert "flat.safetensors" in warning and "shape (2, 32)" in warning
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    requests = [x for x in records if x.get("event") == "request"]
    assert [x["status"] for x in requests] == [200]
    assert requests[0]["steering"] == [{"controller": "up", "method": "caa", "strength": 3.0,
                                        "scope": "all"}]
    assert "private words" not in err
    assert any(x.get("event") == "shutdown" for x in records)


def test_serve_refuses_controllers_of_another_model(folder: Path, tmp_path: Path) -> None:
    other = build_tiny_model("llama", seed=1)
    c = CAA(layers=[1])
    c.set_vectors({Site("resid_post", 1): torch.randn(32)})
    c.model_info = type(other.info)("some-other-model", "LlamaForCausalLM", 64, 2, False)
    artifacts.save(c, tmp_path / "foreign.safetensors")
    proc = serve(folder, tmp_path, free_port(), "--strict-controllers")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "some-other-model" in err and str(folder) in err.replace("\n", "")


@pytest.mark.parametrize(("options", "needle"), [
    (["--max-strength", "nan"], "--max-strength must be a finite, positive number"),
    (["--max-strength", "inf"], "--max-strength must be a finite, positive number"),
    (["--max-strength", "-inf"], "--max-strength must be a finite, positive number"),
    (["--max-strength", "0"], "--max-strength must be a finite, positive number"),
    (["--max-tokens", "8", "--default-max-tokens", "9"], "default_max_tokens (9) exceeds"),
    (["--max-steers", "0"], "max_steers must be a positive integer"),
])
def test_serve_refuses_bad_options_in_one_line(tmp_path: Path, options: list[str],
                                                needle: str) -> None:
    """Checked before the model loads: a one-line error and exit status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "steerlab.cli", "serve", "--model", str(tmp_path / "absent"),
         *options], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert "Traceback" not in proc.stderr
