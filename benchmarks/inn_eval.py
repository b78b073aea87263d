"""INNSteer on the embedded model: flow training cost, separability, behaviour vs CAA (issue 5).

1. Flow training on 2 × 1000 last-token activations of width 576 (TruthfulQA answers,
   "Q: … A: …", true vs false, from ``--truthfulqa``; block ``--layer``): collection time,
   training time (default hyper-parameters: 4 couplings, 512-wide, at most 300 epochs with
   early stopping) and held-out separability on a seeded 80/20 split: the same
   scikit-learn logistic-regression probe on the raw activations and on the latents, and the
   jointly trained latent probe.
2. Sentiment: INNSteer fitted on the built-in sentiment pairs, greedy answers (40 tokens) to
   the 38 neutral prompts at several λ, against CAA (``recipe="last"``) on the same block and
   scope at several strengths: mean VADER compound and perplexity under the unsteered model.

Run: ``python benchmarks/inn_eval.py [--json OUT]`` (about 10 minutes on 2 CPU cores).
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
from steerlab.evals.compare import sentiment_sweep, strength_configs
from steerlab.fitting import fit_caa, fit_innsteer
from steerlab.methods import CAA
from steerlab.methods.inn import INNSteer
from steerlab.models import load_model

DEFAULT_TQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa" / \
    "TruthfulQA.csv"
KEYS = ("collect_seconds", "flow_fit_seconds", "epochs_run", "best_epoch", "n_train",
        "n_heldout", "heldout_raw_probe_accuracy", "heldout_latent_probe_accuracy",
        "heldout_joint_probe_accuracy", "latent_mean_diff_norm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--truthfulqa", default=str(DEFAULT_TQA))
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--scope", default="all")
    p.add_argument("--lam", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0])
    p.add_argument("--caa", type=float, nargs="+", default=[1.0, 2.0, 4.0, 6.0])
    p.add_argument("--skip-tqa", action="store_true")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    lm = load_model()
    out: dict[str, Any] = {"model": lm.info.as_dict(), "layer": args.layer}

    if Path(args.truthfulqa).is_file() and not args.skip_tqa:
        tqa = load_truthfulqa_labeled(args.truthfulqa)
        rng = random.Random(0)
        pos = [t for t in tqa if t.label == 1]
        neg = [t for t in tqa if t.label == 0]
        rng.shuffle(pos)
        rng.shuffle(neg)
        data = LabeledSet(pos[: args.per_class] + neg[: args.per_class], name="truthfulqa")
        t0 = time.perf_counter()
        inn = fit_innsteer(lm, data, INNSteer(layer=args.layer), progress=True)
        out["flow"] = {k: inn.fit_info.get(k) for k in KEYS}
        out["flow"]["total_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"flow on 2 x {args.per_class} TruthfulQA activations (d={lm.info.hidden_size}): "
              f"{out['flow']}")
    else:
        print(f"TruthfulQA not used ({args.truthfulqa}): skipping the 2 x 1000 fit")

    data_s = sentiment_pairs()
    inn_s = fit_innsteer(lm, data_s, INNSteer(layer=args.layer, scope=args.scope),
                         progress=False)
    caa = fit_caa(lm, data_s, CAA(layers=args.layer, recipe="last", scope=args.scope),
                  progress=False)
    out["sentiment_flow"] = {k: inn_s.fit_info.get(k) for k in KEYS}
    print(f"sentiment flow: {out['sentiment_flow']}")
    configs = (strength_configs(inn_s, args.lam, "INNSteer lam={s:g}")
               + strength_configs(caa, args.caa, "CAA x{s:g}"))
    prompts = neutral_prompts()
    table = sentiment_sweep(lm, prompts, configs, max_new_tokens=args.new_tokens, verbose=True)
    out["behaviour"] = table
    print(f"\nbehaviour on {len(prompts)} neutral prompts, {args.new_tokens} greedy tokens, "
          f"block {args.layer}, scope {args.scope}:")
    print_behaviour_table(table, 28)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
