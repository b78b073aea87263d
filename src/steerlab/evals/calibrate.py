"""Calibration: the strength that reaches a target behaviour change within a fluency budget.

Users of steering libraries pick strengths by hand-made grid searches; :func:`calibrate` does
it with a handful of evaluations. The question it answers: *which strength s changes the
task's primary metric by ``target`` (from the unsteered value) while the fluency cost stays
within ``budget``?*

Definitions. ``change(s) = primary(s) − primary(0)``, where ``primary(s)`` is the task's
primary metric on its test part under ``Steer(controller, s)``. The cost is the mean
next-token KL from the unsteered model on neutral texts (``budget_metric="kl"``; 0 at s = 0),
or the value of one of the task's own metrics at s (``budget_metric="ppl"`` for a
generation task, say: the absolute value, e.g. a perplexity of at most 40). The sign of
``target`` gives the direction: positive strengths steer toward the task's positive class,
which by the task contract raises the primary metric, so a negative target searches
negative strengths.

Algorithm (``d = sign(target)``; every measurement counts toward ``max_evals``, the
unsteered one included):

1. Fit once (:func:`steerlab.fitting.fit_method` on ``task.fit_set(fold)``), or take the
   given fitted controller. Measure s = 0. If its cost already exceeds the budget, stop:
   nothing is feasible.
2. *Bracket* by doubling: s = d·start, d·2·start, … up to d·max_strength. Stop at the first
   strength that is within ``tolerance`` of the target (done), overshoots it (the target
   lies between it and the previous strength), or exceeds the budget (the budget boundary
   lies between them).
3. *Bisect* between the last strength that undershot within budget (``lo``) and the
   stopping strength (``hi``): a midpoint that exceeds the budget or overshoots becomes
   ``hi``, one that undershoots within budget becomes ``lo``, one within tolerance ends the
   search. When ``hi`` is a budget violation this converges on the strongest strength the
   budget allows.
4. *Answer*: among the measured strengths within budget, the weakest one within tolerance
   of the target (``feasible=True``). Otherwise ``feasible=False`` and ``reason`` says why:
   ``budget`` (the target needs more than the budget allows: the answer is the strongest
   strength measured within budget), ``max_strength`` (still short of the target at
   ``max_strength``), ``max_evals`` (the evaluations ran out while the target was bracketed:
   the answer is the measured strength closest to the target) or ``baseline_over_budget``.

Bisection assumes the change and the cost grow monotonically with |s|. This is *verified*
on the measured points: ``monotone`` is False, and ``notes`` say where, when the change (by
more than the tolerance) or the cost decreased between two measured strengths of growing
magnitude, or when steering moves the metric away from the target's direction. The
measurements themselves are in ``evaluations``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from steerlab.errors import SteerlabError
from steerlab.evals.tasks.base import Task
from steerlab.models import LoadedModel


class CalibrationError(SteerlabError):
    """Calibration cannot run: bad arguments, or the budget metric is not a task metric."""


@dataclass
class CalibrationResult:
    """The answer of :func:`calibrate` and every measurement it took (see the module doc)."""

    strength: float
    achieved_change: float | None
    cost: float | None
    feasible: bool
    evaluations: list[dict[str, Any]]
    reason: str = ""
    status: str = ""  # reached | budget | max_strength | max_evals | baseline_over_budget
    target: float = 0.0
    tolerance: float = 0.0
    budget_metric: str = "kl"
    budget: float = math.inf
    baseline: float | None = None  # the primary metric unsteered
    primary: str = ""
    monotone: bool = True
    notes: list[str] = field(default_factory=list)
    controller: Any = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable (the controller is left out; save it as an artifact)."""
        d = asdict(self)
        d.pop("controller", None)
        if math.isinf(d["budget"]):
            d["budget"] = None
        return d


