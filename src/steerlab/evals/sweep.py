"""Sweeps: every method × layer × strength on every task, resumable, failures recorded.

A sweep is a grid of *cells*. For each task and fold, one unsteered baseline cell, then for
each method and layer one fit (on ``task.fit_set(fold)``, through
:func:`steerlab.fitting.fit_method`, so any registered method plugs in without changes
here) and one cell per strength, scored by ``task.evaluate`` under
``Steer(controller, strength, spec.scope)``. Each cell records the task's metrics, the
fluency cost (mean next-token KL from the unsteered model on neutral text,
:func:`~steerlab.evals.metrics.next_token_kl`, when ``spec.kl``), the fit time and the
evaluation time.

Files in ``out_dir``:

* ``spec.json``: the model and the spec (tasks by their ``describe()``);
* ``results.jsonl``: one JSON object per finished cell, appended, flushed and fsynced as
  soon as the cell finishes, so an interrupted run loses at most the cell in progress;
* ``fits/<key>.safetensors``: each fitted controller as an artifact, ``key`` a hash of the
  model id, method, layer, hyper-parameters, scope, recipe, task name, fold and the
  fingerprint of the task's fit data. A present and loadable fit is reused, an unreadable
  one is fitted again (with a warning).

Resuming (the default) reads ``results.jsonl`` and skips every cell already there (the cell
id is a stable string of task, fold, method, layer and strength; hyper-parameters, when
given, are part of the method's label). A truncated or corrupt line (an interrupted write)
is dropped with a warning and the file rewritten atomically without it. A folder whose
``spec.json`` names another model is refused; ``resume=False`` moves the old results and
spec aside (``*.<timestamp>.bak``) and starts over (fits stay cached: their keys name the
model and data).

A method that fails to fit or to evaluate, an unknown method, a task whose split is too
small or whose evaluation raises: each is recorded as a cell with ``status: "failed"``, the
stage (``fit_set``, ``fit``, ``evaluate``, ``kl``), the exception's type and message, and
the sweep goes on. Only ``KeyboardInterrupt`` (and other non-``Exception`` errors) stop it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import steerlab
from steerlab.errors import SteerlabError
from steerlab.evals.tasks.base import Task
from steerlab.io import atomic_write
from steerlab.models import LoadedModel

RESULTS = "results.jsonl"
SPEC = "spec.json"
FITS = "fits"
SPEC_FORMAT = "steerlab-sweep"


class SweepError(SteerlabError):
    """A sweep cannot start: a bad spec, or an output folder that belongs to another run."""


def _sha(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None``, tuples lists, tensors numbers."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    try:
        return _clean(float(value))
    except (TypeError, ValueError):
        return str(value)


def method_label(method: str, hyperparameters: dict[str, Any] | None = None) -> str:
    """The method's name in cell ids and reports: ``caa``, or ``caa[1a2b3c4d]`` when it has
    hyper-parameters (a hash of them, so two settings of one method are two lines)."""
    if not hyperparameters:
        return method
    return f"{method}[{_sha(hyperparameters)[:8]}]"


def cell_id(task: str, fold: int, method: str | None = None, layer: int | None = None,
            strength: float | None = None) -> str:
    """Stable id of a cell: ``task/f0/caa/L3/s2.0``; the baseline is ``task/f0/unsteered``."""
    if method is None:
        return f"{task}/f{fold}/unsteered"
    return f"{task}/f{fold}/{method}/L{layer}/s{float(strength or 0.0)!r}"


@dataclass
class SweepSpec:
    """What a sweep runs: methods × layers × strengths on tasks.

    ``strengths`` is one list for every method or a list per method (a method missing from
    the dict is an error). ``hyperparameters`` maps a method to extra constructor arguments.
    ``fluency_texts`` (default :func:`steerlab.data.neutral_prompts`) are the neutral texts
    the KL fluency cost is measured on (rendered as user prompts); ``kl=False`` skips it.
    """

    methods: list[str]
    layers: list[int]
    strengths: dict[str, list[float]] | list[float]
    tasks: list[Task]
    scope: str = "all"
    hyperparameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    fluency_texts: list[str] | None = None
    kl: bool = True

    def strengths_for(self, method: str) -> list[float]:
        if isinstance(self.strengths, dict):
            if method not in self.strengths:
                raise SweepError(f"no strengths given for method {method!r}; the strengths "
                                 f"dict has {sorted(self.strengths)}")
            values = self.strengths[method]
        else:
            values = self.strengths
        return [float(s) for s in values]

    def texts(self) -> list[str]:
        if self.fluency_texts is not None:
            return list(self.fluency_texts)
        from steerlab.data import neutral_prompts

        return neutral_prompts()

    def validate(self) -> SweepSpec:
        if not self.tasks:
            raise SweepError("a sweep needs at least one task")
        if not self.methods:
            raise SweepError("a sweep needs at least one method")
        if not self.layers:
            raise SweepError("a sweep needs at least one layer")
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SweepError(f"task names must be unique in a sweep; repeated: {dup}")
        for m in self.methods:
            strengths = self.strengths_for(m)
            if not strengths:
                raise SweepError(f"method {m!r} has no strengths to sweep")
            bad = [s for s in strengths if not math.isfinite(s)]
            if bad:
                raise SweepError(f"strengths must be finite numbers; {m!r} has {bad}")
        if self.kl and not self.texts():
            raise SweepError("fluency_texts is empty; give neutral texts or set kl=False")
        return self

    def describe(self, lm: LoadedModel | None = None) -> dict[str, Any]:
        """The JSON document written to ``spec.json``."""
        texts = self.texts() if self.kl else []
        return _clean({
            "format": SPEC_FORMAT,
            "format_version": 1,
            "library_version": steerlab.__version__,
            "model": lm.info.as_dict() if lm is not None else None,
            "methods": list(self.methods),
            "layers": [int(x) for x in self.layers],
            "strengths": {m: self.strengths_for(m) for m in self.methods},
            "scope": self.scope,
            "hyperparameters": {m: self.hyperparameters.get(m, {}) for m in self.methods},
            "tasks": [t.describe() for t in self.tasks],
            "kl": self.kl,
            "fluency_texts": {"n": len(texts), "fingerprint": _sha(texts)[:16]},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        })


class SweepResults(list[dict[str, Any]]):
    """The cells of a sweep (dicts as in ``results.jsonl``), with helpers.

    ``stats`` counts what :func:`run_sweep` did: ``cells`` (of the spec), ``skipped``
    (already in results.jsonl), ``evaluated``, ``failed``, ``fits`` (fitted now) and
    ``fits_reused`` (loaded from ``fits/``).
    """

    def __init__(self, cells: Iterable[dict[str, Any]] = (), *, spec: dict[str, Any] | None = None,
                 out_dir: Path | None = None, stats: dict[str, int] | None = None) -> None:
        super().__init__(cells)
        self.spec = spec or {}
        self.out_dir = out_dir
        self.stats = stats or {}

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> SweepResults:
        """Read a sweep folder's ``results.jsonl`` (and ``spec.json`` when present)."""
        d = Path(out_dir)
        cells, _ = read_results(d / RESULTS)
        spec = json.loads((d / SPEC).read_text()) if (d / SPEC).is_file() else {}
        return cls(cells.values(), spec=spec, out_dir=d)

    def ok(self) -> list[dict[str, Any]]:
        return [c for c in self if c.get("status") == "ok"]

    def failures(self) -> list[dict[str, Any]]:
        return [c for c in self if c.get("status") != "ok"]

    def baseline(self, task: str, fold: int = 0) -> dict[str, Any] | None:
        """The unsteered cell of ``task`` and ``fold`` (None if missing)."""
        want = cell_id(task, fold)
        return next((c for c in self if c.get("cell") == want), None)

    def frame(self) -> list[dict[str, Any]]:
        """One flat row per finished steered cell: ids, status, the primary metric, its change
        from the unsteered baseline of the same task and fold (``delta``, None without a
        usable baseline), KL, times, and every task metric as ``m.<name>``."""
        rows = []
        base: dict[tuple[str, int], float | None] = {}
        for c in self:
            if c.get("method") is None and c.get("status") == "ok":
                base[(c["task"], int(c["fold"]))] = c.get("primary_value")
        for c in self:
            if c.get("method") is None:
                continue
            b = base.get((c["task"], int(c["fold"])))
            v = c.get("primary_value")
            row = {k: c.get(k) for k in (
                "cell", "task", "fold", "method", "label", "layer", "strength", "status",
                "primary", "kl", "fit_seconds", "eval_seconds")}
            row["value"] = v
            row["baseline"] = b
            row["delta"] = v - b if isinstance(v, int | float) and isinstance(b, int | float) \
                else None
            for k, x in (c.get("metrics") or {}).items():
                row[f"m.{k}"] = x
            rows.append(row)
        return rows


