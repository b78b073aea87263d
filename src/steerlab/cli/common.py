"""What every ``steerlab`` sub-command shares: the console, the one-line error exit, the
model option, loading a model or an artifact, and the argument checks run before a model
loads (so a bad flag fails in a second, not after minutes of loading)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from steerlab.errors import SteerlabError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from steerlab.methods.base import Controller
    from steerlab.models import LoadedModel, ModelInfo

console = Console()

DEMO_LAYER = 8
DEMO_STRENGTH = 3.5
DEMO_SCOPE = "all"

ModelOption = Annotated[str, typer.Option(help="model name, folder or .gguf")]
"""The ``--model`` option every model-loading command takes (default ``smollm2-135m``)."""

# CLI option name -> hyper-parameter name where they differ
_OPTION_HP = {"lam": "lambdas", "keep_k": "keep_K"}


def fail(exc: Exception | str, *, out: Console | None = None,
         collapse_spaces: bool = True) -> NoReturn:
    """Print ``error: <message>`` on one line (never wrapped, newlines folded), exit 2.

    ``collapse_spaces`` folds every run of white space into one space; without it only the
    newlines become spaces (``serve``'s message format)."""
    text = str(exc)
    message = " ".join(text.split()) if collapse_spaces else text.replace("\n", " ")
    (out or console).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


def _load(model: str, *, announce: bool = True, out: Console | None = None,
          **load_kw: Any) -> LoadedModel:
    """Load ``model`` (:func:`steerlab.models.load_model` with ``load_kw``) under a spinner on
    ``out``; with ``announce``, then print one line naming its architecture, depth, width and
    load time. Commands call it as ``common._load`` so that tests can stub it in one place."""
    import time

    from steerlab.models import load_model

    where = out or console
    if not announce:
        with where.status(f"loading {model} ..."):
            return load_model(model, **load_kw)
    with where.status(f"loading {model} (the first load converts and caches it)..."):
        start = time.perf_counter()
        lm = load_model(model, **load_kw)
    where.print(
        f"[green]loaded[/] {lm.info.model_id}: {lm.info.architecture}, {lm.info.num_layers} "
        f"layers, hidden {lm.info.hidden_size} ({time.perf_counter() - start:.1f} s)"
    )
    return lm


def check_artifacts(paths: Iterable[Path]) -> None:
    """Read each artifact's metadata, so a missing or broken file fails before the model
    loads."""
    from steerlab.artifacts import read_metadata

    for path in paths:
        read_metadata(path)


def load_artifact(path: Path, info: ModelInfo | None = None, *,
                  strict: bool = True) -> Controller:
    """Load the controller saved at ``path``; with ``info``, check that it fits that model
    (a different model id fails only when ``strict``)."""
    from steerlab import artifacts

    return artifacts.load(path, info, strict=strict)


def given_options(ctx: typer.Context) -> set[str]:
    """Hyper-parameter names the user gave on the command line (not left at defaults)."""
    out = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)  # typer's own (vendored) click enum: by name
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            out.add(_OPTION_HP.get(name, name))
    if "layers" in out:
        out.add("layer")
    return out


def parse_layers(text: str) -> list[int]:
    """``--layers 6,8,10`` as a list of block indices."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SteerlabError(f"--layers takes comma-separated block indices such as 8 or "
                            f"6,8,10; got {text!r}") from None
    if not out:
        raise SteerlabError("--layers is empty; give at least one block index")
    return out


def preflight_fit(model: str, method: str, data: str, layer_list: list[int], given: set[str],
                  *, scope: str, limit: int, out: Path, preset: str | None,
                  auto: bool = False) -> None:
    """Check ``fit``'s arguments before the model loads and activations are collected: the
    method, preset, scope, output path, data file and block range (from the model's config)."""
    from steerlab.autotune import takes_block
    from steerlab.data import load_dataset
    from steerlab.methods import METHODS
    from steerlab.models import model_shape
    from steerlab.scope import parse_scope

    if method not in METHODS:
        raise SteerlabError(f"unknown method {method!r}; use {', '.join(sorted(METHODS))}")
    if preset is not None:
        known = sorted(m for m, c in METHODS.items() if preset in c.presets)
        if method not in known:
            raise SteerlabError(f"no preset {preset!r} for {method}; it exists for "
                                f"{', '.join(known) or 'no method'}")
    if limit < 0:
        raise SteerlabError(f"--limit must be 0 (all pairs) or a positive count, got {limit}")
    parse_scope(scope)
    target = out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")
    for p in (out, target):
        if p.is_dir():
            raise SteerlabError(f"--out {p} is a directory; give a file name such as "
                                f"{p / 'controller.safetensors'}")
    if target.parent.exists() and not target.parent.is_dir():
        raise SteerlabError(f"--out: {target.parent} is not a directory")
    if data != "sentiment":
        load_dataset(data)
    # ITI reads every block unless --layers is given; the others use --layers (default 8),
    # except --auto, which picks its candidate blocks from the depth unless --layers is given
    if "layers" in given or (takes_block(method) and method != "iti" and not auto):
        shape = model_shape(model)
        if shape is not None:
            n = shape[0]
            bad = [k for k in layer_list if not -n <= k < n]
            if bad:
                raise SteerlabError(f"block(s) {bad} out of range: {model} has {n} blocks "
                                    f"(0 … {n - 1}, or negative from the end)")


def check_context(lm: LoadedModel, prompts: list[str], max_new_tokens: int) -> None:
    """Refuse prompts that with ``max_new_tokens`` would not fit the model's context (the
    model would otherwise return nothing, silently)."""
    from steerlab.data import Renderer

    config = lm.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if not limit:
        return
    renderer = Renderer(lm.tokenizer)
    for p in prompts:
        n = len(lm.tokenizer(renderer.prompt(p), add_special_tokens=False)["input_ids"])
        if n + max_new_tokens > int(limit):
            raise SteerlabError(
                f"a prompt of {n} tokens plus --max-new-tokens {max_new_tokens} exceeds "
                f"{lm.info.model_id}'s context of {limit} tokens; shorten it")