def calibrate(  # noqa: C901
    lm: LoadedModel,
    method_or_controller: Any,
    task: Task,
    *,
    target: float,
    layer: int | None = None,
    budget_metric: str = "kl",
    budget: float = math.inf,
    max_strength: float = 64.0,
    tolerance: float | None = None,
    max_evals: int = 12,
    fold: int = 0,
    start: float = 1.0,
    scope: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    fluency_texts: Sequence[str] | None = None,
) -> CalibrationResult:
    """Find the strength whose change of ``task.primary`` is ``target`` within ``budget``.

    ``method_or_controller``: a registered method name (fitted once at ``layer`` with
    ``hyperparameters`` on ``task.fit_set(fold)``) or a fitted controller. ``tolerance``
    (default 10 % of |target|) is how close to the target the change must come.
    ``fluency_texts`` (default :func:`steerlab.data.neutral_prompts`) is where the KL cost is
    measured. ``scope`` is the token scope of the steering (default: the controller's).
    See the module docstring for the search and the meaning of the result.
    """
    target = float(target)
    if not math.isfinite(target):
        raise CalibrationError(f"target must be a finite number, got {target!r}")
    tol = abs(target) * 0.1 if tolerance is None else float(tolerance)
    if not tol > 0 and target != 0:
        raise CalibrationError(f"tolerance must be positive, got {tolerance!r}")
    budget = float(budget)
    if math.isnan(budget) or budget < 0:
        raise CalibrationError(f"budget must be a non-negative number, got {budget!r}")
    if not (math.isfinite(max_strength) and max_strength > 0):
        raise CalibrationError(f"max_strength must be a positive number, got {max_strength!r}")
    if not (math.isfinite(start) and 0 < start <= max_strength):
        raise CalibrationError(f"start must be in (0, max_strength], got {start!r}")
    if max_evals < 2:
        raise CalibrationError(f"max_evals must be at least 2, got {max_evals}")

    controller = _controller(lm, method_or_controller, task, layer, fold, scope,
                             hyperparameters or {})
    texts: list[str] = []
    if budget_metric == "kl":
        if fluency_texts is None:
            from steerlab.data import neutral_prompts

            fluency_texts = neutral_prompts()
        texts = list(fluency_texts)
        if not texts:
            raise CalibrationError("fluency_texts is empty; the KL budget needs neutral texts")

    evals: list[dict[str, Any]] = []

    def measure(s: float) -> dict[str, Any]:
        from steerlab.evals.metrics import next_token_kl
        from steerlab.runtime import Steer

        steers = None if s == 0 else [Steer(controller, s, scope)]
        t0 = time.perf_counter()
        result = task.evaluate(lm, steers, fold=fold)
        metrics = {str(k): float(v) for k, v in result.metrics.items()}
        if task.primary not in metrics:
            raise CalibrationError(f"task {task.name!r} returned no primary metric "
                                   f"{task.primary!r}; it returned {sorted(metrics)}")
        if budget_metric == "kl":
            cost = 0.0 if steers is None else next_token_kl(lm, texts, steers, render=True)
        elif budget_metric in metrics:
            cost = metrics[budget_metric]
        else:
            raise CalibrationError(
                f"budget metric {budget_metric!r} is neither 'kl' nor a metric of task "
                f"{task.name!r} (it has {sorted(metrics)})")
        value = metrics[task.primary]
        base = evals[0]["primary"] if evals else value
        e = {"strength": s, "primary": value, "change": value - base, "cost": cost,
             "within_budget": bool(cost <= budget), "metrics": metrics,
             "seconds": round(time.perf_counter() - t0, 3)}
        evals.append(e)
        return e

    base = measure(0.0)
    common: dict[str, Any] = {"target": target, "tolerance": tol,
                              "budget_metric": budget_metric, "budget": budget,
                              "baseline": base["primary"], "primary": task.primary,
                              "controller": controller}
    if not base["within_budget"]:
        return CalibrationResult(
            0.0, 0.0, base["cost"], False, evals, status="baseline_over_budget",
            reason=f"the unsteered model already has {budget_metric} {base['cost']:.4g}, over "
                   f"the budget {budget:g}: no strength is feasible", **common)
    if target == 0:
        return CalibrationResult(0.0, 0.0, base["cost"], True, evals, status="reached",
                                 reason="a zero target is met unsteered", **common)

    d = 1.0 if target > 0 else -1.0
    goal = abs(target)

    def gap(e: dict[str, Any]) -> float:  # > 0 overshoot, < 0 undershoot
        return float(d * e["change"] - goal)

    def hit(e: dict[str, Any]) -> bool:
        return bool(e["within_budget"] and abs(gap(e)) <= tol)

    lo, hi = base, None
    s = float(start)
    reached = False
    while len(evals) < max_evals:  # 2. bracket by doubling
        e = measure(d * s)
        if hit(e):
            reached = True
            break
        if not e["within_budget"] or gap(e) > 0:
            hi = e
            break
        lo = e
        if s >= max_strength:
            break
        s = min(2 * s, float(max_strength))
    while hi is not None and not reached and len(evals) < max_evals:  # 3. bisect
        if abs(hi["strength"] - lo["strength"]) <= 1e-6 * max(1.0, abs(hi["strength"])):
            break
        e = measure((lo["strength"] + hi["strength"]) / 2)
        if hit(e):
            reached = True
        elif not e["within_budget"] or gap(e) > 0:
            hi = e
        else:
            lo = e

    monotone, notes = _check_monotone(evals, d, tol)
    ok = [e for e in evals if e["within_budget"]]
    hits = [e for e in ok if hit(e)]
    if hits:  # 4. answer
        best = min(hits, key=lambda e: abs(e["strength"]))
        status, feasible = "reached", True
        reason = (f"change {best['change']:+.4g} of {task.primary} at strength "
                  f"{best['strength']:g} is within {tol:.3g} of the target {target:+.4g}; "
                  f"{budget_metric} {best['cost']:.4g} within the budget {budget:g}")
    else:
        feasible = False
        over = [e for e in ok if gap(e) > 0]
        strongest = max(ok, key=lambda e: abs(e["strength"]))
        if over:
            best = min(ok, key=lambda e: abs(gap(e)))
            status = "max_evals"
            reason = (f"ran out of evaluations (max_evals={max_evals}) with the target "
                      f"bracketed but not within tolerance {tol:.3g}: the closest strength "
                      f"within budget is {best['strength']:g} (change "
                      f"{best['change']:+.4g}); raise max_evals or tolerance")
        elif any(not e["within_budget"] for e in evals):
            best = strongest
            first_over = min((e for e in evals if not e["within_budget"]),
                             key=lambda e: abs(e["strength"]))
            status = "budget"
            reason = (f"the target {target:+.4g} is not reachable within the "
                      f"{budget_metric} budget {budget:g}: the strongest strength measured "
                      f"within budget, {best['strength']:g}, changes {task.primary} by "
                      f"{best['change']:+.4g} ({budget_metric} {best['cost']:.4g}), and "
                      f"strength {first_over['strength']:g} already costs "
                      f"{first_over['cost']:.4g}")
        elif abs(strongest["strength"]) >= max_strength:
            best = strongest
            status = "max_strength"
            reason = (f"the target {target:+.4g} is not reached at max_strength "
                      f"{max_strength:g} (change {best['change']:+.4g}, {budget_metric} "
                      f"{best['cost']:.4g}); raise max_strength if the budget allows")
        else:
            best = strongest
            status = "max_evals"
            reason = (f"ran out of evaluations (max_evals={max_evals}) before bracketing the "
                      f"target; the strongest strength measured is {best['strength']:g} "
                      f"(change {best['change']:+.4g}); raise max_evals or start")
        if notes:
            reason += "; " + "; ".join(notes)
    return CalibrationResult(float(best["strength"]), float(best["change"]),
                             float(best["cost"]), feasible, evals, reason=reason,
                             status=status, monotone=monotone, notes=notes, **common)


