"""What every ``steerlab`` sub-command shares: the console and the one-line error exit."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()


def fail(exc: Exception | str, *, out: Console | None = None) -> NoReturn:
    """Print ``error: <message>`` on one line (never wrapped, newlines folded), exit 2."""
    message = " ".join(str(exc).split())
    (out or console).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)
