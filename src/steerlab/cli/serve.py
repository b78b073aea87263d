"""``steerlab serve``: the OpenAI-compatible server with per-request steering."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from steerlab.cli import common
from steerlab.cli.common import ModelOption, fail
from steerlab.errors import SteeringError, SteerlabError

if TYPE_CHECKING:
    from steerlab.serve.registry import SteeringSpec

console = Console(stderr=True)


def parse_default_steering(items: list[str] | None) -> tuple[SteeringSpec, ...]:
    """``--default-steering NAME[:STRENGTH[:SCOPE]]`` (repeatable; an empty STRENGTH is the
    controller's default: ``mood::all``) into the server's steering entries."""
    import math

    from steerlab.scope import parse_scope
    from steerlab.serve.registry import SteeringSpec

    out = []
    for item in items or []:
        name, _, rest = item.partition(":")
        strength_text, _, scope = rest.partition(":")
        if not name.strip():
            raise SteeringError(f"--default-steering {item!r}: give NAME[:STRENGTH[:SCOPE]]")
        strength = None
        if strength_text.strip():
            try:
                strength = float(strength_text)
            except ValueError:
                strength = math.nan
            if not math.isfinite(strength):
                raise SteeringError(f"--default-steering {item!r}: the strength must be a "
                                    f"finite number, got {strength_text!r}")
        if scope:
            scope = str(parse_scope(scope))
        out.append(SteeringSpec(name.strip(), strength, scope or None))
    return tuple(out)


def serve_command(
    model: ModelOption = "smollm2-135m",
    controllers: Annotated[Path | None, typer.Option(
        help="folder of controllers: *.safetensors artifacts and *.gguf control vectors, "
             "optionally with controllers.json (names, default strengths and scopes)")] = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8000,
    served_name: Annotated[str | None, typer.Option(
        help="model id clients send (default: the model name)")] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar="STEERLAB_API_KEY", help="bearer token required on /v1 (env STEERLAB_API_KEY)",
        show_default=False)] = None,
    max_batch: Annotated[int, typer.Option(help="rows decoded together at most")] = 32,
    max_queue: Annotated[int, typer.Option(help="waiting requests before 429")] = 128,
    max_tokens: Annotated[int, typer.Option(help="largest max_tokens per request")] = 512,
    default_max_tokens: Annotated[int | None, typer.Option(
        help="max_tokens of a request that sends none (chat) or null (default: 256, or "
             "--max-tokens if lower; legacy completions without the field get OpenAI's 16)",
        show_default=False)] = None,
    max_prompt_tokens: Annotated[int, typer.Option(help="longest prompt in tokens")] = 2048,
    max_n: Annotated[int, typer.Option(help="most choices per request")] = 8,
    max_strength: Annotated[float, typer.Option(
        help="largest |strength| for controllers without their own max_strength")] = 64.0,
    max_steers: Annotated[int, typer.Option(help="most steering entries per request")] = 8,
    max_prefill_tokens: Annotated[int, typer.Option(
        help="padded prompt tokens pre-filled per step at most")] = 4096,
    strict: Annotated[bool, typer.Option(
        help="refuse artifacts fitted on another model id (shapes are always checked)")] = True,
    strict_controllers: Annotated[bool, typer.Option(
        help="refuse to start when a controller file is invalid (default: skip it with a "
             "warning naming the file and the reason)")] = False,
    allow_outside: Annotated[bool, typer.Option(
        help="let controllers.json name files outside the controllers folder")] = False,
    default_steering: Annotated[list[str] | None, typer.Option(
        help="steering of requests that send no steering field, NAME[:STRENGTH[:SCOPE]] "
             "(repeatable; entries add up), for clients that cannot add body fields such as "
             "lm-evaluation-harness; a request sending \"steering\": [] is unsteered",
        show_default=False)] = None,
    log_prompts: Annotated[bool, typer.Option(help="also log prompt text")] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads")] = None,
    device: Annotated[str, typer.Option(help="torch device (cpu, cuda, cuda:1, ...)")] = "cpu",
    dtype: Annotated[str, typer.Option(help="weights dtype: float32, bfloat16, float16")] = (
        "float32"),
    backend: Annotated[str, typer.Option(
        help="steerlab (its own engine) or vllm (vLLM's OpenAI server with steerlab's plugin, "
             "from .venv-vllm; see docs/vllm.md)")] = "steerlab",
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API; each request picks its own steering
    in the body field "steering": [{"controller": NAME, "strength": S, "scope": SCOPE}]."""
    if backend != "steerlab":
        from steerlab.vllm_plugin.cli import exec_vllm

        exec_vllm(backend, model=model, controllers=controllers, host=host, port=port,
                  served_name=served_name, api_key=api_key, max_batch=max_batch,
                  max_prompt_tokens=max_prompt_tokens, max_strength=max_strength,
                  max_steers=max_steers, strict=strict, dtype=dtype)
        return
    try:
        import dataclasses

        import torch
        import uvicorn

        from steerlab.serve import logs
        from steerlab.serve.app import ServerConfig, create_app
        from steerlab.serve.engine import EngineConfig
        from steerlab.serve.registry import ControllerRegistry, check_max_strength

        # the options first, before minutes of loading (each raises a SteerlabError)
        check_max_strength(max_strength, "--max-strength")
        config = ServerConfig(
            served_name=served_name or model, api_key=api_key or None,
            max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, max_n=max_n,
            default_max_tokens=default_max_tokens, log_prompts=log_prompts,
            default_steering=parse_default_steering(default_steering),
            engine=EngineConfig(max_batch=max_batch, max_queue=max_queue,
                                max_prefill_tokens=max_prefill_tokens))
        registry = ControllerRegistry({}, max_steers=max_steers)
        if threads is not None:
            torch.set_num_threads(threads)
        logs.configure(log_level)
        lm = common._load(model, announce=False, out=console, device=device, dtype=dtype)
        if controllers is not None:
            registry = ControllerRegistry.from_dir(
                controllers, lm.info, strict=strict, max_strength=max_strength,
                max_steers=max_steers, lm=lm, strict_controllers=strict_controllers,
                allow_outside=allow_outside)
        for path, reason in registry.skipped:  # the reason names the file, mostly first
            text = reason if str(path) in reason else f"{path}: {reason}"
            console.print(f"[yellow]warning:[/] skipped {escape(text.replace(chr(10), ' '))}",
                          soft_wrap=True)
        config = dataclasses.replace(config, served_name=served_name or lm.info.model_id)
        app = create_app(lm, registry, config)
        names = ", ".join(registry.names) or "none"
        console.print(f"[green]serving[/] {config.served_name} on http://{host}:{port}/v1 "
                      f"(controllers: {names}; auth: {'on' if api_key else 'off'})")
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=False)
    except SteerlabError as exc:
        fail(exc, out=console, collapse_spaces=False)
