"""The ``steerlab`` command line (``steerlab.cli:app``): this module only builds the typer
app from the commands of its modules, each grouped by what it does.

``demo`` (:mod:`.demo`), ``fit`` (:mod:`.fit`), ``generate`` (:mod:`.generate`), ``inspect``,
``export-gguf``, ``import-gguf`` (:mod:`.artifacts`), ``models`` (:mod:`.models`),
``sae train``, ``features`` (:mod:`.sae`), ``eval``, ``sweep``, ``compare``, ``calibrate``
(:mod:`.eval`), ``serve`` (:mod:`.serve`), ``diagnose alqr``/``barrier`` (:mod:`.diagnose`);
what they share (console, error exit, loading, argument checks) is in :mod:`.common`.
Library code never imports this package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from steerlab.cli import artifacts, demo, diagnose, fit, generate, models, sae, serve
from steerlab.cli import eval as evaluation
from steerlab.cli.common import _load, console, fail

__all__ = ["_load", "app", "console", "fail", "main"]

app = typer.Typer(
    help="steerlab: steer language models by their activations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# in the order ``steerlab --help`` lists them
COMMANDS: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("demo", demo.demo),
    ("fit", fit.fit),
    ("generate", generate.generate),
    ("inspect", artifacts.inspect),
    ("models", models.models),
    ("export-gguf", artifacts.export_gguf),
    ("import-gguf", artifacts.import_gguf),
    ("features", sae.features),
    ("eval", evaluation.eval_command),
    ("sweep", evaluation.sweep_command),
    ("compare", evaluation.compare_command),
    ("calibrate", evaluation.calibrate_command),
    ("serve", serve.serve_command),
)
GROUPS: tuple[tuple[str, typer.Typer], ...] = (
    ("diagnose", diagnose.diagnose_app),
    ("sae", sae.sae_app),
)

for _name, _command in COMMANDS:
    app.command(_name)(_command)
for _name, _group in GROUPS:
    app.add_typer(_group, name=_name)


def main() -> None:  # pragma: no cover - console entry point
    """Run the command line."""
    app()
