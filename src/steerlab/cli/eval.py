"""``steerlab eval``, ``sweep``, ``compare`` and ``calibrate``: the evaluation harness's CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from steerlab.cli import common
from steerlab.cli.common import ModelOption, console, fail, load_artifact
from steerlab.errors import SteerlabError

TASK_HELP = ("task: ab:BEHAVIOUR, mmlu_ab, truthfulqa_mc, refusal, sentiment, offensive, "
             "concept:NAME (repeat for several)")


def _tasks(names: list[str], lm: Any, n_train: int | None, n_test: int | None,
           max_new_tokens: int | None) -> list[Any]:
    from steerlab.evals.tasks import make_task

    return [make_task(n, lm, n_train=n_train, n_test=n_test, max_new_tokens=max_new_tokens)
            for n in names]


def _parse_hp(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``METHOD.NAME=VALUE`` (VALUE read as JSON where it parses, else as a string)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not eq or not dot or not method or not name:
            raise SteerlabError(f"--hp expects METHOD.NAME=VALUE, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(method, {})[name] = value
    return out


def eval_command(
    artifacts_: Annotated[list[Path], typer.Argument(metavar="ARTIFACT...",
                                                     help="steering artifact(s)")],
    task: Annotated[list[str], typer.Option(help=TASK_HELP)],
    strength: Annotated[list[float] | None, typer.Option(
        help="strength(s) to evaluate each artifact at (default 1)")] = None,
    model: ModelOption = "smollm2-135m",
    scope: Annotated[str | None, typer.Option(help="token scope override")] = None,
    fold: Annotated[int, typer.Option(help="task fold to test on")] = 0,
    n_test: Annotated[int | None, typer.Option(help="cap on test items")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="generation tasks")] = None,
    kl: Annotated[bool, typer.Option(help="also measure next-token KL on neutral text")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
) -> None:
    """Evaluate saved artifacts on tasks (unsteered first, then each artifact x strength)."""
    try:
        from steerlab.data import neutral_prompts
        from steerlab.evals.metrics import next_token_kl
        from steerlab.runtime import Steer

        lm = common._load(model, announce=False)
        tasks = _tasks(task, lm, None, n_test, max_new_tokens)
        ctrls = [(p, load_artifact(p, lm.info)) for p in artifacts_]
        strengths = strength or [1.0]
        rows: list[dict[str, Any]] = []
        for t in tasks:
            base = t.evaluate(lm, None, fold=fold)
            rows.append({"task": t.name, "artifact": None, "strength": 0.0,
                         "metrics": base.metrics, "kl": 0.0, "seconds": base.seconds})
            for path, c in ctrls:
                for s in strengths:
                    steer = Steer(c, s, scope)
                    r = t.evaluate(lm, steer, fold=fold)
                    k = next_token_kl(lm, neutral_prompts(), steer, render=True) if kl else None
                    rows.append({"task": t.name, "artifact": str(path), "strength": s,
                                 "metrics": r.metrics, "kl": k, "seconds": r.seconds,
                                 "delta": r.metrics[t.primary] - base.metrics[t.primary]})
            table = Table(title=f"{t.name} (primary: {t.primary}, fold {fold})")
            for col in ("artifact", "strength", t.primary, "change", "KL", "s"):
                table.add_column(col)
            for r2 in rows:
                if r2["task"] != t.name:
                    continue
                table.add_row(Path(r2["artifact"]).name if r2["artifact"] else "unsteered",
                              f"{r2['strength']:g}", f"{r2['metrics'][t.primary]:.4f}",
                              f"{r2.get('delta', 0.0):+.4f}",
                              "" if r2["kl"] is None else f"{r2['kl']:.4f}",
                              f"{r2['seconds']:.1f}")
            console.print(table)
        if json_out:
            json_out.write_text(json.dumps(rows, indent=1))
            console.print(f"[green]wrote[/] {json_out}")
    except SteerlabError as exc:
        fail(exc)


def sweep_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder (resumable)")],
    method: Annotated[list[str], typer.Option(help="method(s) to sweep (repeat)")],
    task: Annotated[list[str], typer.Option(help=TASK_HELP)],
    layer: Annotated[list[int], typer.Option(help="block(s) to sweep (repeat)")],
    strength: Annotated[list[float], typer.Option(help="strength(s) (repeat)")],
    model: ModelOption = "smollm2-135m",
    scope: Annotated[str, typer.Option(help="token scope of every steer")] = "all",
    hp: Annotated[list[str] | None, typer.Option(
        help="method hyper-parameter METHOD.NAME=VALUE (repeat)")] = None,
    n_train: Annotated[int | None, typer.Option(help="cap on fitting items")] = None,
    n_test: Annotated[int | None, typer.Option(help="cap on test items")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="generation tasks")] = None,
    resume: Annotated[bool, typer.Option(help="skip finished cells of an earlier run")] = True,
    retry_failed: Annotated[bool, typer.Option(help="re-run failed cells")] = False,
    budget: Annotated[float | None, typer.Option(help="KL budget of the report")] = None,
    capability: Annotated[list[str] | None, typer.Option(
        help="capability task (mmlu_ab) scored under each task's steering (repeat)")] = None,
) -> None:
    """Sweep methods x layers x strengths on tasks; results.jsonl + a report in OUT.

    Fitted controllers are cached in OUT/fits; an interrupted run resumes where it stopped;
    a method that fails is recorded in the report and the sweep goes on."""
    try:
        from steerlab.evals.report import write_report
        from steerlab.evals.sweep import SweepSpec, run_sweep
        from steerlab.evals.tasks import CapabilityUnder

        lm = common._load(model, announce=False)
        tasks = _tasks(task, lm, n_train, n_test, max_new_tokens)
        caps = _tasks(capability or [], lm, n_train, n_test, max_new_tokens)
        tasks += [CapabilityUnder(c, t) for t in list(tasks) for c in caps]
        spec = SweepSpec(methods=list(method), layers=list(layer), strengths=list(strength),
                         tasks=tasks, scope=scope, hyperparameters=_parse_hp(hp))
        res = run_sweep(lm, spec, out, resume=resume, retry_failed=retry_failed)
        report = write_report(res, out, budget=budget)
        console.print(f"{res.stats}")
        console.print(f"[green]report[/] {report}")
    except SteerlabError as exc:
        fail(exc)


def compare_command(
    run: Annotated[list[Path], typer.Argument(metavar="RUN...", help="sweep folder(s)")],
    budget_metric: Annotated[str, typer.Option(help="kl or a task metric (e.g. ppl)")] = "kl",
    budget: Annotated[float | None, typer.Option(
        help="fluency budget (default: no budget)")] = None,
    direction: Annotated[int, typer.Option(help="1: raise the primary metric; -1: lower")] = 1,
    out: Annotated[Path | None, typer.Option(help="also write a report here")] = None,
) -> None:
    """Per task, the best behaviour change each method reaches within a fluency budget."""
    try:
        from steerlab.evals.report import compare_table, write_report
        from steerlab.evals.sweep import SweepResults

        cells = SweepResults([c for r in run for c in SweepResults.load(r)])
        b = math.inf if budget is None else budget
        for task_name, by_method in compare_table(cells, budget_metric, b,
                                                  direction=direction).items():
            table = Table(title=f"{task_name}: best change within {budget_metric} <= {b:g}")
            for col in ("method", "layer", "strength", "value", "change", budget_metric):
                table.add_column(col)
            for label, best in by_method.items():
                if best is None:
                    table.add_row(label, "-", "-", "-", "none within budget", "-")
                    continue
                table.add_row(label, str(best["layer"]), f"{best['strength']:g}",
                              f"{best['value']:.4f}", f"{best['delta']:+.4f}",
                              "" if best["cost"] is None else f"{best['cost']:.4f}")
            console.print(table)
        if out is not None:
            path = write_report(cells, out, budget=budget, budget_metric=budget_metric,
                                direction=direction)
            console.print(f"[green]report[/] {path}")
    except SteerlabError as exc:
        fail(exc)


def calibrate_command(
    method: Annotated[str, typer.Option(help="method to fit (or --artifact)")] = "caa",
    task: Annotated[str, typer.Option(help=TASK_HELP.split(" (")[0])] = "sentiment",
    target: Annotated[float, typer.Option(help="wanted change of the task's primary metric")]
    = 0.2,
    layer: Annotated[int, typer.Option(help="block to fit at")] = 12,
    artifact: Annotated[Path | None, typer.Option(help="calibrate a saved artifact")] = None,
    model: ModelOption = "smollm2-135m",
    budget_metric: Annotated[str, typer.Option(help="kl or a task metric (e.g. ppl)")] = "kl",
    budget: Annotated[float, typer.Option(help="most fluency cost allowed")] = math.inf,
    max_strength: Annotated[float, typer.Option()] = 64.0,
    max_evals: Annotated[int, typer.Option()] = 12,
    scope: Annotated[str | None, typer.Option(help="token scope")] = "all",
    n_train: Annotated[int | None, typer.Option(help="cap on fitting items")] = None,
    n_test: Annotated[int | None, typer.Option(help="cap on test items")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="generation tasks")] = None,
    save: Annotated[Path | None, typer.Option(
        help="save the fitted controller here, with the calibrated strength in its metadata")]
    = None,
) -> None:
    """Find the strength that reaches a target behaviour change within a KL/perplexity budget."""
    try:
        from steerlab import artifacts
        from steerlab.evals.calibrate import calibrate

        lm = common._load(model, announce=False)
        t = _tasks([task], lm, n_train, n_test, max_new_tokens)[0]
        what: Any = load_artifact(artifact, lm.info) if artifact else method
        res = calibrate(lm, what, t, target=target, layer=layer, budget_metric=budget_metric,
                        budget=budget, max_strength=max_strength, max_evals=max_evals,
                        scope=scope)
        table = Table(title=f"calibration of {method if artifact is None else artifact} on "
                            f"{t.name}: target change {target:+g}, {budget_metric} <= "
                            f"{budget:g}")
        for col in ("strength", "change", budget_metric):
            table.add_column(col)
        for e in res.evaluations:
            table.add_row(f"{e['strength']:g}", f"{e['change']:+.4f}",
                          "" if e.get("cost") is None else f"{e['cost']:.4f}")
        console.print(table)
        verdict = "[green]reached[/]" if res.feasible else "[yellow]not reached[/]"
        console.print(f"{verdict}: strength {res.strength:g}, change {res.achieved_change:+.4f}, "
                      f"{budget_metric} {res.cost}; {res.reason}")
        if save is not None and res.controller is not None:
            res.controller.fit_info["calibration"] = {k: v for k, v in res.as_dict().items()
                                                      if k != "evaluations"}
            console.print(f"[green]saved[/] {artifacts.save(res.controller, save)}")
    except SteerlabError as exc:
        fail(exc)
