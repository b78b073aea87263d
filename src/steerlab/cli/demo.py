"""``steerlab demo``: fit a sentiment CAA from the built-in set and show unsteered and
steered answers side by side."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from steerlab.cli import common
from steerlab.cli.common import (
    DEMO_LAYER,
    DEMO_SCOPE,
    DEMO_STRENGTH,
    ModelOption,
    console,
    fail,
)
from steerlab.errors import SteerlabError


def demo(
    model: ModelOption = "smollm2-135m",
    layer: Annotated[int, typer.Option(help="block whose output is steered")] = DEMO_LAYER,
    strength: Annotated[float, typer.Option(help="CAA multiplier")] = DEMO_STRENGTH,
    prompts: Annotated[int, typer.Option(help="neutral prompts to show")] = 6,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per answer")] = 40,
) -> None:
    """Fit a sentiment CAA from the built-in set and show unsteered vs steered answers."""
    try:
        from steerlab.data import neutral_prompts, sentiment_pairs
        from steerlab.evals.judges import vader_compound
        from steerlab.fitting import fit_caa
        from steerlab.methods import CAA
        from steerlab.runtime import Steer, generate

        lm = common._load(model)
        data = sentiment_pairs()
        console.print(f"fitting CAA on {len(data)} built-in sentiment pairs at block {layer}...")
        caa = fit_caa(lm, data, CAA(layers=layer, recipe="mean", scope=DEMO_SCOPE))
        info = caa.fit_info
        console.print(
            f"[green]fitted[/] in {info['fit_seconds']:.1f} s: {info['n_pairs']} pairs, "
            f"position {info['position']}, vector norm {next(iter(info['vector_norms'].values()))}"
        )
        chosen = neutral_prompts()[:prompts]
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "batch_size": 8,
                              "progress": True}
        plain = generate(lm, chosen, **kw)
        pos = generate(lm, chosen, steers=Steer(caa, strength), **kw)
        neg = generate(lm, chosen, steers=Steer(caa, -strength), **kw)
        table = Table(title=f"{lm.info.model_id}: CAA sentiment, block {layer}, "
                            f"strength ±{strength}, scope {DEMO_SCOPE}", show_lines=True)
        table.add_column("prompt", style="bold", max_width=24)
        table.add_column("unsteered")
        table.add_column(f"+{strength} (positive)", style="green")
        table.add_column(f"-{strength} (negative)", style="red")
        for p, a, b, c in zip(chosen, plain, pos, neg, strict=True):
            table.add_row(p, a.strip(), b.strip(), c.strip())
        console.print(table)
        s0, s1, s2 = (sum(vader_compound(x)) / len(x) for x in (plain, pos, neg))
        console.print(
            f"mean VADER compound: unsteered {s0:+.3f}, +{strength}: {s1:+.3f}, "
            f"-{strength}: {s2:+.3f}"
        )
    except SteerlabError as exc:
        fail(exc)
