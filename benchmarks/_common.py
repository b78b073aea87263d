"""Helpers shared by the benchmark scripts: machine facts, interleaved timing, output."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def command_line() -> str:
    """The command that started this process, shell-quoted."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def machine_facts() -> dict[str, Any]:
    """What the numbers depend on: interpreter, torch, threads, cores."""
    import transformers

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count() or 0
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "load_average_at_start": load_average(),
    }


def print_header(title: str, facts: dict[str, Any]) -> None:
    print(f"# {title}")
    print(f"command: {command_line()}")
    print(
        f"machine: {facts['platform']} | cpu_count={facts['cpu_count']} "
        f"(affinity {facts['cpu_affinity']}) | torch {facts['torch']} "
        f"threads={facts['torch_threads']} interop={facts['torch_interop_threads']} | "
        f"transformers {facts['transformers']} | python {facts['python']}"
    )
    print(f"load average (1/5/15 min) at start: {facts['load_average_at_start']}")


def interleaved(
    cases: Mapping[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Time every case ``repeats`` times, interleaved, and return wall seconds per case.

    Each round runs every case once; the order rotates by one each round so that every case
    takes every slot equally often and slow drifts of the machine hit all cases alike. The
    warm-up rounds run first and are not recorded.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t0)
        if on_round is not None:
            on_round(r)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(base: Sequence[float], other: Sequence[float]) -> float:
    """Median over rounds of ``base[r] / other[r]``: a speed ratio (other relative to base)
    taken within each round, so noise that hits a whole round cancels out."""
    return median([b / o for b, o in zip(base, other, strict=True)])


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def spread(xs: Sequence[float]) -> float:
    """Relative spread of repeated timings: (max - min) / median."""
    m = median(xs)
    return (max(xs) - min(xs)) / m if m > 0 else 0.0


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> None:
    """A plain, monospace table, right-aligned except the first ``left`` columns."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths, strict=True)):
            out.append(str(c).ljust(w) if i < left else str(c).rjust(w))
        return "  ".join(out).rstrip()

    print(fmt(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row))


def print_behaviour_table(rows: Sequence[Mapping[str, Any]], width: int, *,
                          primary: str = "vader", label: str = "VADER") -> None:
    """The behaviour-vs-fluency rows of ``steerlab.evals.compare.compare_configs`` (or
    ``sentiment_sweep``): config, primary metric, its shift, perplexity and its ratio."""
    print(f"  {'config':{width}s} {label:>7s} {'shift':>7s} {'ppl':>6s} {'ratio':>6s}")
    for r in rows:
        print(f"  {r['config']:{width}s} {r[primary]:+7.3f} {r['shift']:+7.3f} "
              f"{r['ppl']:6.2f} {r['ppl_ratio']:6.2f}")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