# -- results file --------------------------------------------------------------------------------
def read_results(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Cells of a results file by id (a later line for the same id wins) and the number of
    unreadable lines (a truncated last line from an interrupted write, or corruption)."""
    cells: dict[str, dict[str, Any]] = {}
    bad = 0
    if not path.is_file():
        return cells, 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                cell = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(cell, dict) or "cell" not in cell:
                bad += 1
                continue
            cells[str(cell["cell"])] = cell
    return cells, bad


def _rewrite(path: Path, cells: Iterable[dict[str, Any]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for c in cells:
                fh.write(json.dumps(c, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)


def _append(path: Path, cell: dict[str, Any]) -> None:
    line = json.dumps(_clean(cell), sort_keys=True, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def _prepare_dir(lm: LoadedModel, spec: SweepSpec, out: Path,
                 resume: bool) -> dict[str, dict[str, Any]]:
    """Check or set up ``out``; return the finished cells to skip."""
    out.mkdir(parents=True, exist_ok=True)
    results, spec_path = out / RESULTS, out / SPEC
    if not resume:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        for p in (results, spec_path):
            if p.exists():
                p.replace(p.with_name(f"{p.name}.{stamp}.bak"))
    if spec_path.is_file():
        try:
            old = json.loads(spec_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SweepError(f"{spec_path} is unreadable ({exc}); move it away or run with "
                             f"resume=False to start over") from exc
        old_model = (old or {}).get("model") or {}
        new_model = lm.info.as_dict()
        if old_model and any(old_model.get(k) != new_model[k] for k in
                             ("model_id", "architecture", "hidden_size", "num_layers")):
            raise SweepError(
                f"{out} holds a sweep of model {old_model.get('model_id')!r} "
                f"({old_model.get('architecture')}, {old_model.get('num_layers')} layers), not "
                f"of {lm.info.model_id!r}: give another output folder, or resume=False "
                f"to move the old results aside and start over")
        new = spec.describe(lm)
        changed = [k for k in ("fluency_texts", "scope", "kl")
                   if old.get(k) != new.get(k)]
        if changed:
            warnings.warn(f"{out}: the sweep spec changed ({', '.join(changed)}); finished "
                          f"cells of the earlier spec are kept as they are", stacklevel=3)
    cells, bad = read_results(results)
    if bad:
        warnings.warn(f"{results}: dropped {bad} unreadable line(s) (an interrupted write); "
                      f"those cells will run again", stacklevel=3)
        _rewrite(results, cells.values())
    elif results.is_file() and results.stat().st_size:
        with open(results, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                _rewrite(results, cells.values())
    atomic_write(spec_path, lambda tmp: Path(tmp).write_text(
        json.dumps(spec.describe(lm), indent=2, sort_keys=True)))
    return cells


# -- the sweep -------------------------------------------------------------------------------
def fit_key(lm: LoadedModel, method: str, layer: int, hyperparameters: dict[str, Any],
            task: Task, fold: int, fingerprint: str, scope: str) -> str:
    """Hash naming a cached fit: everything the fitted controller depends on."""
    return _sha({
        "model": lm.info.model_id, "method": method, "layer": int(layer),
        "hyperparameters": hyperparameters, "task": task.fit_name(), "fold": int(fold),
        "data": fingerprint, "recipe": task.recipe, "scope": scope,
    })[:32]


def _error(stage: str, exc: BaseException) -> dict[str, Any]:
    return {"stage": stage, "type": type(exc).__name__, "message": str(exc)[:2000]}


class _Runner:
    def __init__(self, lm: LoadedModel, spec: SweepSpec, out: Path, done: dict[str, Any],
                 progress: bool, retry_failed: bool) -> None:
        self.lm, self.spec, self.out, self.done = lm, spec, out, done
        self.retry_failed = retry_failed
        self.texts = spec.texts() if spec.kl else []
        self.stats = {"cells": 0, "skipped": 0, "evaluated": 0, "failed": 0, "fits": 0,
                      "fits_reused": 0}
        self.cells: list[dict[str, Any]] = []
        self.bar: Any = None
        self.progress = progress

    def plan(self) -> Iterator[tuple[Task, int, str | None, int | None, list[float]]]:
        for task in self.spec.tasks:
            for fold in range(int(getattr(task, "folds", 1) or 1)):
                yield task, fold, None, None, [0.0]
                for method in self.spec.methods:
                    for layer in self.spec.layers:
                        yield task, fold, method, int(layer), \
                            self.spec.strengths_for(method)

    def finished(self, cid: str) -> dict[str, Any] | None:
        c = self.done.get(cid)
        if c is None or (self.retry_failed and c.get("status") != "ok"):
            return None
        return c

    def record(self, cell: dict[str, Any]) -> None:
        cell = _clean(cell)
        _append(self.out / RESULTS, cell)
        self.cells.append(cell)
        self.done[cell["cell"]] = cell
        self.stats["evaluated" if cell["status"] == "ok" else "failed"] += 1
        if self.bar is not None:
            self.bar.update(1)

    def run(self) -> None:
        plan = list(self.plan())
        total = sum(len(s) for *_, s in plan)
        self.stats["cells"] = total
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="sweep", unit="cell", leave=True)
        try:
            fit_sets: dict[tuple[str, int], Any] = {}
            for task, fold, method, layer, strengths in plan:
                label = method_label(method, self.spec.hyperparameters.get(method)) \
                    if method is not None else None
                ids = [cell_id(task.name, fold, label, layer, s) if method is not None
                       else cell_id(task.name, fold) for s in strengths]
                todo = []
                for cid, s in zip(ids, strengths, strict=True):
                    old = self.finished(cid)
                    if old is None:
                        todo.append((cid, s))
                    else:
                        self.cells.append(old)
                        self.stats["skipped"] += 1
                        if self.bar is not None:
                            self.bar.update(1)
                if not todo:
                    continue
                if self.bar is not None:
                    self.bar.set_postfix_str(f"{task.name} f{fold} {label or 'unsteered'} "
                                             f"L{layer}" if method else f"{task.name} f{fold}")
                base = {"task": task.name, "kind": task.kind, "primary": task.primary,
                        "fold": fold, "method": method, "label": label, "layer": layer,
                        "scope": self.spec.scope if method else None,
                        "hyperparameters": self.spec.hyperparameters.get(method, {})
                        if method else {}}
                if method is None:
                    self.evaluate(base, todo[0][0], None, 0.0, task, fold, {})
                    continue
                assert layer is not None
                fit_info = self.fit(task, fold, method, layer, fit_sets)
                for cid, s in todo:
                    if "error" in fit_info:
                        self.record({**base, "cell": cid, "strength": s, "status": "failed",
                                     "error": fit_info["error"],
                                     "fit_seconds": fit_info.get("fit_seconds"),
                                     "finished": _now()})
                    else:
                        self.evaluate(base, cid, fit_info["controller"], s, task, fold,
                                      fit_info)
        finally:
            if self.bar is not None:
                self.bar.close()

    def fit(self, task: Task, fold: int, method: str, layer: int,
            fit_sets: dict[tuple[str, int], Any]) -> dict[str, Any]:
        from steerlab import artifacts
        from steerlab.fitting import fit_method

        key_ts = (task.name, fold)
        if key_ts not in fit_sets:
            try:
                fit_sets[key_ts] = task.fit_set(fold)
            except Exception as exc:
                fit_sets[key_ts] = exc
        data = fit_sets[key_ts]
        if isinstance(data, Exception):
            return {"error": _error("fit_set", data)}
        hp = dict(self.spec.hyperparameters.get(method, {}))
        try:
            fingerprint = data.fingerprint()
        except Exception as exc:
            return {"error": _error("fit_set", exc)}
        key = fit_key(self.lm, method, layer, hp, task, fold, fingerprint, self.spec.scope)
        path = self.out / FITS / f"{key}.safetensors"
        if path.is_file():
            try:
                controller = artifacts.load(path, self.lm.info)
                self.stats["fits_reused"] += 1
                return {"controller": controller, "fit_reused": True, "fit_key": key,
                        "fit_seconds": controller.fit_info.get("fit_seconds")}
            except Exception as exc:
                warnings.warn(f"cached fit {path} is unreadable ({exc}); fitting again",
                              stacklevel=2)
        start = time.perf_counter()
        try:
            controller = fit_method(self.lm, method, data, layer=layer, recipe=task.recipe,
                                    scope=self.spec.scope, progress=False, **hp)
        except Exception as exc:
            return {"error": _error("fit", exc),
                    "fit_seconds": round(time.perf_counter() - start, 3)}
        seconds = round(time.perf_counter() - start, 3)
        self.stats["fits"] += 1
        try:
            artifacts.save(controller, path)
        except Exception as exc:  # an unsavable controller still gets evaluated
            warnings.warn(f"could not cache the {method} fit for layer {layer} ({exc})",
                          stacklevel=2)
            key = ""
        return {"controller": controller, "fit_reused": False, "fit_key": key or None,
                "fit_seconds": seconds}

    def evaluate(self, base: dict[str, Any], cid: str, controller: Any, strength: float,
                 task: Task, fold: int, fit_info: dict[str, Any]) -> None:
        from steerlab.evals.metrics import next_token_kl
        from steerlab.runtime import Steer

        cell: dict[str, Any] = {**base, "cell": cid, "strength": strength,
                                "fit_seconds": fit_info.get("fit_seconds"),
                                "fit_reused": fit_info.get("fit_reused"),
                                "fit_key": fit_info.get("fit_key")}
        steers = None if controller is None else \
            [Steer(controller, strength, self.spec.scope)]
        stage = "evaluate"
        try:
            t0 = time.perf_counter()
            result = task.evaluate(self.lm, steers, fold=fold)
            cell["eval_seconds"] = round(time.perf_counter() - t0, 3)
            metrics = {str(k): float(v) for k, v in result.metrics.items()}
            if task.primary not in metrics:
                raise KeyError(f"task {task.name!r} returned no primary metric "
                               f"{task.primary!r}; it returned {sorted(metrics)}")
            cell.update(metrics=metrics, primary_value=metrics[task.primary], n=result.n,
                        examples=[e[:300] for e in result.examples[:3]])
            stage = "kl"
            if self.spec.kl:
                t0 = time.perf_counter()
                cell["kl"] = 0.0 if steers is None else \
                    next_token_kl(self.lm, self.texts, steers, render=True)
                cell["kl_seconds"] = round(time.perf_counter() - t0, 3)
            else:
                cell["kl"] = None
            cell["status"] = "ok"
        except Exception as exc:
            cell["status"] = "failed"
            cell["error"] = _error(stage, exc)
        cell["finished"] = _now()
        self.record(cell)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_sweep(lm: LoadedModel, spec: SweepSpec, out_dir: str | os.PathLike[str], *,
              progress: bool = True, resume: bool = True,
              retry_failed: bool = False) -> SweepResults:
    """Run (or resume) a sweep into ``out_dir``; see the module docstring.

    Returns the cells of this spec in plan order (finished earlier or now), with
    ``stats``. ``retry_failed`` runs failed cells of an earlier run again (their new line
    supersedes the old one). Raises :class:`SweepError` only for a bad spec or a folder of
    another model; failures inside the grid are recorded, never raised.
    """
    spec.validate()
    out = Path(out_dir)
    done = _prepare_dir(lm, spec, out, resume)
    runner = _Runner(lm, spec, out, done, progress, retry_failed)
    runner.run()
    if retry_failed and runner.stats["evaluated"] + runner.stats["failed"]:
        cells, _ = read_results(out / RESULTS)  # superseded lines out, atomically
        _rewrite(out / RESULTS, cells.values())
    return SweepResults(runner.cells, spec=spec.describe(lm), out_dir=out, stats=runner.stats)
