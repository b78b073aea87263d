"""The ``steerlab`` command line: demo, fit, generate, inspect, models, GGUF export/import."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from steerlab.cli_common import console, fail
from steerlab.errors import SteerlabError

app = typer.Typer(
    help="steerlab: steer language models by their activations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEMO_LAYER = 8
DEMO_STRENGTH = 3.5
DEMO_SCOPE = "all"


def _fail(exc: Exception) -> None:
    fail(exc)


def _load(model: str) -> Any:
    from steerlab.models import load_model

    with console.status(f"loading {model} (the first load converts and caches it)..."):
        start = time.perf_counter()
        lm = load_model(model)
    console.print(
        f"[green]loaded[/] {lm.info.model_id}: {lm.info.architecture}, {lm.info.num_layers} "
        f"layers, hidden {lm.info.hidden_size} ({time.perf_counter() - start:.1f} s)"
    )
    return lm


def _sentiment(texts: list[str]) -> list[float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="model name, folder or .gguf")] = "smollm2-135m",
    layer: Annotated[int, typer.Option(help="block whose output is steered")] = DEMO_LAYER,
    strength: Annotated[float, typer.Option(help="CAA multiplier")] = DEMO_STRENGTH,
    prompts: Annotated[int, typer.Option(help="neutral prompts to show")] = 6,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per answer")] = 40,
) -> None:
    """Fit a sentiment CAA from the built-in set and show unsteered vs steered answers."""
    try:
        from steerlab.data import neutral_prompts, sentiment_pairs
        from steerlab.fitting import fit_caa
        from steerlab.methods import CAA
        from steerlab.runtime import Steer, generate

        lm = _load(model)
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
        s0, s1, s2 = (sum(_sentiment(x)) / len(x) for x in (plain, pos, neg))
        console.print(
            f"mean VADER compound: unsteered {s0:+.3f}, +{strength}: {s1:+.3f}, "
            f"-{strength}: {s2:+.3f}"
        )
    except SteerlabError as exc:
        _fail(exc)


BASELINES = ("iti", "repe", "probe", "mean_act", "linear_act", "mimic", "angular")
LFS_METHODS = ("alqr", "alqr_plus", "spid", "actadd_lfs")
# CLI option name -> hyper-parameter name where they differ
_OPTION_HP = {"lam": "lambdas", "keep_k": "keep_K"}


def _given(ctx: typer.Context) -> set[str]:
    """Hyper-parameter names the user gave on the command line (not left at defaults)."""
    out = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)  # typer's own (vendored) click enum: by name
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            out.add(_OPTION_HP.get(name, name))
    if "layers" in out:
        out.add("layer")
    return out


def _make(cls: Any, preset: str | None, given: set[str], **kw: Any) -> Any:
    """Construct ``cls``: plainly, or from ``preset`` where the flags the user gave (and
    the ones the preset does not set) override the preset's values."""
    if preset is None:
        return cls(**kw)
    if preset not in cls.presets:
        known = ", ".join(sorted(cls.presets)) or "none"
        raise SteerlabError(f"{cls.method} has no preset {preset!r} (presets: {known})")
    hp = cls.presets[preset].hyperparameters
    return cls.from_preset(preset, **{k: v for k, v in kw.items() if k in given or k not in hp})


