"""A-LQR fit cost: the whole fit split by step, and our Jacobians vs the full-sequence reference.

First the whole ``fit_alqr`` on the embedded model (``load_model()``: SmolLM2-135M, 30
blocks, d=576, float32, eager attention) from the built-in sentiment pairs, its time split
into activation collection, Jacobians and Riccati (target: under 2 minutes here). Then the
Jacobian step alone, on the texts ``fit_alqr`` linearises along (``jacobian_texts``: prompt
plus positive completion, unrendered, cut to ``--max-tokens`` (24) tokens). Every block is
linearised.

* ``fast`` (``block_jacobians(method="fast")``) runs on all ``--n-prompts`` (32) prompts, once
  per ``--modes`` entry (``jacrev`` by default; ``rev,fwd`` adds ``jacfwd``).
* ``reference`` (``method="reference"``: ``torch.autograd.functional.jacobian`` of the
  full-sequence block, vectorised, as the paper's code) runs on the first ``--ref-prompts``
  (2) prompts only; its time is **scaled linearly** to ``--n-prompts`` (the work per prompt is
  the same: every prompt has ``--max-tokens`` tokens after the cut, which the script checks).

It reports wall seconds, the speed ratio (scaled reference / fast), and the largest relative
difference ``||A_fast - A_ref||_F / ||A_ref||_F`` over the shared prompts and all blocks,
per prompt and for the mean. A one-prompt, one-block warm-up of each method runs first,
untimed. Run nothing else heavy at the same time.

Targets: our Jacobian step at least 5x faster than the reference; the whole fit under 2 min.

Run: ``python benchmarks/alqr_fit.py [--json OUT]``
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from _common import load_average, machine_facts, print_header, print_table, write_json
from steerlab.control.jacobians import JacobianResult, block_jacobians, encode_prompt
from steerlab.data import sentiment_pairs
from steerlab.fitting import fit_alqr, jacobian_texts
from steerlab.methods.alqr import ALQR
from steerlab.models import DEFAULT_MODEL, LoadedModel, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (load_model)")
    p.add_argument("--n-prompts", type=int, default=32)
    p.add_argument("--ref-prompts", type=int, default=2,
                   help="prompts the reference runs on (its time is scaled to --n-prompts)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--modes", default="rev", help="fast-method modes to time: rev, fwd")
    p.add_argument("--attn", default="eager", help="attn_implementation (load_model default)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT",
                   help="write results as JSON")
    args = p.parse_args(argv)
    if min(args.n_prompts, args.ref_prompts, args.max_tokens) < 1:
        p.error("--n-prompts, --ref-prompts and --max-tokens must be positive")
    args.ref_prompts = min(args.ref_prompts, args.n_prompts)
    return args


def build_texts(lm: LoadedModel, n: int) -> list[str]:
    """The texts ``fit_alqr`` linearises along (unrendered positive-class text)."""
    return jacobian_texts(sentiment_pairs(), n)


def rel_errors(fast: JacobianResult, ref: JacobianResult) -> dict[str, float]:
    """Largest relative Frobenius difference per (prompt, block), and of the mean."""
    assert fast.per_prompt is not None and ref.per_prompt is not None
    n = ref.n_prompts
    a, b = fast.per_prompt[:n].flatten(2), ref.per_prompt.flatten(2)
    per = (a - b).norm(dim=2) / b.norm(dim=2)
    mean_a, mean_b = a.mean(0), b.mean(0)
    per_mean = (mean_a - mean_b).norm(dim=1) / mean_b.norm(dim=1)
    return {"max_rel_per_prompt": float(per.max()), "median_rel_per_prompt":
            float(per.median()), "max_rel_mean": float(per_mean.max())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    facts = machine_facts()
    print_header("A-LQR block Jacobians: fast (one-token) vs reference (full sequence)", facts)
    lm = load_model(args.model, attn_implementation=args.attn)
    n_layers, d = lm.info.num_layers, lm.info.hidden_size
    texts = build_texts(lm, args.n_prompts)
    encoded = [encode_prompt(lm, t, max_tokens=args.max_tokens, rendered=False) for t in texts]
    lengths = [int(ids.shape[1]) for ids, _ in encoded]
    distinct = len({tuple(ids[0].tolist()) for ids, _ in encoded})
    print(f"model: {lm.info.model_id} ({lm.info.architecture}, {n_layers} blocks, d={d}, "
          f"attn={args.attn})")
    print(f"prompts: {len(texts)} sentiment prompts + positive completion, unrendered, "
          f"cut to {args.max_tokens} tokens: {sum(cut for _, cut in encoded)} cut, token "
          f"counts {sorted(set(lengths))}, {distinct} distinct token sequences")
    if distinct < len(texts):
        print(f"note: after the cut only {distinct} of {len(texts)} token sequences differ (a "
              f"chat template's fixed header can fill the first {args.max_tokens} tokens); "
              f"each prompt is still computed on its own, so the timings are unaffected")
    ref_lengths = lengths[: args.ref_prompts]
    if any(n != lengths[0] for n in lengths):
        print("warning: prompts differ in length, so scaling the reference time is approximate")

    # The whole fit, split by step (activations come from the cache when already collected;
    # pass a fresh STEERLAB_CACHE to time collection cold).
    t0 = time.perf_counter()
    fitted = fit_alqr(lm, sentiment_pairs(), ALQR(n_jacobian_prompts=args.n_prompts,
                                                  max_tokens=args.max_tokens), progress=False)
    fit_wall = time.perf_counter() - t0
    fi = fitted.fit_info
    split = {"collect_s": fi["collect_seconds"], "jacobians_s": fi["jacobian_seconds"],
             "riccati_s": fi["riccati_seconds"], "total_s": round(fit_wall, 2)}
    print(f"fit_alqr, whole fit: {split} (target: total under 120 s)")

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    # Warm-up (one-time costs of torch.func and of the first forward passes), untimed.
    for mode in modes:
        block_jacobians(lm, texts[:1], layers=[0], jac_mode=mode, progress=False,
                        rendered=False)
    block_jacobians(lm, texts[:1], layers=[0], method="reference", progress=False,
                    rendered=False)

    results: dict[str, Any] = {"facts": facts, "args": vars(args), "lengths": lengths,
                               "fit_split": split,
                               "distinct_sequences": distinct, "fast": {}}
    fast_runs: dict[str, JacobianResult] = {}
    for mode in modes:
        t0 = time.perf_counter()
        res = block_jacobians(lm, texts, max_tokens=args.max_tokens, jac_mode=mode,
                              rendered=False,
                              keep_per_prompt=True, progress=True)
        wall = time.perf_counter() - t0
        fast_runs[mode] = res
        results["fast"][mode] = {"seconds": wall, "per_prompt": wall / len(texts)}
        print(f"fast ({mode}): {wall:.1f} s for {len(texts)} prompts x {n_layers} blocks "
              f"({wall / len(texts):.2f} s per prompt)")
    t0 = time.perf_counter()
    ref = block_jacobians(lm, texts[: args.ref_prompts], max_tokens=args.max_tokens,
                          method="reference", keep_per_prompt=True, progress=True,
                          rendered=False)
    ref_wall = time.perf_counter() - t0
    ref_scaled = ref_wall / args.ref_prompts * len(texts)
    print(f"reference: {ref_wall:.1f} s for {args.ref_prompts} prompts x {n_layers} blocks "
          f"({ref_wall / args.ref_prompts:.2f} s per prompt, token counts {ref_lengths}); "
          f"scaled to {len(texts)} prompts: {ref_scaled:.1f} s (estimate, not measured)")
    results["reference"] = {"seconds": ref_wall, "prompts": args.ref_prompts,
                            "per_prompt": ref_wall / args.ref_prompts,
                            "scaled_seconds": ref_scaled}

    rows = []
    for mode, res in fast_runs.items():
        wall = results["fast"][mode]["seconds"]
        errs = rel_errors(res, ref)
        results["fast"][mode].update(errs, speedup=ref_scaled / wall)
        rows.append([f"fast ({mode})", f"{wall:.1f}", f"{wall / len(texts):.2f}",
                     f"{ref_scaled / wall:.1f}x", f"{errs['max_rel_per_prompt']:.1e}",
                     f"{errs['max_rel_mean']:.1e}"])
    rows.append([f"reference ({args.ref_prompts} prompts, scaled)", f"{ref_scaled:.1f}",
                 f"{ref_wall / args.ref_prompts:.2f}", "1.0x", "-", "-"])
    print()
    print_table(["method", f"s / {len(texts)} prompts", "s / prompt", "speed-up",
                 "max rel err (per prompt)", "max rel err (mean)"], rows)
    print(f"\nrelative errors: ||A_fast - A_ref||_F / ||A_ref||_F over the {args.ref_prompts} "
          f"shared prompts and all {n_layers} blocks")
    print(f"load average (1/5/15 min) at end: {load_average()}")
    write_json(args.json_out, results)
    return results


if __name__ == "__main__":
    main()
