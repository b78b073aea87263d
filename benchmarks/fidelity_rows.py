"""How the methods whose defaults changed for reproduction fidelity (issue 15) move on the
results page: A-LQR (LFS at the last token; the strength now scales the feedback),
S-PID (the reference's integral reset and carried derivative), ODESteer (the barrier fitted
on all the data in the paper preset) and ITI (σ from a separate tuning slice, ddof 1), each
with its new defaults and with ``preset="paper"``.

Same tasks, model, prompts, block, strengths, scope and KL budget as
``benchmarks/results_page.py`` (its settings are imported, not copied), in one run; the
previous figures are read from the "Best change within the KL budget" table of the current
``docs/results.md`` (written by the code before issue 15). Writes
``docs/results-fidelity.md``. Needs ``../shared/data``.

Run: ``python benchmarks/fidelity_rows.py`` (resumable: finished cells are skipped).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from _common import command_line, machine_facts
from results_page import SHARED, STRENGTHS
from steerlab.data import neutral_prompts
from steerlab.evals.report import compare_table
from steerlab.evals.sweep import SweepResults, SweepSpec, method_label, run_sweep
from steerlab.evals.tasks import CapabilityUnder, make_task
from steerlab.models import load_model

REPO = Path(__file__).resolve().parents[1]
# (display name, method, extra hyper-parameters given to fit_method)
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("alqr (new default: recipe last)", "alqr", {}),
    ("alqr (paper preset)", "alqr", {"preset": "paper"}),
    ("spid (new default = reference rules)", "spid", {}),
    ("spid (paper preset)", "spid", {"preset": "paper"}),
    ("odesteer (default)", "odesteer", {}),
    ("odesteer (paper preset)", "odesteer", {"preset": "paper"}),
    ("iti (default)", "iti", {}),
    ("iti (paper preset)", "iti", {"preset": "paper"}),
]


def previous_rows(page: Path) -> dict[str, list[str]]:
    """Method -> cells of the old page's best-change table (header row under key "")."""
    out: dict[str, list[str]] = {}
    if not page.is_file():
        return out
    text = page.read_text()
    m = re.search(r"## Best change within the KL budget\n\n(.*?)\n\n", text, re.S)
    if not m:
        return out
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == "method":
            out[""] = cells[1:]
        elif cells and not set(cells[0]) <= {"-"}:
            out[cells[0]] = cells[1:]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(REPO / "results-run" / "fidelity"))
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--behaviour", default="corrigible-neutral-HHH")
    p.add_argument("--tqa-questions", type=int, default=60)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--prompts", type=int, default=19)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.25, help="KL budget (nats)")
    p.add_argument("--only", nargs="*", default=None, help="methods to run (default: all)")
    p.add_argument("--no-presets", action="store_true", help="only the new defaults")
    p.add_argument("--out", default=str(REPO / "docs" / "results-fidelity.md"))
    p.add_argument("--tasks", nargs="*", default=None,
                   help="task names to run (default: all four of the results page)")
    args = p.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: this benchmark needs the shipped datasets")
    old = previous_rows(REPO / "docs" / "results.md")
    facts = machine_facts()
    run = Path(args.run)
    lm = load_model()
    sent = make_task("sentiment", lm, n_test=args.prompts, max_new_tokens=args.new_tokens,
                     batch_size=args.prompts)
    ab = make_task(f"ab:{args.behaviour}", lm, n_test=args.n_test)
    mmlu = make_task("mmlu_ab", lm, n_test=args.n_test)
    tqa = make_task("truthfulqa_mc", lm, n_questions=args.tqa_questions, fit_format="pairs")
    tasks = [sent, ab, CapabilityUnder(mmlu, ab), tqa]
    if args.tasks:
        tasks = [t for t in tasks if t.name in args.tasks]
    t0 = time.perf_counter()
    all_cells: list[Any] = []
    names: dict[str, str] = {}
    for i, (name, method, hp) in enumerate(VARIANTS):
        if args.only and method not in args.only:
            continue
        if args.no_presets and "preset" in hp:
            continue
        spec = SweepSpec(methods=[method], layers=[args.layer],
                         strengths={method: STRENGTHS[method]}, tasks=tasks, scope="all",
                         hyperparameters={method: hp} if hp else {},
                         fluency_texts=neutral_prompts()[: args.prompts])
        res = run_sweep(lm, spec, run / f"v{i}-{method}")
        names[method_label(method, hp or None)] = name
        all_cells.extend(res)
    seconds = time.perf_counter() - t0
    best = compare_table(SweepResults(all_cells), "kl", args.budget)
    task_names = list(best)
    lines = [
        "# Fidelity defaults: how the changed methods' rows moved",
        "",
        f"`smollm2-135m`, block {args.layer}, scope `all`, the results page's tasks and "
        f"strengths, KL budget {args.budget:g} nats; {facts['cpu_count']}-core CPU, "
        f"{seconds / 60:.1f} min for this invocation (`{command_line()}`; cells already "
        f"in `{run.name}/` are reused). Each cell: best change of the task's primary metric "
        f"within the budget (strength, KL); \"before\" rows are the previous "
        f"`docs/results.md` (code before issue 15).",
        "",
        "| method | " + " | ".join(task_names) + " |",
        "|---|" + "---|" * len(task_names),
    ]
    header = old.get("", [])
    shown: set[str] = set()
    before_done: set[str] = set()
    for _, method, hp in VARIANTS:
        label = method_label(method, hp or None)
        if label not in names or label in shown:
            continue
        shown.add(label)
        if method in old and method not in before_done:
            before_done.add(method)
            before = old[method]
            row = [before[header.index(t)] if t in header else "—" for t in task_names]
            lines.append(f"| {method} (before) | " + " | ".join(row) + " |")
        row = []
        for t in task_names:
            b = best[t].get(label)
            row.append("—" if b is None else
                       f"{b['delta']:+.3f} (s={b['strength']:g}, KL {b['cost']:.3f})")
        lines.append(f"| {names[label]} | " + " | ".join(row) + " |")
    lines += ["", "— : no cell of that method within the KL budget on that task (or none "
              "completed).", ""]
    out = Path(args.out)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
