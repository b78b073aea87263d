"""``steerlab models``: the embedded models, whether they are installed, and the cache."""

from __future__ import annotations

from rich.table import Table

from steerlab.cli.common import console


def models() -> None:
    """List the embedded models and whether their packages are installed."""
    from steerlab.models import cache_root, embedded_status

    table = Table(title="embedded models")
    table.add_column("name", style="bold")
    table.add_column("model")
    table.add_column("status")
    for name, desc, status in embedded_status():
        table.add_row(name, desc, status)
    console.print(table)
    console.print(f"cache: {cache_root()} (set STEERLAB_CACHE to move it)")
