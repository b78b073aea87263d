"""Which CAA behaviour sets and blocks does CAA move on one model? A layer scan of A/B sets.

For each behaviour folder under ``../shared/data/caa`` (``--behaviours``), CAA (answer-letter
recipe, the paper's) is fitted on ``--n-train`` A/B pairs at every block in ``--layers`` (one
collection pass for all blocks), and the probability mass on the behaviour-matching letter
is measured on ``--n-test`` held-out pairs (seeded split) unsteered and at ± ``--strength``,
scope ``all`` (CAA's from-the-instruction-end scope covers the whole short A/B prompt).

Run: ``python benchmarks/ab_layer_scan.py [--layers 4 8 12 16 20] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import command_line, machine_facts, print_header
from steerlab.data import ContrastiveSet, load_caa_ab
from steerlab.evals.ab import ab_match_probability
from steerlab.fitting import fit_caa
from steerlab.methods import CAA
from steerlab.models import load_model
from steerlab.runtime import Steer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "caa"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED), help="folder of CAA behaviour folders")
    p.add_argument("--behaviours", nargs="+", default=None)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 16, 20])
    p.add_argument("--strength", type=float, default=4.0)
    p.add_argument("--n-train", type=int, default=150)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    root = Path(args.data)
    if not root.is_dir():
        raise SystemExit(f"{root} is absent")
    behaviours = args.behaviours or sorted(
        d.name for d in root.iterdir() if (d / "generate_dataset.json").is_file())
    print_header("CAA layer scan on A/B behaviour sets", machine_facts())
    lm = load_model()
    out: dict[str, Any] = {"command": command_line(), "model": lm.info.as_dict(),
                           "strength": args.strength, "rows": []}
    print(f"{'behaviour':24s} {'layer':>5s} {'unsteered':>9s} {'+':>7s} {'-':>7s} {'gap':>7s}")
    for b in behaviours:
        data = load_caa_ab(root / b / "generate_dataset.json")
        train, test = data.split(test_fraction=0.25, seed=0)
        train, test = train[: args.n_train], test[: args.n_test]
        assert isinstance(train, ContrastiveSet) and isinstance(test, ContrastiveSet)
        caa = fit_caa(lm, train, CAA(layers=args.layers, recipe="ab", scope="all"),
                      progress=False)
        p0 = ab_match_probability(lm, test)
        for layer in args.layers:
            one = CAA(layers=layer, recipe="ab", scope="all")
            one.set_vectors({s: v for s, v in caa.vectors.items() if s.layer == layer})
            one.model_info = lm.info
            up = ab_match_probability(lm, test, Steer(one, args.strength))
            down = ab_match_probability(lm, test, Steer(one, -args.strength))
            out["rows"].append({"behaviour": b, "layer": layer, "p0": p0, "up": up,
                                "down": down})
            print(f"{b:24s} {layer:5d} {p0:9.3f} {up:7.3f} {down:7.3f} {up - down:+7.3f}",
                  flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
