"""``steerlab generate``: greedy generation from prompts, optionally steered by saved
artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steerlab.cli import common
from steerlab.cli.common import (
    ModelOption,
    check_artifacts,
    check_context,
    console,
    fail,
    load_artifact,
)
from steerlab.errors import SteerlabError


def generate(
    prompt: Annotated[list[str], typer.Argument(help="one or more prompts")],
    model: ModelOption = "smollm2-135m",
    steer: Annotated[
        list[Path] | None, typer.Option(help="artifact(s) to apply; repeat for several")
    ] = None,
    strength: Annotated[
        list[float] | None, typer.Option(help="strength per --steer (default: the one "
                                                 "fit --auto stored, else 1.0)")
    ] = None,
    scope: Annotated[str | None, typer.Option(help="token scope override")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    compare: Annotated[bool, typer.Option(help="also print the unsteered answer")] = False,
    strict: Annotated[bool, typer.Option(help="refuse artifacts fitted on another model id")] = (
        True
    ),
    max_strength: Annotated[float, typer.Option(
        help="refuse |strength| above this (the server's default bound)")] = 64.0,
) -> None:
    """Generate (greedy) from prompts, optionally steered by saved artifacts."""
    try:
        import math

        from steerlab.autotune import stored_strength
        from steerlab.runtime import Steer
        from steerlab.runtime import generate as run_generate
        from steerlab.scope import parse_scope

        if not math.isfinite(max_strength) or max_strength <= 0:
            raise SteerlabError(f"--max-strength must be a positive number, got {max_strength}")
        for s in strength or []:
            if not math.isfinite(s) or abs(s) > max_strength:
                raise SteerlabError(f"--strength {s:g} is outside ±{max_strength:g} "
                                    f"(--max-strength raises the bound)")
        if max_new_tokens < 1:
            raise SteerlabError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if scope is not None:
            parse_scope(scope)
        paths = steer or []
        check_artifacts(paths)  # a missing or broken artifact fails before loading
        lm = common._load(model)
        check_context(lm, prompt, max_new_tokens)
        loaded = [load_artifact(p, lm.info, strict=strict) for p in paths]
        # no --strength: each artifact's --auto strength, else 1 (the paper's intervention)
        strengths = strength or [stored_strength(c) or 1.0 for c in loaded]
        if len(strengths) == 1 and len(paths) > 1:
            strengths = strengths * len(paths)
        if len(strengths) != len(paths):
            raise SteerlabError(
                f"give one --strength per --steer ({len(paths)} artifacts, "
                f"{len(strengths)} strengths)"
            )
        steers = [Steer(c, s, scope) for c, s in zip(loaded, strengths, strict=True)]
        outs = run_generate(lm, prompt, steers=steers or None, max_new_tokens=max_new_tokens)
        plain = run_generate(lm, prompt, max_new_tokens=max_new_tokens) if compare else None
        for i, (p, o) in enumerate(zip(prompt, outs, strict=True)):
            console.rule(p)
            if plain is not None:
                console.print(f"[dim]unsteered:[/] {plain[i].strip()}")
                console.print(f"[bold]steered:[/] {o.strip()}")
            else:
                console.print(o.strip())
    except SteerlabError as exc:
        fail(exc)
