"""Render the JSON written by ``benchmarks/peers.py --json`` as ``docs/results-peers.md``.

Usage::

    python benchmarks/peers_page.py RUN.json [MORE.json ...] --out docs/results-peers.md

Each task (``sentiment``, ``ab:<behaviour>``) is taken from the last file that has it, so a
sentiment-only rerun (``--skip-ab``) and an A/B run combine into one page. The tables are the
benchmark's own figures (best change per family and direction under its admissibility rule,
the headline against the peers, every measured point); nothing is recomputed here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _fmt_best(p: dict[str, Any] | None, task: str) -> str:
    if not p:
        return "-"
    if task == "sentiment":
        return f"{p['change']:+.3f} (s={p['strength']:g}, ppl ×{p['ppl_ratio']:.2f})"
    return f"{p['change']:+.3f} (s={p['strength']:g}, letter mass {p['letter_mass']:.2f})"


def _fmt_point(p: dict[str, Any], task: str) -> str:
    if task == "sentiment":
        return (f"s={p['strength']:g}: {p['change']:+.3f} ×{p['ppl_ratio']:.2f} "
                f"{p['degenerate']:.2f}")
    return f"s={p['strength']:g}: {p['change']:+.3f} mass {p['letter_mass']:.2f}"


def _headline(h: dict[str, Any]) -> list[str]:
    out = []
    for direction in ("positive", "negative"):
        d = h.get(direction)
        if not d:
            continue
        best = d["best"]
        peers = ", ".join(f"{lib} {b['change']:+.3f} (`{b['family']}`)"
                          for lib, b in best.items() if lib != "steerlab" and b)
        ours = best.get("steerlab")
        beat = d.get("steerlab_beating_both") or []
        line = (f"* **{direction}**: peers' best {peers}; steerlab's best "
                + (f"{ours['change']:+.3f} (`{ours['family']}`)" if ours else "none")
                + f"; steerlab families beating both: {len(beat)}")
        if beat:
            line += " (" + ", ".join(f"`{b['family']}` by {b['margin']:+.3f}" for b in beat) + ")"
        out.append(line)
    return out


def render_task(name: str, task: dict[str, Any]) -> list[str]:
    kind = "sentiment" if name == "sentiment" else "ab"
    base = task.get("unsteered", {})
    lines = [f"## {name}", ""]
    if kind == "sentiment":
        lines.append(f"Unsteered: VADER {base.get('vader', float('nan')):+.3f}, perplexity "
                     f"{base.get('ppl', float('nan')):.2f}.")
    else:
        lines.append(f"Unsteered: P(match) {base.get('p_match', float('nan')):.3f}, letter mass "
                     f"{base.get('letter_mass', float('nan')):.3f}.")
    lines += ["", "| family | block | scope | best positive change | best negative change |",
              "|---|---|---|---|---|"]
    for f in task["families"]:
        lines.append(f"| `{f['name']}` | {f['block']} | {f['scope']} | "
                     f"{_fmt_best(f.get('best_positive'), kind)} | "
                     f"{_fmt_best(f.get('best_negative'), kind)} |")
    lines += ["", *(_headline(task.get("headline", {}))), "", "Fronts (every measured point):",
              ""]
    for f in task["families"]:
        pts = sorted(f.get("points", []), key=lambda p: p["strength"])
        lines.append(f"* `{f['name']}`: " + ", ".join(_fmt_point(p, kind) for p in pts))
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="JSON files written by peers.py --json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--intro", default=None, help="a Markdown file to put before the tables")
    args = ap.parse_args()
    tasks: dict[str, dict[str, Any]] = {}
    commands = []
    for path in args.runs:
        run = json.loads(Path(path).read_text())
        commands.append(run.get("command", ""))
        tasks.update(run["tasks"])
    lines = [Path(args.intro).read_text().rstrip() + "\n"] if args.intro else []
    lines += ["Commands of the runs rendered here:", ""]
    lines += [f"    {c}" for c in commands] + [""]
    for name, task in tasks.items():
        lines += render_task(name, task)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