def _fit_baseline(lm: Any, method: str, data: str, limit: int, layer_list: list[int],
                  recipe: str, scope: str, preset: str | None = None,
                  given: frozenset[str] | set[str] = frozenset(), **opts: Any) -> Any:
    """Fit one of the issue-7 baselines (ITI, RepE, probe, Mean-/Linear-AcT, MiMiC, angular)."""
    from steerlab.data import ContrastiveSet, LabeledSet, load_dataset, sentiment_pairs
    from steerlab.fitting import fit_angular, fit_contrastive, fit_iti
    from steerlab.methods import (
        ITI,
        AngularSteering,
        LinearAcT,
        MeanAcT,
        MiMiC,
        ProbeDirection,
        RepE,
    )

    dataset: ContrastiveSet | LabeledSet = (sentiment_pairs() if data == "sentiment"
                                            else load_dataset(data))
    if limit:
        dataset = dataset[:limit]
    if isinstance(dataset, LabeledSet):
        if method in ("repe", "angular"):
            raise SteerlabError(f"{data} is a labelled set; {method} needs contrastive pairs")
        recipe = "last"
    kw: dict[str, Any] = {"recipe": recipe, "scope": scope}
    if method == "iti":
        tuning_set = load_dataset(opts["tuning"]) if opts.get("tuning") else None
        if "layers" in given:
            kw["layers"] = layer_list
        return fit_iti(lm, dataset, _make(ITI, preset, set(given), top_k=opts["top_k"],
                                          alpha=opts["alpha"], **kw),
                       tuning=tuning_set, tuning_fraction=opts.get("tuning_fraction"))
    if method == "angular":
        return fit_angular(lm, dataset, AngularSteering(
            layers=layer_list, angle=opts["angle"], adaptive=opts["adaptive"], **kw))
    make = {
        "repe": lambda: RepE(layers=layer_list, variant=opts["variant"], **kw),
        "probe": lambda: ProbeDirection(layers=layer_list, **kw),
        "mean_act": lambda: MeanAcT(layers=layer_list, **kw),
        "linear_act": lambda: LinearAcT(layers=layer_list, **kw),
        "mimic": lambda: MiMiC(layers=layer_list, reg=opts["reg"], **kw),
    }
    return fit_contrastive(lm, dataset, make[method]())


