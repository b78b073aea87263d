"""ODESteer on the embedded model: barrier fit cost and accuracy, behaviour vs CAA (issue 4).

1. Barrier fit on 2 × 1000 last-token activations (TruthfulQA answers, "Q: … A: …", true vs
   false, from ``--truthfulqa``; block ``--layer``): collection time, barrier fit time
   (sketch + logistic regression) and held-out classifier accuracy (seeded 80/20 split).
2. Sentiment: ODESteer fitted on the built-in sentiment pairs, greedy answers (40 tokens) to
   the 38 neutral prompts at several T, against StepODESteer at the same T and CAA on the same
   block at several strengths: mean VADER compound and perplexity under the unsteered model.

Run: ``python benchmarks/ode_eval.py [--json OUT]`` (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from _common import print_behaviour_table
from steerlab.data import LabeledSet, load_truthfulqa_labeled, neutral_prompts, sentiment_pairs
from steerlab.evals.compare import sentiment_sweep
from steerlab.fitting import fit_caa, fit_odesteer
from steerlab.methods import CAA
from steerlab.methods.ode import ODESteer, StepODESteer
from steerlab.models import load_model
from steerlab.runtime import Steer

DEFAULT_TQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa" / \
    "TruthfulQA.csv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--truthfulqa", default=str(DEFAULT_TQA))
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--T", type=float, nargs="+", default=[5.0, 10.0, 20.0, 40.0])
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    lm = load_model()
    out: dict[str, Any] = {"model": lm.info.as_dict(), "layer": args.layer}

    if Path(args.truthfulqa).is_file():
        tqa = load_truthfulqa_labeled(args.truthfulqa)
        rng = random.Random(0)
        pos = [t for t in tqa if t.label == 1]
        neg = [t for t in tqa if t.label == 0]
        rng.shuffle(pos)
        rng.shuffle(neg)
        data = LabeledSet(pos[: args.per_class] + neg[: args.per_class], name="truthfulqa")
        t0 = time.perf_counter()
        ode = fit_odesteer(lm, data, ODESteer(layer=args.layer), progress=False)
        fi = ode.fit_info
        out["barrier"] = {k: fi.get(k) for k in ("collect_seconds", "barrier_fit_seconds",
                                                 "heldout_accuracy", "n_train", "n_heldout",
                                                 "train_accuracy")}
        out["barrier"]["total_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"barrier on 2 x {args.per_class} TruthfulQA activations: {out['barrier']}")
    else:
        print(f"TruthfulQA not found at {args.truthfulqa}: skipping the 2 x 1000 fit")

    data_s = sentiment_pairs()
    ode_s = fit_odesteer(lm, data_s, ODESteer(layer=args.layer), progress=False)
    step_s = fit_odesteer(lm, data_s, StepODESteer(layer=args.layer), progress=False)
    caa = fit_caa(lm, data_s, CAA(layers=args.layer, recipe="last"), progress=False)
    out["sentiment_barrier"] = {k: ode_s.fit_info.get(k) for k in
                                ("heldout_accuracy", "barrier_fit_seconds")}
    prompts = neutral_prompts()
    configs: list[tuple[str, list[Steer]]] = []
    for T in args.T:
        configs.append((f"ODESteer T={T:g}", [Steer(ode_s, T)]))
        configs.append((f"StepODESteer T={T:g}", [Steer(step_s, T)]))
    caa_norm = float(next(iter(caa.vectors.values())).norm())
    for T in args.T:
        s = T / caa_norm
        configs.append((f"CAA (same path length {T:g}: x{s:.2f})", [Steer(caa, s)]))
    table = sentiment_sweep(lm, prompts, configs, max_new_tokens=args.new_tokens,
                            verbose=True)
    out["behaviour"] = table
    print(f"\nbehaviour on {len(prompts)} neutral prompts, {args.new_tokens} greedy tokens, "
          f"block {args.layer}, scope last (the paper's):")
    print_behaviour_table(table, 36)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
