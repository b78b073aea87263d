"""The baselines (issue 7) beside CAA on one model: behaviour shift at equal fluency, fit time.

Methods: CAA, ITI, RepE (PCA of pair differences), probe direction, Mean-AcT, Linear-AcT,
MiMiC and angular steering, each fitted by :mod:`steerlab.fitting` (collection included in
the fit time; no activation cache, so every method pays its own forward passes).

1. **Sentiment** (the foundation task): fitted on the built-in sentiment pairs (recipe
   ``last``) at block ``--layer``; each method steers the greedy answers to the built-in
   neutral prompts (scope ``all``, ``--new-tokens`` tokens) at a grid of strengths. Reported:
   mean VADER shift from unsteered and the answers' perplexity ratio under the unsteered
   model; the summary is the best shift among strengths whose perplexity ratio stays within
   ``--ppl-budget`` ("behaviour shift at equal fluency").
2. **A CAA behaviour set** (``--behaviour``, default sycophancy): fitted on ``--n-train``
   A/B pairs (recipe ``ab``: the answer letter), scored on ``--n-test`` held-out pairs: the
   probability mass on the behaviour-matching letter (CAA's protocol) at ± each strength;
   fluency is the mean next-token KL from the unsteered model on the neutral prompts
   (:func:`steerlab.evals.metrics.next_token_kl`, the same scope); the summary is the
   largest shift of P(match) in each direction among strengths within ``--kl-budget``.

Online overhead (tokens/s steered vs unsteered) is measured by ``benchmarks/overhead.py
--methods baselines`` in one run on a quiet machine.

Run: ``python benchmarks/baselines_eval.py [--json out.json]`` (about 15 minutes on 2 CPU
cores; needs ``../shared/data`` for the behaviour set, else that part is skipped).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _common import command_line, machine_facts, print_header
from steerlab.data import ContrastiveSet, load_caa_ab, neutral_prompts, sentiment_pairs
from steerlab.evals.ab import ab_match_probability
from steerlab.evals.compare import sentiment_sweep, strength_configs
from steerlab.evals.metrics import next_token_kl
from steerlab.fitting import fit_method
from steerlab.methods import Controller
from steerlab.models import LoadedModel, load_model
from steerlab.runtime import Steer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# Strength grids per method (their units differ: CAA/RepE/probe/Mean-AcT move by multiples
# of the class-mean gap, AcT/MiMiC interpolate towards (λ > 1: past) the transport map, ITI
# multiplies α = 15, angular steering rotates a fraction of the way to the target angle).
GRIDS: dict[str, list[float]] = {
    "caa": [1.0, 2.0, 4.0, 6.0],
    "iti": [0.5, 1.0, 2.0, 4.0],
    "repe": [1.0, 2.0, 4.0, 6.0],
    "probe": [1.0, 2.0, 4.0, 6.0],
    "mean_act": [1.0, 2.0, 4.0, 6.0],
    "linear_act": [1.0, 2.0, 4.0, 6.0],
    "mimic": [0.5, 1.0, 2.0, 4.0],
    "angular": [0.25, 0.5, 0.75, 1.0],
}
NAMES = {"caa": "CAA", "iti": "ITI", "repe": "RepE", "probe": "Probe", "mean_act": "Mean-AcT",
         "linear_act": "Linear-AcT", "mimic": "MiMiC", "angular": "Angular"}


def fit_timed(lm: LoadedModel, method: str, data: Any, layer: int, recipe: str,
              scope: str) -> Controller:
    """``method`` fitted by name at ``layer`` (ITI: every block, its own default), with the
    wall time of the whole fit in ``fit_info["wall_fit_seconds"]``."""
    t0 = time.perf_counter()
    c: Controller = fit_method(lm, method, data, layer=None if method == "iti" else layer,
                               recipe=recipe, scope=scope, cache=False, progress=False)
    c.fit_info["wall_fit_seconds"] = round(time.perf_counter() - t0, 3)
    return c


def best_within(rows: list[dict[str, Any]], key: str, budget_key: str, budget: float,
                sign: float = 1.0) -> dict[str, Any] | None:
    ok = [r for r in rows if r[budget_key] <= budget]
    return max(ok, key=lambda r: sign * r[key]) if ok else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--methods", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--ppl-budget", type=float, default=1.5)
    p.add_argument("--kl-budget", type=float, default=0.1)
    p.add_argument("--behaviour", default="sycophancy")
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--skip-sentiment", action="store_true")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    print_header("baselines vs CAA: behaviour at equal fluency, fit time", machine_facts())
    lm = load_model()
    out: dict[str, Any] = {"command": command_line(), "model": lm.info.as_dict(),
                           "layer": args.layer, "sentiment": {}, "behaviour": {}}
    prompts = neutral_prompts()

    if not args.skip_sentiment:
        data = sentiment_pairs()
        print(f"\n## sentiment: {len(data)} pairs, block {args.layer}, scope all, "
              f"{len(prompts)} neutral prompts x {args.new_tokens} greedy tokens")
        for m in args.methods:
            c = fit_timed(lm, m, data, args.layer, "last", "all")
            configs = strength_configs(c, GRIDS[m], NAMES[m] + " x{s:g}")
            rows = sentiment_sweep(lm, prompts, configs, max_new_tokens=args.new_tokens,
                                   verbose=True)
            for r, s in zip(rows[1:], GRIDS[m], strict=True):
                r["strength"] = s
            best = best_within(rows[1:], "shift", "ppl_ratio", args.ppl_budget)
            out["sentiment"][m] = {"fit_seconds": c.fit_info["wall_fit_seconds"],
                                   "fit_info": _jsonable(c.fit_info), "rows": rows,
                                   "best_within_budget": best}
            print(f"{NAMES[m]}: fit {c.fit_info['wall_fit_seconds']} s; best shift within ppl "
                  f"x{args.ppl_budget}: {_fmt(best, 'shift', 'ppl_ratio')}", flush=True)

    path = SHARED / "caa" / args.behaviour / "generate_dataset.json"
    if path.is_file():
        ab = load_caa_ab(path)
        train, test = ab.split(test_fraction=0.25, seed=0)
        train, test = train[: args.n_train], test[: args.n_test]
        assert isinstance(train, ContrastiveSet) and isinstance(test, ContrastiveSet)
        p0 = ab_match_probability(lm, test)
        print(f"\n## {args.behaviour}: fit on {len(train)} A/B pairs (answer letter), "
              f"P(matching letter) on {len(test)} held-out pairs; unsteered {p0:.3f}; "
              f"KL on the neutral prompts (scope all)")
        out["behaviour"] = {"set": args.behaviour, "n_train": len(train), "n_test": len(test),
                            "p_match_unsteered": p0, "methods": {}}
        for m in args.methods:
            c = fit_timed(lm, m, train, args.layer, "ab", "all")
            rows = []
            for s in GRIDS[m]:
                for sign in (1.0, -1.0):
                    st = Steer(c, sign * s)
                    pm = ab_match_probability(lm, test, st)
                    kl = next_token_kl(lm, prompts, st, render=True)
                    rows.append({"strength": sign * s, "p_match": pm, "shift": pm - p0,
                                 "kl": kl})
                    print(f"  {NAMES[m]:10s} {sign * s:+6g}  P(match) {pm:.3f} "
                          f"({pm - p0:+.3f})  KL {kl:.3f}", flush=True)
            up = best_within(rows, "shift", "kl", args.kl_budget, 1.0)
            down = best_within(rows, "shift", "kl", args.kl_budget, -1.0)
            out["behaviour"]["methods"][m] = {
                "fit_seconds": c.fit_info["wall_fit_seconds"],
                "fit_info": _jsonable(c.fit_info), "rows": rows,
                "best_up_within_budget": up, "best_down_within_budget": down}
            print(f"{NAMES[m]}: fit {c.fit_info['wall_fit_seconds']} s; within KL "
                  f"{args.kl_budget}: up {_fmt(up, 'shift', 'kl')}, down "
                  f"{_fmt(down, 'shift', 'kl')}", flush=True)
    else:
        print(f"{path} is absent: behaviour set skipped")

    print("\n## summary")
    print(f"{'method':11s} {'fit s':>6s} {'sent. shift':>11s} {'@ppl':>5s} {'fit s':>6s} "
          f"{'A/B up':>7s} {'A/B down':>8s}")
    for m in args.methods:
        s = out["sentiment"].get(m, {})
        b = out["behaviour"].get("methods", {}).get(m, {}) if out["behaviour"] else {}
        bs = s.get("best_within_budget")
        up, down = b.get("best_up_within_budget"), b.get("best_down_within_budget")
        print(f"{NAMES[m]:11s} {s.get('fit_seconds', float('nan')):6.2f} "
              f"{bs['shift'] if bs else float('nan'):+11.3f} "
              f"{bs['ppl_ratio'] if bs else float('nan'):5.2f} "
              f"{b.get('fit_seconds', float('nan')):6.2f} "
              f"{up['shift'] if up else float('nan'):+7.3f} "
              f"{down['shift'] if down else float('nan'):+8.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


def _fmt(row: dict[str, Any] | None, key: str, cost: str) -> str:
    if row is None:
        return "none within budget"
    return f"{row[key]:+.3f} at strength {row.get('strength', row.get('config'))} " \
           f"({cost} {row[cost]:.3f})"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


if __name__ == "__main__":
    main()
