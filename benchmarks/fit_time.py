"""Fit time of every data-fitted method on the embedded model, activation collection included.

Each method is fitted by name (:func:`steerlab.fitting.fit_method`) on the built-in sentiment
pairs (72 pairs, last-token recipe where the method reads one) at block ``--layer`` with the
activation cache off, so every method pays its own forward passes; the estimator's share
(``estimator_seconds``/``flow_fit_seconds``/... where the fitting function records it) is
printed beside the total. Methods fitted in one process share nothing but the loaded model.

Run: ``python benchmarks/fit_time.py [--methods caa iti ...] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

from _common import command_line, machine_facts, print_header
from steerlab.data import sentiment_pairs
from steerlab.fitting import fit_method
from steerlab.models import load_model

DEFAULT = ["caa", "iti", "repe", "probe", "mean_act", "linear_act", "mimic", "angular",
           "odesteer", "innsteer", "alqr", "spid"]
ESTIMATOR_KEYS = ("estimator_seconds", "barrier_fit_seconds", "flow_fit_seconds",
                  "probe_seconds")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--methods", nargs="+", default=DEFAULT)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    print_header("fit time per method (collection included, cache off)", machine_facts())
    lm = load_model()
    data = sentiment_pairs()
    rows: list[dict[str, Any]] = []
    print(f"{'method':12s} {'total s':>8s} {'estimator s':>12s}  sites")
    for m in args.methods:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # ITI chooses its heads among every block's (the paper's), not one block's
            layer = None if m == "iti" else args.layer
            c = fit_method(lm, m, data, layer=layer, cache=False, progress=False)
        total = time.perf_counter() - t0
        est = next((c.fit_info[k] for k in ESTIMATOR_KEYS if k in c.fit_info), None)
        rows.append({"method": m, "total_seconds": round(total, 3), "estimator_seconds": est,
                     "sites": [str(s) for s in c.sites]})
        sites = f"{len(c.sites)} site(s)" if len(c.sites) > 2 else ", ".join(map(str, c.sites))
        print(f"{m:12s} {total:8.2f} {est if est is not None else '-':>12}  {sites}",
              flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"command": command_line(), "rows": rows},
                                                  indent=1))


if __name__ == "__main__":
    main()
