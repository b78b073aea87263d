"""A-LQR on the embedded model: setpoint tracking and behaviour vs CAA (issue 3 figures).

1. Fits A-LQR (defaults q=0.1, r=3, q_f=0.1; LFS from the built-in sentiment pairs,
   completion-mean activations; Jacobians along 32 positive texts of 24 tokens), ActAdd-LFS
   (P-controller, K_p = 1, on one block) and CAA (one block), and prints A-LQR's fit time
   split (collection, Jacobians, Riccati).
2. Setpoint tracking on the 38 held-out neutral prompts, at the last prompt token: the share
   of (prompt, layer) pairs with |v_kᵀz_k − β*_k| ≤ 0.1·μ_k (β*_k = λ·μ_k), unsteered vs
   A-LQR vs ActAdd-LFS vs CAA at matched strength (CAA's strength is chosen so that its
   injected norm equals A-LQR's mean total Σ_k‖u_k‖ on these prompts).
3. Behaviour: mean VADER compound of greedy answers (40 tokens) to the neutral prompts and
   their perplexity under the unsteered model, A-LQR (scope last, and A-LQR+ scope all) at
   several λ vs CAA at several strengths.

Run: ``python benchmarks/alqr_eval.py [--json OUT]`` (about 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from _common import print_behaviour_table
from steerlab.data import neutral_prompts, sentiment_pairs
from steerlab.diagnostics.setpoint import setpoint_trace
from steerlab.evals.compare import sentiment_sweep
from steerlab.fitting import fit_alqr, fit_caa, fit_lfs_baseline
from steerlab.methods import ALQR, CAA, ActAddLFS
from steerlab.models import load_model
from steerlab.runtime import Steer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", type=int, default=8, help="block for CAA and ActAdd-LFS")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    lm = load_model()
    data = sentiment_pairs()
    prompts = neutral_prompts()
    out: dict[str, Any] = {"model": lm.info.as_dict()}

    t0 = time.perf_counter()
    alqr = fit_alqr(lm, data, ALQR(), progress=False)
    fit_total = time.perf_counter() - t0
    fi = alqr.fit_info
    out["fit"] = {k: fi[k] for k in ("collect_seconds", "jacobian_seconds", "riccati_seconds",
                                     "riccati_cond_max", "jacobian_prompts")}
    out["fit"]["total_seconds"] = round(fit_total, 2)
    print(f"A-LQR fit: {out['fit']}")
    lfs_p = fit_lfs_baseline(lm, data, ActAddLFS(layers=[args.layer], kp=1.0), progress=False)
    caa = fit_caa(lm, data, CAA(layers=args.layer, recipe="mean"), progress=False)

    # -- tracking ---------------------------------------------------------------------------
    base = setpoint_trace(lm, alqr, prompts, [])
    tr_alqr = setpoint_trace(lm, alqr, prompts, [Steer(alqr, 1.0)])
    alpha = tr_alqr.target[None, :] - tr_alqr.projection  # α_k at the steered state
    injected = float((alpha.abs() * alqr.w[0].norm(dim=-1)[None, :]).sum(1).mean())
    caa_norm = float(next(iter(caa.vectors.values())).norm())
    matched = injected / caa_norm
    tr_lfs = setpoint_trace(lm, alqr, prompts, [Steer(lfs_p, 1.0)])
    tr_caa = setpoint_trace(lm, alqr, prompts, [Steer(caa, matched)])
    rows = {"unsteered": base, "A-LQR (λ=1)": tr_alqr, f"ActAdd-LFS (block {args.layer})":
            tr_lfs, f"CAA (block {args.layer}, strength {matched:.2f})": tr_caa}
    out["tracking"] = {name: {"fraction_all_layers": t.tracking_fraction(0.1),
                              "fraction_after_first": t.tracking_fraction(
                                  0.1, range(1, lm.info.num_layers)),
                              "mean_abs_error_over_mu": float(
                                  ((t.projection - t.target).abs() / t.mu).mean()),
                              "projection_mean": [round(x, 3) for x in
                                                  t.projection.mean(0).tolist()]}
                       for name, t in rows.items()}
    out["tracking_target"] = [round(x, 3) for x in tr_alqr.target.tolist()]
    out["alqr_injected_norm"] = injected
    print("\nsetpoint tracking, |v_k^T z_k - beta*_k| <= 0.1 mu_k, last prompt token, "
          f"{len(prompts)} held-out prompts:")
    for name, r in out["tracking"].items():
        print(f"  {name:36s} all layers {r['fraction_all_layers']:.3f}   layers 1..L-1 "
              f"{r['fraction_after_first']:.3f}   mean |err|/mu {r['mean_abs_error_over_mu']:.3f}")

    # -- behaviour --------------------------------------------------------------------------
    configs: list[tuple[str, list[Steer]]] = []
    for lam in (1.0, 2.0, 3.0):
        configs.append((f"A-LQR λ={lam}", [Steer(alqr, lam)]))
    for lam in (1.0, 2.0):
        configs.append((f"A-LQR+ λ={lam}", [Steer(alqr, lam, scope="all")]))
    for s in (2.0, 3.5):
        configs.append((f"CAA block {args.layer} +{s} (scope all)", [Steer(caa, s, "all")]))
        configs.append((f"CAA block {args.layer} +{s} (scope last)", [Steer(caa, s, "last")]))
    table = sentiment_sweep(lm, prompts, configs, max_new_tokens=args.new_tokens,
                            verbose=True)
    out["behaviour"] = table
    print(f"\nbehaviour on {len(prompts)} neutral prompts, {args.new_tokens} greedy tokens:")
    print_behaviour_table(table, 34)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
    torch.set_printoptions(precision=3)


if __name__ == "__main__":
    main()
