"""Commands on artifact files: ``inspect`` (what one describes) and the llama.cpp
control-vector bridge, ``export-gguf`` and ``import-gguf``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from steerlab.cli import common
from steerlab.cli.common import console, fail, load_artifact
from steerlab.errors import SteerlabError


def inspect(artifact: Annotated[Path, typer.Argument(help="a .safetensors artifact")]) -> None:
    """Show what an artifact describes: method, sites, model, data, fit figures."""
    try:
        from safetensors import safe_open

        from steerlab.artifacts import read_metadata

        meta = read_metadata(artifact)
        table = Table(title=str(artifact), show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for key in ("method", "sites", "hyperparameters", "model", "data_fingerprint", "fit",
                    "library_version", "created"):
            value = meta.get(key)
            table.add_row(key, value if isinstance(value, str) else json.dumps(value))
            if key == "hyperparameters":
                fit_meta = meta.get("fit")
                chosen = fit_meta.get("preset") if isinstance(fit_meta, dict) else None
                table.add_row("preset", json.dumps(chosen) if chosen else "none")
        with safe_open(str(artifact), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        table.add_row("tensors", json.dumps(shapes))
        console.print(table)
    except SteerlabError as exc:
        fail(exc)


def export_gguf(
    artifact: Annotated[Path, typer.Argument(help="a CAA/ActAdd artifact")],
    out: Annotated[Path, typer.Argument(help="output .gguf control vector")],
    scale: Annotated[float, typer.Option(help="multiply the vectors by this")] = 1.0,
    force: Annotated[bool, typer.Option(
        help="export a controller whose scope is not 'all' (llama.cpp applies a control "
             "vector at every token)")] = False,
) -> None:
    """Export a linear artifact to llama.cpp's GGUF control-vector layout."""
    try:
        from steerlab.artifacts import export_gguf as write_gguf

        controller = load_artifact(artifact)
        path = write_gguf(controller, out, scale=scale, force=force)
        if force and str(controller.default_scope) != "all":
            console.print(f"[yellow]warning:[/] {artifact} steers scope "
                          f"{controller.default_scope}; llama.cpp will add it at every token",
                          soft_wrap=True)
        console.print(f"[green]wrote[/] {path} (use with llama.cpp --control-vector)")
    except SteerlabError as exc:
        fail(exc)


def import_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="a llama.cpp control vector .gguf")],
    out: Annotated[Path, typer.Argument(help="output artifact (.safetensors)")],
    model: Annotated[str, typer.Option(help="model it is for (checked)")] = "smollm2-135m",
) -> None:
    """Import a llama.cpp GGUF control vector as a CAA artifact for a model (scope all, as
    llama.cpp applies it). The model's shape is read from its config; its weights are loaded
    only when the config cannot be read without them."""
    try:
        from steerlab import artifacts
        from steerlab.models import peek_model_info

        info = peek_model_info(model)
        if info is None:
            info = common._load(model).info
        controller = artifacts.import_gguf(gguf_file, info)
        console.print(f"[green]saved[/] {artifacts.save(controller, out)}")
    except SteerlabError as exc:
        fail(exc)
