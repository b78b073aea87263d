"""Evaluation throughput: generated tokens per second of the harness vs plain generation.

Three ways to produce and score the same greedy answers to the built-in neutral prompts
(``--prompts`` of them, ``--new-tokens`` each, a CAA steer at block 12, scope ``all``):

* ``plain generate``: ``lm.model.generate`` on the whole batch under the steering context,
  nothing else (the ceiling);
* ``harness (Sentiment task)``: :class:`steerlab.evals.tasks.Sentiment` ``evaluate``:
  batched steered generation, VADER, perplexity of the answers under the unsteered model,
  Dist-n and repetition;
* ``one prompt at a time``: the obvious implementation, generating each prompt alone.

Tokens per second count generated tokens (prompts x new tokens; generation runs exactly
``--new-tokens`` tokens per row). Interleaved rounds, medians.

Run: ``python benchmarks/eval_throughput.py [--repeats 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from _common import command_line, machine_facts, print_header, write_json
from steerlab.data import Renderer, neutral_prompts, sentiment_pairs
from steerlab.evals.tasks import Sentiment
from steerlab.fitting import fit_caa
from steerlab.methods import CAA
from steerlab.models import load_model
from steerlab.runtime import Steer, steering, tokenize_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=19)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    print_header("evaluation throughput: harness vs plain generation", machine_facts())
    lm = load_model()
    caa = fit_caa(lm, sentiment_pairs(), CAA(layers=12, scope="all"), progress=False)
    steer = Steer(caa, 2.0)
    prompts = neutral_prompts()[: args.prompts]
    task = Sentiment(n_test=args.prompts, max_new_tokens=args.new_tokens,
                     batch_size=args.prompts)
    task.evaluate(lm, None)  # the unsteered baseline is cached on the task, as in a sweep
    renderer = Renderer(lm.tokenizer)
    kw: dict[str, Any] = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
                          "do_sample": False, "temperature": None, "top_p": None,
                          "top_k": None, "pad_token_id": lm.tokenizer.pad_token_id}

    def plain() -> None:
        enc = tokenize_prompts(lm, [renderer.prompt(x) for x in prompts], rendered=True)
        with torch.no_grad(), steering(lm, [steer]):
            lm.model.generate(**enc, **kw)

    def harness() -> None:
        task.evaluate(lm, [steer])

    def one_at_a_time() -> None:
        for x in prompts:
            enc = tokenize_prompts(lm, [renderer.prompt(x)], rendered=True)
            with torch.no_grad(), steering(lm, [steer]):
                lm.model.generate(**enc, **kw)

    cases = {"plain generate (batched)": plain, "harness (Sentiment task)": harness,
             "one prompt at a time": one_at_a_time}
    for f in cases.values():
        f()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.repeats):
        names = list(cases)[r % len(cases):] + list(cases)[: r % len(cases)]
        for name in names:
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t0)
    tokens = args.prompts * args.new_tokens
    base = statistics.median(times["plain generate (batched)"])
    rows = []
    print(f"\n{args.prompts} prompts x {args.new_tokens} tokens = {tokens} generated tokens; "
          f"median of {args.repeats} rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"case": name, "median_s": round(med, 3), "tokens_per_s": round(tokens / med,
                                                                                    1),
                     "vs_plain": round(base / med, 3), "times_s": [round(t, 3) for t in ts]})
        print(f"  {name:28s} {med:7.2f} s  {tokens / med:7.1f} tok/s  x{base / med:.2f} of "
              f"plain")
    if args.json_out:
        write_json(args.json_out, {"command": command_line(), "rows": rows})


if __name__ == "__main__":
    main()
