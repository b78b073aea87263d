"""Reports of sweeps: ``report.json`` (aggregates), ``report.md`` (tables) and PNG plots.

Cells of several folds are averaged per (task, method, layer, strength); the behaviour change
``delta`` of a fold is its primary metric minus the unsteered value of the same fold, so a
row's delta is the mean over folds of steered − unsteered. A row counts as *complete* when
every fold of its task finished; only complete rows enter the comparisons and plots, and
every failed cell is listed with its stage and error.

* :func:`compare_table`: per task, the best behaviour change each method reaches with its
  cost (KL by default, or a task metric such as ``ppl``) within a budget: *behaviour at
  equal fluency*. "Best" is the largest ``direction · delta`` (``direction=-1`` when the
  goal is to lower the primary metric), ties to the cheaper cell.
* :func:`write_report`: the tables, the comparison, and three figures per task:
  behaviour change vs strength (one line per method, at the layer the comparison chose),
  the Pareto front of behaviour change vs cost (every cell, the front highlighted; the
  unsteered model is the point (0, 0)), and behaviour change vs layer at each method's
  chosen strength. Figures are drawn with matplotlib's Agg canvas (no pyplot, no global
  backend change) and referenced from the markdown by relative paths.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from steerlab.evals.sweep import SweepResults, _clean
from steerlab.io import atomic_write

ResultsLike = SweepResults | Sequence[dict[str, Any]] | str | os.PathLike[str]
_EXTRA_COLUMNS = ("ppl", "perplexity")


def _results(results: ResultsLike) -> SweepResults:
    if isinstance(results, SweepResults):
        return results
    if isinstance(results, str | os.PathLike):
        p = Path(results)
        if p.is_file():
            p = p.parent
        return SweepResults.load(p)
    return SweepResults(results)


def _mean(xs: Iterable[Any]) -> float | None:
    vals = [float(x) for x in xs if isinstance(x, int | float) and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


def aggregate(results: ResultsLike, budget_metric: str = "kl") -> dict[str, dict[str, Any]]:
    """Per task: its kind, primary metric, folds, unsteered value, fold-averaged rows, and
    failed cells. Each row: ``label``, ``method``, ``layer``, ``strength``, ``value``,
    ``delta``, ``kl``, ``cost`` (of ``budget_metric``), ``metrics``, ``fit_seconds``,
    ``eval_seconds``, ``folds_ok``/``folds`` and ``complete``."""
    res = _results(results)
    tasks: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[tuple[Any, ...], list[dict[str, Any]]]] = defaultdict(dict)
    for c in res:
        name = str(c.get("task"))
        t = tasks.setdefault(name, {"task": name, "kind": c.get("kind"),
                                    "primary": c.get("primary"), "folds": set(),
                                    "baselines": {}, "failures": []})
        t["folds"].add(int(c.get("fold") or 0))
        if c.get("status") != "ok":
            t["failures"].append({k: c.get(k) for k in
                                  ("cell", "label", "layer", "strength", "fold", "error")})
        if c.get("method") is None:
            if c.get("status") == "ok":
                t["baselines"][int(c.get("fold") or 0)] = c
            continue
        key = (c.get("label") or c.get("method"), c.get("layer"), float(c.get("strength") or 0))
        groups[name].setdefault(key, []).append(c)
    for name, t in tasks.items():
        folds = sorted(t.pop("folds"))
        t["folds"] = folds
        bases = t.pop("baselines")
        t["baseline"] = _mean(b.get("primary_value") for b in bases.values())
        t["baseline_complete"] = len(bases) == len(folds)
        base_cost = [_cost(b, budget_metric) for b in bases.values()]
        t["baseline_cost"] = _mean(base_cost)
        t["baseline_kl"] = _mean(b.get("kl") for b in bases.values())
        rows = []
        for (label, layer, strength), cells in groups[name].items():
            ok = [c for c in cells if c.get("status") == "ok"]
            deltas = []
            for c in ok:
                b = bases.get(int(c.get("fold") or 0))
                v, bv = c.get("primary_value"), b.get("primary_value") if b else None
                deltas.append(v - bv if isinstance(v, int | float) and
                              isinstance(bv, int | float) else None)
            metric_names = sorted({k for c in ok for k in (c.get("metrics") or {})})
            folds_ok = sorted({int(c.get("fold") or 0) for c in ok})
            complete = folds_ok == folds and all(d is not None for d in deltas)
            rows.append({
                "label": label, "method": cells[0].get("method"), "layer": layer,
                "strength": strength,
                "value": _mean(c.get("primary_value") for c in ok),
                "delta": _mean(deltas) if complete else None,
                "kl": _mean(c.get("kl") for c in ok),
                "cost": _mean(_cost(c, budget_metric) for c in ok),
                "metrics": {m: _mean((c.get("metrics") or {}).get(m) for c in ok)
                            for m in metric_names},
                "fit_seconds": _mean(c.get("fit_seconds") for c in ok),
                "eval_seconds": _mean(c.get("eval_seconds") for c in ok),
                "folds_ok": len(folds_ok), "folds": len(folds), "complete": complete,
            })
        rows.sort(key=lambda r: (str(r["label"]), _num(r["layer"]), r["strength"]))
        t["rows"] = rows
    return tasks


def _num(x: Any) -> float:
    return float(x) if isinstance(x, int | float) else math.inf


def _cost(cell: dict[str, Any], budget_metric: str) -> float | None:
    v = cell.get("kl") if budget_metric == "kl" else \
        (cell.get("metrics") or {}).get(budget_metric)
    return float(v) if isinstance(v, int | float) else None


def _best(rows: Iterable[dict[str, Any]], budget: float, direction: int) -> dict[str, Any] | None:
    ok = [r for r in rows if r["complete"] and r["delta"] is not None and
          (math.isinf(budget) or (r["cost"] is not None and r["cost"] <= budget))]
    if not ok:
        return None
    return max(ok, key=lambda r: (direction * r["delta"], -_num(r["cost"]),
                                  -abs(r["strength"])))


def compare_table(results: ResultsLike, budget_metric: str = "kl",
                  budget: float = math.inf, *,
                  direction: int = 1) -> dict[str, dict[str, dict[str, Any] | None]]:
    """Per task, per method (label): the best fold-averaged behaviour change among the cells
    whose ``budget_metric`` is at most ``budget`` (any layer, any strength), with its layer,
    strength, value and cost; ``None`` when no complete cell of the method is within the
    budget (or all of them failed)."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be 1 or -1, got {direction!r}")
    out: dict[str, dict[str, dict[str, Any] | None]] = {}
    for name, t in aggregate(results, budget_metric).items():
        by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in t["rows"]:
            by_label[str(r["label"])].append(r)
        for f in t["failures"]:
            if f.get("label"):
                by_label.setdefault(str(f["label"]), [])
        out[name] = {}
        for label in sorted(by_label):
            best = _best(by_label[label], float(budget), direction)
            out[name][label] = None if best is None else {
                k: best[k] for k in ("method", "layer", "strength", "value", "delta", "cost",
                                     "kl")}
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, gain) no other point beats: lower or equal cost and
    higher or equal gain, one of them strictly. Sorted by cost."""
    idx = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in idx:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "task"


def _fmt(x: Any, signed: bool = False) -> str:
    if not isinstance(x, int | float) or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _auto_budget(tasks: dict[str, dict[str, Any]]) -> float:
    costs = [r["cost"] for t in tasks.values() for r in t["rows"]
             if r["complete"] and isinstance(r["cost"], int | float)]
    if not costs:
        return math.inf
    m = statistics.median(costs)
    return float(f"{m:.2g}") if m > 0 else m


def write_report(results_or_dir: ResultsLike, out_dir: str | os.PathLike[str], *,
                 title: str = "steerlab evaluation report", budget_metric: str = "kl",
                 budget: float | None = None, direction: int = 1) -> Path:
    """Write ``report.json``, ``report.md`` and ``figures/*.png`` into ``out_dir``; return
    the path of ``report.md``.

    ``budget`` bounds ``budget_metric`` for the comparison and for choosing each method's
    layer and strength in the plots; ``None`` takes the median cost of all complete cells
    (stated in the report), ``math.inf`` compares without a budget.
    """
    res = _results(results_or_dir)
    out = Path(out_dir)
    fig_dir = out / "figures"
    tasks = aggregate(res, budget_metric)
    auto = budget is None
    b = _auto_budget(tasks) if budget is None else float(budget)
    compare = compare_table(res, budget_metric, b, direction=direction)
    figures: dict[str, dict[str, str]] = {}
    for name, t in tasks.items():
        chosen: dict[str, dict[str, Any]] = {}
        by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in t["rows"]:
            by_label[str(r["label"])].append(r)
        for label, rows in by_label.items():
            pick = _best(rows, b, direction) or _best(rows, math.inf, direction)
            if pick is not None:
                chosen[label] = {"layer": pick["layer"], "strength": pick["strength"],
                                 "within_budget": _best(rows, b, direction) is not None}
        t["chosen"] = chosen
        pts: list[tuple[float, float]] = []
        owners: list[dict[str, Any]] = []
        if t["baseline"] is not None and (t["baseline_cost"] is not None or
                                          budget_metric == "kl"):
            pts.append((t["baseline_cost"] or 0.0, 0.0))
            owners.append({"label": "unsteered", "layer": None, "strength": 0.0})
        for r in t["rows"]:
            if r["complete"] and r["delta"] is not None and r["cost"] is not None:
                pts.append((r["cost"], direction * r["delta"]))
                owners.append(r)
        front = pareto_front(pts)
        t["pareto"] = [{"label": owners[i]["label"], "layer": owners[i]["layer"],
                        "strength": owners[i]["strength"], "cost": pts[i][0],
                        "gain": pts[i][1]} for i in front]
        figures[name] = _plots(name, t, pts, owners, front, fig_dir, budget_metric, direction)

    doc = _clean({
        "title": title,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": (res.spec or {}).get("model"),
        "spec": res.spec or None,
        "budget_metric": budget_metric,
        "budget": b,
        "budget_auto": auto,
        "direction": direction,
        "cells": len(res),
        "failed": len(res.failures()),
        "tasks": tasks,
        "compare": compare,
        "figures": figures,
    })
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2, sort_keys=True)))
    md = _markdown(title, res, tasks, compare, figures, budget_metric, b, auto, direction)
    return atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(md))


def _plots(name: str, t: dict[str, Any], pts: list[tuple[float, float]],
           owners: list[dict[str, Any]], front: list[int], fig_dir: Path,
           budget_metric: str, direction: int) -> dict[str, str]:
    """Draw the task's figures; return {kind: path relative to the report}."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in t["rows"] if r["complete"] and r["delta"] is not None]
    if not rows:
        return {}
    fig_dir.mkdir(parents=True, exist_ok=True)
    labels = sorted({str(r["label"]) for r in rows})
    colors = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    ylabel = f"Δ {t['primary']} vs unsteered"
    out: dict[str, str] = {}

    def save(fig: Figure, kind: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = fig_dir / f"{_slug(name)}_{kind}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        out[kind] = f"figures/{path.name}"

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for lab in labels:
        layer = t["chosen"].get(lab, {}).get("layer")
        line = sorted((r for r in rows if r["label"] == lab and r["layer"] == layer),
                      key=lambda r: r["strength"])
        if line:
            ax.plot([r["strength"] for r in line], [r["delta"] for r in line], "o-",
                    color=colors[lab], label=f"{lab} (layer {layer})")
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("strength")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{name}: behaviour vs strength")
    ax.legend(fontsize=8)
    save(fig, "strength")

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for lab in labels:
        sel = [i for i, o in enumerate(owners) if o["label"] == lab]
        ax.scatter([pts[i][0] for i in sel], [pts[i][1] for i in sel], color=colors[lab],
                   alpha=0.7, s=22, label=lab)
    fx = [pts[i][0] for i in front]
    fy = [pts[i][1] for i in front]
    ax.step(fx, fy, where="post", color="black", lw=1.4, label="Pareto front")
    ax.scatter(fx, fy, facecolors="none", edgecolors="black", s=70, lw=1.2)
    ax.set_xlabel("next-token KL" if budget_metric == "kl" else budget_metric)
    ax.set_ylabel(ylabel if direction == 1 else f"−{ylabel}")
    ax.set_title(f"{name}: behaviour vs fluency cost")
    ax.legend(fontsize=8)
    save(fig, "pareto")

    layers = sorted({r["layer"] for r in rows if isinstance(r["layer"], int)})
    if len(layers) > 1:
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        for lab in labels:
            s = t["chosen"].get(lab, {}).get("strength")
            line = sorted((r for r in rows if r["label"] == lab and r["strength"] == s),
                          key=lambda r: _num(r["layer"]))
            if line:
                ax.plot([r["layer"] for r in line], [r["delta"] for r in line], "o-",
                        color=colors[lab], label=f"{lab} (strength {s:g})")
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: layer sweep")
        ax.legend(fontsize=8)
        save(fig, "layers")
    return out


def _failure_lines(failures: list[dict[str, Any]]) -> list[str]:
    """One line per (method, stage, error): the cells it hit, then the error."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for f in failures:
        err = f.get("error") or {}
        key = (str(f.get("label") or "unsteered"), str(err.get("stage", "?")),
               str(err.get("type", "?")), str(err.get("message", ""))[:400])
        groups.setdefault(key, []).append(f)
    lines = []
    for (label, stage, typ, message), fs in groups.items():
        if len(fs) == 1:
            where = f"`{_md(fs[0].get('cell'))}`"
        else:
            layers = sorted({str(f.get("layer")) for f in fs if f.get("layer") is not None})
            strengths = sorted({float(f.get("strength") or 0) for f in fs})
            folds = sorted({int(f.get("fold") or 0) for f in fs})
            where = f"**{_md(label)}** ({len(fs)} cells: layers {', '.join(layers)}; " \
                    f"strengths {', '.join(f'{x:g}' for x in strengths)}; folds " \
                    f"{', '.join(map(str, folds))})"
        lines.append(f"- {where}: {stage} failed with {_md(typ)}: {_md(message)}")
    return lines


def compare_markdown(compare: dict[str, dict[str, dict[str, Any] | None]]) -> str:
    """The comparison as a markdown table (tasks as rows, methods as columns)."""
    labels = sorted({lab for per in compare.values() for lab in per})
    if not compare or not labels:
        return "_no results to compare_\n"
    lines = ["| task | " + " | ".join(_md(lab) for lab in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for task, per in compare.items():
        cells = []
        for lab in labels:
            c = per.get(lab)
            cells.append("—" if c is None else
                         f"{_fmt(c['delta'], True)} (L{c['layer']}, s={c['strength']:g}, "
                         f"cost {_fmt(c['cost'])})")
        lines.append(f"| {_md(task)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown(title: str, res: SweepResults, tasks: dict[str, dict[str, Any]],
              compare: dict[str, dict[str, dict[str, Any] | None]],
              figures: dict[str, dict[str, str]], budget_metric: str, budget: float,
              auto: bool, direction: int) -> str:
    model = (res.spec or {}).get("model") or {}
    out = [f"# {title}", ""]
    out.append(f"Generated {datetime.now(UTC).isoformat(timespec='seconds')}"
               + (f" for model `{model.get('model_id')}`" if model else "")
               + f": {len(res)} cells, {len(res.failures())} failed.")
    out.append("")
    metric = "next-token KL" if budget_metric == "kl" else budget_metric
    goal = "increase" if direction == 1 else "decrease"
    how = " (the median cost of all cells)" if auto else ""
    out += ["## Behaviour at equal fluency", "",
            f"Best {goal} of each task's primary metric over the unsteered model that each "
            f"method reaches with {metric} ≤ {budget:g}{how}, over all layers and strengths "
            "(mean over folds; — : no cell within the budget).", "",
            compare_markdown(compare)]
    for name, t in tasks.items():
        out += [f"## {_md(name)}", "",
                f"Kind: {t['kind']}; primary metric: `{t['primary']}`; folds: "
                f"{len(t['folds'])}; unsteered {t['primary']}: {_fmt(t['baseline'])}.", ""]
        captions = {"strength": "behaviour vs strength (each method at its chosen layer)",
                    "pareto": f"behaviour change vs {metric} (Pareto front in black)",
                    "layers": "behaviour change vs layer (each method at its chosen strength)"}
        for kind, rel in figures.get(name, {}).items():
            out += [f"![{_md(name)}: {captions[kind]}]({rel})", ""]
        extra = [m for m in _EXTRA_COLUMNS
                 if any(m in r["metrics"] for r in t["rows"]) and m != t["primary"]]
        if budget_metric not in ("kl", t["primary"], *extra) and \
                any(budget_metric in r["metrics"] for r in t["rows"]):
            extra.append(budget_metric)
        head = ["method", "layer", "strength", f"`{t['primary']}`", "Δ", "KL", *extra,
                "fit s", "eval s", "folds"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base_row = ["unsteered", "—", "0", _fmt(t["baseline"]), "—",
                    _fmt(t["baseline_kl"]),
                    *["—" for _ in extra], "—", "—",
                    "all" if t["baseline_complete"] else "incomplete"]
        out.append("| " + " | ".join(base_row) + " |")
        for r in t["rows"]:
            cells = [_md(r["label"]), str(r["layer"]), f"{r['strength']:g}", _fmt(r["value"]),
                     _fmt(r["delta"], True), _fmt(r["kl"]),
                     *[_fmt(r["metrics"].get(m)) for m in extra],
                     _fmt(r["fit_seconds"]), _fmt(r["eval_seconds"]),
                     f"{r['folds_ok']}/{r['folds']}"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if t["failures"]:
            out += [f"**Failures ({len(t['failures'])})**", ""]
            out += _failure_lines(t["failures"])
            out.append("")
    return "\n".join(out) + "\n"
