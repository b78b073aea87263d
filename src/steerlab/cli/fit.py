"""``steerlab fit``: fit a controller of any method on a data set and save it as an
artifact (optionally choosing its block and strength with ``--auto``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
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


@dataclass(frozen=True)
class MethodFlags:
    """Which of ``fit``'s flags a method takes, and how it reads ``--data``.

    Attributes:
        flags: hyper-parameter names filled from the flags (``layers``: every ``--layers``
            block; ``layer``: the first).
        if_given: hyper-parameters filled only where the flag was given.
        name: the method's name in messages.
        pairs_only: a labelled ``--data`` file is refused.
        labelled_last: a labelled ``--data`` file is read at the last token (recipe ``last``).
        reads_data: ``--data`` is read at all (ActAdd reads its own prompt pair).
        required: (hyper-parameter, message) pairs: the flag must be given.
        fit_options: fit options filled from the flags (ITI's ``tuning``).
    """

    flags: tuple[str, ...]
    if_given: tuple[str, ...] = ()
    name: str = ""
    pairs_only: bool = False
    labelled_last: bool = False
    reads_data: bool = True
    required: tuple[tuple[str, str], ...] = ()
    fit_options: tuple[str, ...] = ()


_LFS = ("lambdas", "recipe")
_ALQR = MethodFlags(("q", "r", "q_f", "keep_K", *_LFS))
_ODE = MethodFlags(("layer", "scope"))
_COMMON = ("layers", "recipe", "scope")
# The registered methods' flags; a method missing here (e.g. one a user registered) takes
# --layers, --recipe and --scope where its constructor does, and --hp.
METHOD_FLAGS: dict[str, MethodFlags] = {
    "caa": MethodFlags(_COMMON, name="CAA", pairs_only=True),
    "actadd": MethodFlags(("layer", "positive", "negative", "scope"), reads_data=False),
    "alqr": _ALQR,
    "alqr_plus": _ALQR,
    "spid": MethodFlags(_LFS),
    "actadd_lfs": MethodFlags(("layers", *_LFS)),
    "odesteer": _ODE,
    "step_odesteer": _ODE,
    "innsteer": MethodFlags(("layer", "scope", "epochs", "warmup_epochs", "direction")),
    "sas": MethodFlags(("layer", "sae", "tau", "recipe", "embed_sae", "scope"), name="SAS",
                       pairs_only=True, required=(
                           ("sae", "SAS needs --sae FOLDER (train one: steerlab sae train)"),)),
    "iti": MethodFlags(("top_k", "alpha", "recipe", "scope"), if_given=("layers",),
                       labelled_last=True, fit_options=("tuning", "tuning_fraction")),
    "repe": MethodFlags(("layers", "variant", "recipe", "scope"), pairs_only=True,
                        labelled_last=True),
    "probe": MethodFlags(_COMMON, labelled_last=True),
    "mean_act": MethodFlags(_COMMON, labelled_last=True),
    "linear_act": MethodFlags(_COMMON, labelled_last=True),
    "mimic": MethodFlags(("layers", "reg", "recipe", "scope"), labelled_last=True),
    "angular": MethodFlags(("layers", "angle", "adaptive", "recipe", "scope"), pairs_only=True,
                           labelled_last=True),
}


def method_flags(method: str) -> MethodFlags:
    """The flags ``method`` takes: its entry in :data:`METHOD_FLAGS`, else (a method added
    to ``METHODS``) the block, recipe and scope where its constructor takes them."""
    from steerlab.methods import METHODS

    if method in METHOD_FLAGS:
        return METHOD_FLAGS[method]
    names = METHODS[method].hyperparameter_names()
    block = ("layers",) if "layers" in names else ("layer",) if "layer" in names else ()
    return MethodFlags((*block, *(n for n in ("recipe", "scope") if n in names)))


def parse_hp(items: list[str], method: str) -> dict[str, Any]:
    """``--hp NAME=VALUE`` as ``{NAME: VALUE}``: the value parsed as JSON, else kept as a
    string; a name the method's constructor does not take is refused."""
    from steerlab.methods import METHODS

    out: dict[str, Any] = {}
    names = METHODS[method].hyperparameter_names() if method in METHODS else []
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SteerlabError(f"--hp takes NAME=VALUE (VALUE as JSON or a string), got "
                                f"{item!r}")
        if method in METHODS and name not in names:
            raise SteerlabError(f"--hp {name}: {method} takes no hyper-parameter {name!r}; it "
                                f"takes {', '.join(names)}")
        try:
            out[name] = json.loads(text)
        except json.JSONDecodeError:
            out[name] = text
    return out


def _load_data(data: str, limit: int, method: str, flags: MethodFlags) -> Any:
    """``--data`` for ``method`` (``None`` when it reads none), cut to ``--limit``."""
    from steerlab.data import LabeledSet, load_dataset, sentiment_pairs

    if not flags.reads_data:
        return None
    dataset = sentiment_pairs() if data == "sentiment" else load_dataset(data)
    if flags.pairs_only and isinstance(dataset, LabeledSet):
        raise SteerlabError(f"{data} is a labelled set; {flags.name or method} needs "
                            f"contrastive pairs")
    return dataset[:limit] if limit else dataset


def _hyperparameters(method: str, flags: MethodFlags, values: dict[str, Any],
                     given: set[str], preset: str | None) -> dict[str, Any]:
    """The constructor's keyword arguments from the flags; with ``preset``, only those the
    user gave or the preset does not set (the preset's values fill the rest)."""
    from steerlab.methods import METHODS

    kw = {k: values[k] for k in flags.flags}
    kw.update({k: values[k] for k in flags.if_given if k in given})
    if preset is None:
        return kw
    hp = METHODS[method].presets[preset].hyperparameters
    return {k: v for k, v in kw.items() if k in given or k not in hp}


def _fit_by_name(lm: Any, method: str, data: str, limit: int, values: dict[str, Any],
                 given: set[str], extra: dict[str, Any], *, preset: str | None) -> Any:
    """Build ``method`` from its flags (and ``--hp``) and fit it by name."""
    from steerlab.data import LabeledSet, load_dataset
    from steerlab.fitting import fit_method

    flags = method_flags(method)
    for name, message in flags.required:
        if values.get(name) is None:
            raise SteerlabError(message)
    dataset = _load_data(data, limit, method, flags)
    if flags.labelled_last and isinstance(dataset, LabeledSet):
        values = {**values, "recipe": "last"}
    kw = _hyperparameters(method, flags, values, given, preset)
    kw.update(extra)
    options: dict[str, Any] = {}
    if "tuning" in flags.fit_options:
        options["tuning"] = load_dataset(values["tuning"]) if values.get("tuning") else None
    if "tuning_fraction" in flags.fit_options:
        options["tuning_fraction"] = values.get("tuning_fraction")
    if extra:  # a constructor may refuse a --hp value with a plain TypeError or ValueError
        _check_constructs(lm, method, preset, kw)
    return fit_method(lm, method, dataset, preset=preset, progress=True, fit_options=options,
                      **kw)


def _check_constructs(lm: Any, method: str, preset: str | None, kw: dict[str, Any]) -> None:
    """Construct ``method`` with ``kw`` once, so that a bad ``--hp`` value is a one-line
    error before any activation is collected."""
    from steerlab.fitting import build_controller

    try:
        build_controller(method, lm, preset=preset, **kw)
    except SteerlabError:
        raise
    except (TypeError, ValueError) as exc:
        raise SteerlabError(f"--hp: {method} refuses a value ({exc})") from exc


def _fit_auto(lm: Any, method: str, data: str, limit: int, layer_list: list[int],
              given: set[str], options: dict[str, Any], *, recipe: str, scope: str,
              preset: str | None, budget: float | None, objective: str,
              extra: dict[str, Any] | None = None) -> Any:
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
    hp.update(extra or {})
    return auto_fit(lm, method, dataset, layers=layer_list if "layers" in given else None,
                    objective=objective, budget=budget, progress=True,
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
    budget: Annotated[float | None, typer.Option(
        help="--auto's fluency budget: perplexity ratio of the validation answers for "
             "--objective generate (default 1.5), mean next-token KL in nats for teacher "
             "(default 0.25)")] = None,
    objective: Annotated[str, typer.Option(
        help="--auto's score: generate (greedy validation answers, judged against the "
             "data's own completions), teacher (teacher-forced log-probabilities), or auto "
             "(generate for free-text pairs, teacher otherwise)")] = "auto",
    hp: Annotated[list[str] | None, typer.Option(
        "--hp", help="a hyper-parameter of the method's constructor, NAME=VALUE (VALUE as "
                     "JSON, else a string; repeatable); overrides the flags and the "
                     "preset")] = None,
) -> None:
    """Fit a controller (caa, actadd, alqr, alqr_plus, spid, actadd_lfs, odesteer,
    step_odesteer, innsteer, sas, iti, repe, probe, mean_act, linear_act, mimic, angular) and
    save it as an artifact. Methods that read class activations (odesteer, innsteer, iti,
    probe, the AcT maps, mimic) also take a labelled set (read at the last token)."""
    try:
        from steerlab import artifacts

        layer_list = parse_layers(layers)
        given = given_options(ctx)
        extra = parse_hp(hp or [], method)
        preflight_fit(model, method, data, layer_list, given, scope=scope, limit=limit,
                      out=out, preset=preset, auto=auto)
        given |= set(extra)
        from steerlab.autotune import check_objective

        check_objective(objective, "--objective")  # before the model loads
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
                                        budget=budget, objective=objective, extra=extra)
        else:
            values = {**options, "layers": layer_list, "layer": layer_list[0],
                      "recipe": recipe, "scope": scope, "warmup_epochs": min(60, epochs // 5),
                      "tuning": tuning, "tuning_fraction": tuning_fraction}
            controller = _fit_by_name(lm, method, data, limit, values, given, extra,
                                      preset=preset)
        path = artifacts.save(controller, out)
        console.print(f"[green]saved[/] {path}")
        console.print_json(json.dumps(controller.fit_info))
    except SteerlabError as exc:
        fail(exc)