def _controller(lm: LoadedModel, method_or_controller: Any, task: Task, layer: int | None,
                fold: int, scope: str | None, hyperparameters: dict[str, Any]) -> Any:
    from steerlab.methods.base import Controller

    if isinstance(method_or_controller, Controller):
        method_or_controller.check_fitted()
        return method_or_controller
    if not isinstance(method_or_controller, str):
        raise CalibrationError("give a method name or a fitted controller, got "
                               f"{type(method_or_controller).__name__}")
    if layer is None:
        raise CalibrationError(f"give the layer to fit {method_or_controller!r} at")
    from steerlab.fitting import fit_method

    return fit_method(lm, method_or_controller, task.fit_set(fold), layer=layer,
                      recipe=task.recipe, scope=scope, progress=False, **hyperparameters)


def _check_monotone(evals: list[dict[str, Any]], d: float,
                    tol: float) -> tuple[bool, list[str]]:
    """Whether change and cost grew with |strength| over the measured points."""
    pts = sorted((e for e in evals if d * e["strength"] >= 0), key=lambda e: abs(e["strength"]))
    notes = []
    for a, b in itertools.pairwise(pts):
        if d * b["change"] < d * a["change"] - tol:
            notes.append(f"the change is not monotone: {a['change']:+.4g} at strength "
                         f"{a['strength']:g} but {b['change']:+.4g} at {b['strength']:g}")
        if b["cost"] < a["cost"] - 0.02 * abs(a["cost"]) - 1e-9:
            notes.append(f"the cost is not monotone: {a['cost']:.4g} at strength "
                         f"{a['strength']:g} but {b['cost']:.4g} at {b['strength']:g}")
    steered = [e for e in pts if e["strength"] != 0]
    if steered and all(d * e["change"] < -tol for e in steered):
        notes.append("steering moves the metric away from the target's direction at every "
                     "measured strength (try a target of the other sign, or check the "
                     "controller)")
    monotone = not any(n.startswith("the change is not") or n.startswith("the cost is not")
                       for n in notes)
    return monotone, notes
