"""``steerlab fit``: fit a controller of any method on a data set and save it as an
artifact (optionally choosing its block and strength with ``--auto``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from steerlab.cli import common
from steerlab.cli.common import (
    DEMO_LAYER,
    DEMO_SCOPE,
    ModelOption,
    console,
    fail,
    given_options,
    parse_layers,
    preflight_fit,
)
from steerlab.errors import SteerlabError

BASELINES = ("iti", "repe", "probe", "mean_act", "linear_act", "mimic", "angular")
LFS_METHODS = ("alqr", "alqr_plus", "spid", "actadd_lfs")


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


def fit(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="artifact path (.safetensors)")],
    model: ModelOption = "smollm2-135m",
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

        layer_list = parse_layers(layers)
        given = given_options(ctx)
        preflight_fit(model, method, data, layer_list, given, scope=scope, limit=limit,
                      out=out, preset=preset, auto=auto)
        if recipe is None:
            recipe = "last" if method in LFS_METHODS else "mean"
        lm = common._load(model)
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
        fail(exc)