def _parse_layers(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SteerlabError(f"--layers takes comma-separated block indices such as 8 or "
                            f"6,8,10; got {text!r}") from None
    if not out:
        raise SteerlabError("--layers is empty; give at least one block index")
    return out


def _preflight(model: str, method: str, data: str, layer_list: list[int], given: set[str], *,
               scope: str, limit: int, out: Path, preset: str | None,
               auto: bool = False) -> None:
    """Check the arguments before the model loads and activations are collected: the method,
    preset, scope, output path, data file and block range (from the model's config)."""
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


def _fit_auto(lm: Any, method: str, data: str, limit: int, layer_list: list[int],
              given: set[str], options: dict[str, Any], *, recipe: str, scope: str,
              preset: str | None, budget: float) -> Any:
    """``fit --auto``: :func:`steerlab.autotune.auto_fit` with the flags the user gave."""
    from steerlab.autotune import auto_fit
    from steerlab.data import load_dataset, sentiment_pairs
    from steerlab.fitting import build_controller
    from steerlab.methods import METHODS

    if method not in METHODS:
        raise SteerlabError(f"unknown method {method!r}; use {', '.join(sorted(METHODS))}")
    dataset = sentiment_pairs() if data == "sentiment" else load_dataset(data)
    if limit:
        dataset = dataset[:limit]
    build_controller(method, lm)  # refuse an unknown method or flag before any fitting
    hp = {k: v for k, v in options.items() if k in given}
    if method == "innsteer" and "epochs" in hp:
        hp["warmup_epochs"] = min(60, int(hp["epochs"]) // 5)
    return auto_fit(lm, method, dataset, layers=layer_list if "layers" in given else None,
                    budget=budget, progress=True,
                    recipe=recipe if "recipe" in given or method in LFS_METHODS else None,
                    scope=scope if "scope" in given else None, preset=preset, **hp)


@app.command()
def fit(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="artifact path (.safetensors)")],
    model: Annotated[str, typer.Option(help="model name, folder or .gguf")] = "smollm2-135m",
    method: Annotated[str, typer.Option(help="caa, actadd, alqr, alqr_plus, spid, actadd_lfs, "
                                         "odesteer, step_odesteer, innsteer, sas, iti, repe, "
                                         "probe, mean_act, linear_act, mimic, angular")] = (
        "caa"
    ),
    data: Annotated[str, typer.Option(help="'sentiment' (built in) or a dataset path")] = (
        "sentiment"
    ),
    layers: Annotated[str, typer.Option(help="comma-separated block indices")] = str(DEMO_LAYER),
    recipe: Annotated[str | None, typer.Option(
        help="which token the fit reads: ab, last or mean (default: last for the A-LQR "
             "family, the reference's; mean otherwise)")] = None,
    preset: Annotated[str | None, typer.Option(
        help="'paper': every hyper-parameter at the paper's values as its reference code uses "
             "them (alqr, alqr_plus, spid, odesteer, iti, caa); flags given override it")] = None,
    scope: Annotated[str, typer.Option(help="default token scope")] = DEMO_SCOPE,
    positive: Annotated[str, typer.Option(help="ActAdd positive prompt")] = "Love",
    negative: Annotated[str, typer.Option(help="ActAdd negative prompt")] = "Hate",
    limit: Annotated[int, typer.Option(help="use at most this many pairs (0: all)")] = 0,
    lam: Annotated[float, typer.Option("--lambda", help="LFS scale λ (A-LQR family)")] = 1.0,
    q: Annotated[float, typer.Option(help="A-LQR state cost Q = qI")] = 0.1,
    r: Annotated[float, typer.Option(help="A-LQR control cost R = rI")] = 3.0,
    q_f: Annotated[float, typer.Option(help="A-LQR terminal cost Q_f = q_f I")] = 0.1,
    keep_k: Annotated[bool, typer.Option("--keep-K", help="store the full gains K")] = False,
    epochs: Annotated[int, typer.Option(help="INNSteer: most training epochs")] = 300,
    direction: Annotated[str, typer.Option(help="INNSteer: mean_diff or probe")] = "mean_diff",
    sae: Annotated[str | None, typer.Option(help="SAS: SAELens folder of the SAE")] = None,
    tau: Annotated[float, typer.Option(help="SAS: frequency threshold τ in [0, 1]")] = 0.1,
    embed_sae: Annotated[bool, typer.Option(help="SAS: embed the SAE in the artifact")] = True,
    top_k: Annotated[int | None, typer.Option(help="ITI: heads to steer (default 48, "
                                                   "capped by the model's head count)")] = None,
    alpha: Annotated[float, typer.Option(help="ITI: α, the shift in head-output stds")] = 15.0,
    tuning: Annotated[str | None, typer.Option(
        help="ITI: a dataset file whose activations set σ (default: a held-out slice of "
             "the data's questions, see --tuning-fraction)")] = None,
    tuning_fraction: Annotated[float | None, typer.Option(
        help="ITI: fraction of the questions held out for σ when no --tuning file is given "
             "(default 0.2; the paper preset's 0.5)")] = None,
    variant: Annotated[str, typer.Option(help="RepE: pca_diff or pca_center")] = "pca_diff",
    angle: Annotated[float, typer.Option(help="angular: target angle (degrees from the "
                                              "feature direction)")] = 0.0,
    adaptive: Annotated[bool, typer.Option(help="angular: adaptive angular steering")] = False,
    reg: Annotated[float, typer.Option(help="MiMiC: covariance regularisation")] = 1e-2,
    auto: Annotated[bool, typer.Option(
        "--auto", help="choose the block (among --layers if given, else a few depths) and "
                       "a strength on a validation slice of the data within --budget; "
                       "stored in the artifact, used by generate when no --strength is "
                       "given")] = False,
    budget: Annotated[float, typer.Option(
        help="--auto's fluency budget: mean next-token KL in nats")] = 0.25,
) -> None:
    """Fit a controller (caa, actadd, alqr, alqr_plus, spid, actadd_lfs, odesteer,
    step_odesteer, innsteer, sas, iti, repe, probe, mean_act, linear_act, mimic, angular) and
    save it as an artifact. Methods that read class activations (odesteer, innsteer, iti,
    probe, the AcT maps, mimic) also take a labelled set (read at the last token)."""
    try:
        from steerlab import artifacts
        from steerlab.data import ContrastiveSet, load_dataset, sentiment_pairs
        from steerlab.fitting import fit_actadd, fit_caa
        from steerlab.methods import CAA, ActAdd

        layer_list = _parse_layers(layers)
        given = _given(ctx)
        _preflight(model, method, data, layer_list, given, scope=scope, limit=limit, out=out,
                   preset=preset, auto=auto)
        if recipe is None:
            recipe = "last" if method in LFS_METHODS else "mean"
        lm = _load(model)
        options = {"lambdas": lam, "q": q, "r": r, "q_f": q_f, "keep_K": keep_k,
                   "epochs": epochs, "direction": direction, "sae": sae, "tau": tau,
                   "embed_sae": embed_sae, "top_k": top_k, "alpha": alpha, "variant": variant,
                   "angle": angle, "adaptive": adaptive, "reg": reg, "positive": positive,
                   "negative": negative}
        if auto:
            controller: Any = _fit_auto(lm, method, data, limit, layer_list, given, options,
                                        recipe=recipe, scope=scope, preset=preset,
                                        budget=budget)
        elif method == "caa":
            dataset = sentiment_pairs() if data == "sentiment" else load_dataset(data)
            if not isinstance(dataset, ContrastiveSet):
                raise SteerlabError(f"{data} is a labelled set; CAA needs contrastive pairs")
            if limit:
                dataset = dataset[:limit]
            controller = fit_caa(
                lm, dataset, _make(CAA, preset, given, layers=layer_list, recipe=recipe,
                                   scope=scope))
        elif method == "actadd":
            controller = fit_actadd(
                lm, ActAdd(layer=layer_list[0], positive=positive, negative=negative, scope=scope)
            )
        elif method in ("alqr", "alqr_plus", "spid", "actadd_lfs"):
            from steerlab.fitting import fit_alqr, fit_lfs_baseline
            from steerlab.methods import SPID, ActAddLFS, ALQRPlus
            from steerlab.methods.alqr import ALQR

            # contrastive pairs, or a labelled file: the paper's unpaired D+ / D− prompt sets
            lfs_data = sentiment_pairs() if data == "sentiment" else load_dataset(data)
            if limit:
                lfs_data = lfs_data[:limit]
            lfs_kw: dict[str, Any] = {"lambdas": lam, "recipe": recipe}
            if method in ("alqr", "alqr_plus"):
                cls = ALQR if method == "alqr" else ALQRPlus
                controller = fit_alqr(lm, lfs_data, _make(cls, preset, given, q=q, r=r,
                                                          q_f=q_f, keep_K=keep_k, **lfs_kw))
            elif method == "spid":
                controller = fit_lfs_baseline(lm, lfs_data, _make(SPID, preset, given,
                                                                  **lfs_kw))
            else:
                controller = fit_lfs_baseline(lm, lfs_data, _make(
                    ActAddLFS, preset, given, layers=layer_list, **lfs_kw))
        elif method in ("odesteer", "step_odesteer"):
            from steerlab.fitting import fit_odesteer
            from steerlab.methods import ODESteer, StepODESteer

            dataset_any = sentiment_pairs() if data == "sentiment" else load_dataset(data)
            if limit:
                dataset_any = dataset_any[:limit]
            ode_cls = ODESteer if method == "odesteer" else StepODESteer
            controller = fit_odesteer(lm, dataset_any, _make(
                ode_cls, preset, given, layer=layer_list[0], scope=scope))
        elif method == "innsteer":
            from steerlab.fitting import fit_innsteer
            from steerlab.methods import INNSteer

            dataset_any = sentiment_pairs() if data == "sentiment" else load_dataset(data)
            if limit:
                dataset_any = dataset_any[:limit]
            controller = fit_innsteer(lm, dataset_any, INNSteer(
                layer=layer_list[0], scope=scope, epochs=epochs,
                warmup_epochs=min(60, epochs // 5), direction=direction))  # type: ignore[arg-type]
        elif method == "sas":
            from steerlab.fitting import fit_sas
            from steerlab.methods import SAS

            if sae is None:
                raise SteerlabError("SAS needs --sae FOLDER (train one: steerlab sae train)")
            dataset = sentiment_pairs() if data == "sentiment" else load_dataset(data)
            if not isinstance(dataset, ContrastiveSet):
                raise SteerlabError(f"{data} is a labelled set; SAS needs contrastive pairs")
            if limit:
                dataset = dataset[:limit]
            controller = fit_sas(lm, dataset, SAS(
                layer=layer_list[0], sae=sae, tau=tau, recipe=recipe,  # type: ignore[arg-type]
                embed_sae=embed_sae, scope=scope))
        elif method in BASELINES:
            controller = _fit_baseline(lm, method, data, limit, layer_list, recipe, scope,
                                       preset=preset, given=given, top_k=top_k, alpha=alpha,
                                       tuning=tuning, tuning_fraction=tuning_fraction,
                                       variant=variant, angle=angle,
                                       adaptive=adaptive, reg=reg)
        else:
            raise SteerlabError(
                f"unknown method {method!r}; use caa, actadd, alqr, alqr_plus, spid, "
                f"actadd_lfs, odesteer, step_odesteer, innsteer, sas, "
                f"{', '.join(BASELINES)}"
            )
        path = artifacts.save(controller, out)
        console.print(f"[green]saved[/] {path}")
        console.print_json(json.dumps(controller.fit_info))
    except SteerlabError as exc:
        _fail(exc)


def _check_context(lm: Any, prompts: list[str], max_new_tokens: int) -> None:
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


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Argument(help="one or more prompts")],
    model: Annotated[str, typer.Option(help="model name, folder or .gguf")] = "smollm2-135m",
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

        from steerlab import artifacts
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
        for path in paths:
            artifacts.read_metadata(path)  # a missing or broken artifact fails before loading
        lm = _load(model)
        _check_context(lm, prompt, max_new_tokens)
        loaded = [artifacts.load(p, lm.info, strict=strict) for p in paths]
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
        _fail(exc)


@app.command()
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
        _fail(exc)


@app.command()
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


@app.command("export-gguf")
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
        from steerlab import artifacts

        controller = artifacts.load(artifact)
        path = artifacts.export_gguf(controller, out, scale=scale, force=force)
        if force and str(controller.default_scope) != "all":
            console.print(f"[yellow]warning:[/] {artifact} steers scope "
                          f"{controller.default_scope}; llama.cpp will add it at every token",
                          soft_wrap=True)
        console.print(f"[green]wrote[/] {path} (use with llama.cpp --control-vector)")
    except SteerlabError as exc:
        _fail(exc)


@app.command("import-gguf")
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
            info = _load(model).info
        controller = artifacts.import_gguf(gguf_file, info)
        console.print(f"[green]saved[/] {artifacts.save(controller, out)}")
    except SteerlabError as exc:
        _fail(exc)


diagnose_app = typer.Typer(help="Diagnostics of model-based steering (A-LQR paper, sec. 6).",
                           no_args_is_help=True)
app.add_typer(diagnose_app, name="diagnose")

from steerlab.cli_sae import features, sae_app  # noqa: E402

app.add_typer(sae_app, name="sae")
app.command("features")(features)


@diagnose_app.command("alqr")
def diagnose_alqr(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for PNG/JSON/markdown")],
    model: Annotated[str, typer.Option(help="model name, folder or .gguf")] = "smollm2-135m",
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
        lm = _load(model)
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
        _fail(exc)


@diagnose_app.command("barrier")
def diagnose_barrier(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for PNG/JSON/markdown")],
    model: Annotated[str, typer.Option(help="model name, folder or .gguf")] = "smollm2-135m",
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

        lm = _load(model)
        k = layer if layer >= 0 else (2 * lm.info.num_layers) // 5
        ode = fit_odesteer(lm, sentiment_pairs(), ODESteer(layer=k, steps=steps))
        renderer = Renderer(lm.tokenizer)
        site = Site("resid_post", k)
        acts = collect(lm, [Sample(renderer.prompt(p)) for p in neutral_prompts()], [site],
                       Position.last(), progress=False)[site]
        h = barrier_along_path(ode, acts, t_end, steps)
        files = plot_barrier_path(h, t_end, out, label=f"(block {k})")
        summary = {"model": lm.info.as_dict(), "layer": k, "T": t_end, "steps": steps,
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
        _fail(exc)


from steerlab.cli_eval import (  # noqa: E402
    calibrate_command,
    compare_command,
    eval_command,
    sweep_command,
)

app.command("eval")(eval_command)
app.command("sweep")(sweep_command)
app.command("compare")(compare_command)
app.command("calibrate")(calibrate_command)

from steerlab.cli_serve import serve_command  # noqa: E402

app.command("serve")(serve_command)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
