"""SAS on the embedded model: SAE quality at two widths, SAS vs CAA on two tasks (issue 6).

1. SAEs (TopK, k = 32) on block ``--layer``'s output at ``--widths`` × d (default 8× and
   32×, d = 576): token activations of the shipped datasets' texts (``../shared/data``: CAA
   behaviour prompts, TruthfulQA, AdvBench; the first token of each text skipped), a seeded
   held-out set of 50 texts; training time, FVU, mean L0 and dead fraction on the held-out
   tokens, and the model's next-token loss with the reconstruction spliced in.
2. Sentiment: SAS (τ ``--tau``, last-token recipe) per width vs CAA (last-token recipe) on the
   built-in pairs, block ``--layer``, scope ``all``: mean VADER compound of 40 greedy tokens on
   the 38 neutral prompts and their perplexity under the unsteered model; the number of
   non-zero features of each SAS vector.
3. A CAA behaviour set (``--behaviour``, default sycophancy): fitted on 300 A/B pairs
   (answer-letter recipe), the probability of the behaviour-matching letter on 100 held-out
   pairs at several strengths, SAS per width vs CAA.

Run: ``python benchmarks/sas_eval.py [--json OUT]`` (about 40 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from steerlab.corpus import corpus_activations, load_corpus
from steerlab.data import load_caa_ab, neutral_prompts, sentiment_pairs
from steerlab.evals.ab import ab_match_probability
from steerlab.evals.compare import format_row, sentiment_sweep, strength_configs
from steerlab.evals.sae import spliced_loss
from steerlab.fitting import fit_caa, fit_sas
from steerlab.methods import CAA, SAS
from steerlab.models import load_model
from steerlab.runtime import Steer
from steerlab.sae import SAEConfig, evaluate_sae, hook_name_for_site, save_saelens, train_sae

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--widths", type=int, nargs="+", default=[8, 32])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=150_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--behaviour", default="sycophancy")
    p.add_argument("--sas", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--caa", type=float, nargs="+", default=[2.0, 4.0, 6.0])
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--out", default="sas-eval", help="folder for the SAEs")
    p.add_argument("--load", action="store_true",
                   help="load the SAEs saved in --out by an earlier run instead of training")
    p.add_argument("--skip-sentiment", action="store_true")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: this benchmark trains on the shipped datasets")
    lm = load_model()
    d = lm.info.hidden_size
    site = f"resid_post.{args.layer}"
    out: dict[str, Any] = {"model": lm.info.as_dict(), "layer": args.layer, "saes": {}}

    saes: dict[int, Any] = {}
    if args.load:
        from steerlab.sae import load_saelens

        for w in args.widths:
            saes[w] = load_saelens(Path(args.out) / f"sae-{w}x")
            out["saes"][f"{w}x"] = saes[w].train_report
    texts = [] if args.load else load_corpus(SHARED)
    random.Random(0).shuffle(texts)
    held, train = texts[:50], texts[50:]
    t0 = time.perf_counter()
    if not args.load:
        shards = corpus_activations(lm, train, site, max_tokens=args.max_tokens)
        held_acts = corpus_activations(lm, held, site, max_tokens=args.max_tokens)
        out["corpus"] = {"texts": len(texts), "train_tokens": shards.n_tokens,
                         "heldout_tokens": held_acts.n_tokens,
                         "collect_seconds": round(time.perf_counter() - t0, 1)}
        print(f"corpus: {out['corpus']}", flush=True)

    for w in [] if args.load else args.widths:
        cfg = SAEConfig(d_in=d, d_sae=w * d, architecture="topk", k=args.k, site=site,
                        hook_name=hook_name_for_site(site), model_name=lm.info.model_id)
        sae, report = train_sae(shards, cfg, epochs=args.epochs, eval_activations=held_acts)
        ev = evaluate_sae(sae, held_acts)
        sl = spliced_loss(lm, sae, site, held)
        row = {"d_sae": w * d, "train_seconds": report.train_seconds,
               "tokens_seen": report.tokens_seen, **{k: ev[k] for k in
                                                     ("fvu", "mean_l0", "dead_fraction")},
               **sl}
        sae.train_report = row
        save_saelens(sae, Path(args.out) / f"sae-{w}x")
        out["saes"][f"{w}x"] = row
        saes[w] = sae
        print(f"SAE {w}x: {row}", flush=True)

    # sentiment
    pairs = sentiment_pairs()
    caa = fit_caa(lm, pairs, CAA(layers=args.layer, recipe="last", scope="all"),
                  progress=False)
    configs: list[tuple[str, list[Steer]]] = []
    out["sas_features"] = {}
    for w, sae in saes.items():
        sas = fit_sas(lm, pairs, SAS(args.layer, sae=sae, tau=args.tau, recipe="last",
                                     scope="all"), progress=False)
        out["sas_features"][f"{w}x sentiment"] = sas.fit_info["n_features"]
        configs += strength_configs(sas, args.sas, f"SAS {w}x lam={{s:g}}")
    configs += strength_configs(caa, args.caa, "CAA x{s:g}")
    if not args.skip_sentiment:
        table = sentiment_sweep(lm, neutral_prompts(), configs,
                                max_new_tokens=args.new_tokens, verbose=True)
        out["sentiment"] = table
        print(f"\nsentiment, block {args.layer}, scope all; SAS features "
              f"{out['sas_features']}")
        for r in table:
            print(format_row(r, "vader", "VADER", width=24))

    # behaviour set
    data = load_caa_ab(SHARED / "caa" / args.behaviour / "generate_dataset.json")
    train_ab, test_ab = data.split(test_fraction=0.25, seed=0)
    train_ab, test_ab = train_ab[:300], test_ab[:100]
    caa_ab = fit_caa(lm, train_ab, CAA(layers=args.layer, recipe="ab", scope="all"),
                     progress=False)
    rows: list[dict[str, Any]] = [{"config": "unsteered",
                                   "p_match": ab_match_probability(lm, test_ab)}]
    for w, sae in saes.items():
        sas = fit_sas(lm, train_ab, SAS(args.layer, sae=sae, tau=args.tau, recipe="ab",
                                        scope="all"), progress=False)
        out["sas_features"][f"{w}x {args.behaviour}"] = sas.fit_info["n_features"]
        for lam in args.sas:
            for sign in (1, -1):
                rows.append({"config": f"SAS {w}x lam={sign * lam:g}", "p_match":
                             ab_match_probability(lm, test_ab, Steer(sas, sign * lam))})
                print(f"  {rows[-1]['config']:24s} {rows[-1]['p_match']:.3f}", flush=True)
    for s in args.caa:
        for sign in (1, -1):
            rows.append({"config": f"CAA x{sign * s:g}", "p_match":
                         ab_match_probability(lm, test_ab, Steer(caa_ab, sign * s))})
    out["behaviour"] = {"set": args.behaviour, "n_train": len(train_ab),
                        "n_test": len(test_ab), "rows": rows}
    print(f"\n{args.behaviour}: P(matching letter) on {len(test_ab)} held-out pairs")
    for r in rows:
        print(f"  {r['config']:24s} {r['p_match']:.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
