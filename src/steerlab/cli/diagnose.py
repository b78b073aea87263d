"""``steerlab diagnose``: diagnostics of model-based steering (``alqr``: the A-LQR paper's
sec. 6; ``barrier``: ODESteer's barrier along its integration path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from steerlab.cli import common
from steerlab.cli.common import ModelOption, console, fail
from steerlab.errors import SteerlabError

diagnose_app = typer.Typer(help="Diagnostics of model-based steering (A-LQR paper, sec. 6).",
                           no_args_is_help=True)


@diagnose_app.command("alqr")
def diagnose_alqr(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for PNG/JSON/markdown")],
    model: ModelOption = "smollm2-135m",
    what: Annotated[str, typer.Option(help="comma list: linearity,bound,setpoint")] = (
        "linearity,bound,setpoint"
    ),
    strength: Annotated[float, typer.Option(help="λ multiplier while steering")] = 1.0,
    prompts: Annotated[int, typer.Option(help="prompts per diagnostic")] = 8,
) -> None:
    """Fit A-LQR on the built-in sentiment set and run the paper's diagnostics:
    (a) local linearity and Jacobian alignment, (b) tracking-error bound, (c) setpoint."""
    try:
        from steerlab.data import neutral_prompts, sentiment_pairs
        from steerlab.diagnostics.alqr import linearity_report, setpoint_report, tracking_report
        from steerlab.fitting import fit_alqr
        from steerlab.methods.alqr import ALQR

        chosen = {w.strip() for w in what.split(",") if w.strip()}
        unknown = chosen - {"linearity", "bound", "setpoint"}
        if unknown:
            raise SteerlabError(f"unknown diagnostics {sorted(unknown)}; use linearity, bound, "
                                f"setpoint")
        lm = common._load(model)
        data = sentiment_pairs()
        summary: dict[str, Any] = {"model": lm.info.as_dict()}
        held_out = neutral_prompts()[: max(prompts, 1)]
        alqr = None
        if chosen & {"bound", "setpoint"}:
            console.print("fitting A-LQR (LFS, Jacobians, Riccati)...")
            alqr = fit_alqr(lm, data, ALQR())
            summary["fit"] = alqr.fit_info
        if "linearity" in chosen:
            console.print("local linearity and Jacobian alignment...")
            pos = [f"{p.prompt} {p.positive}" for p in data][:prompts]
            other = neutral_prompts()[-prompts:]
            summary["linearity"] = linearity_report(lm, pos, out, other_texts=other,
                                                    n_prompts=prompts)
        if "bound" in chosen and alqr is not None and alqr.A is not None:
            console.print("tracking-error bound...")
            summary["bound"] = tracking_report(lm, alqr, alqr.A, held_out, out,
                                               strength=strength)
        if "setpoint" in chosen and alqr is not None:
            console.print("setpoint tracking...")
            summary["setpoint"] = setpoint_report(lm, alqr, held_out, out, strength=strength)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        console.print(f"[green]wrote[/] {out}/ (summary.json and the figures)")
    except SteerlabError as exc:
        fail(exc)


@diagnose_app.command("barrier")
def diagnose_barrier(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for PNG/JSON/markdown")],
    model: ModelOption = "smollm2-135m",
    layer: Annotated[int, typer.Option(help="block (default: 2/5 of the depth)")] = -1,
    t_end: Annotated[float, typer.Option("--T", help="integration length T")] = 10.0,
    steps: Annotated[int, typer.Option(help="Euler steps")] = 10,
) -> None:
    """Fit ODESteer on the built-in sentiment set and plot its barrier h along the
    integration path for the activations of the held-out neutral prompts (paper, fig. 2)."""
    try:
        from steerlab.activations import Position, Sample, collect
        from steerlab.data import Renderer, neutral_prompts, sentiment_pairs
        from steerlab.diagnostics.plots import plot_barrier_path
        from steerlab.fitting import fit_odesteer
        from steerlab.methods.ode import ODESteer, barrier_along_path
        from steerlab.sites import Site

        lm = common._load(model)
        k = layer if layer >= 0 else (2 * lm.info.num_layers) // 5
        ode = fit_odesteer(lm, sentiment_pairs(), ODESteer(layer=k, steps=steps))
        renderer = Renderer(lm.tokenizer)
        site = Site("resid_post", k)
        acts = collect(lm, [Sample(renderer.prompt(p)) for p in neutral_prompts()], [site],
                       Position.last(), progress=False)[site]
        h = barrier_along_path(ode, acts, t_end, steps)
        files = plot_barrier_path(h, t_end, out, label=f"(block {k})")
        summary: dict[str, Any] = {
            "model": lm.info.as_dict(), "layer": k, "T": t_end, "steps": steps,
            "fit": ode.fit_info, "files": [str(f) for f in files],
            "h_start_mean": float(h[:, 0].mean()), "h_end_mean": float(h[:, -1].mean()),
            "fraction_non_decreasing": float(
                (h[:, 1:] >= h[:, :-1] - 1e-6).all(dim=1).double().mean())}
        (out / "barrier_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        console.print(
            f"h along the path: mean {summary['h_start_mean']:+.3f} -> "
            f"{summary['h_end_mean']:+.3f}; non-decreasing on "
            f"{100 * summary['fraction_non_decreasing']:.0f}% of paths; wrote {out}/"
        )
    except SteerlabError as exc:
        fail(exc)
