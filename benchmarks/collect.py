"""Throughput of activation collection vs plain forward passes over the same batches.

The texts are the built-in sentiment pairs rendered with the chat template, prompt plus
positive or negative completion (``fitting.contrastive_samples``), cycled to ``--n-texts``.
They are cut into batches of ``--batch-size``; every batch is tokenized once here, left-padded
exactly as :func:`steerlab.activations.collect` pads it (the script checks the token ids are
identical), and then, batch by batch, every case runs on it:

* ``plain``: ``lm.model(input_ids, attention_mask, use_cache=False)`` under ``no_grad`` (the
  full causal LM, logits included);
* ``trunk``: the same through ``lm.model.base_model`` (every block and the final norm, no
  logits): the stricter reference for a collection that reads the last block;
* ``collect:<sites>``: ``collect(lm, batch_samples, sites, cache=False, progress=False)``,
  one call per batch, timed end to end (its own tokenization, hooks, reads, checks).

``collect`` stops the forward pass after the deepest block it needs, so for a middle layer it
does about half the work of a plain pass; that is the library's behaviour, and the ratio shows
it. The order of the cases is shuffled (seeded) for every batch; each round times every case
over all the batches; the report gives medians over rounds and the median of the
per-round ratios (noise that hits a whole round cancels there).

Run: ``python benchmarks/collect.py [--n-texts 256] [--batch-size 16] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from _common import (
    command_line,
    load_average,
    machine_facts,
    median,
    paired_ratio,
    print_header,
    print_table,
    spread,
    write_json,
)
from steerlab.activations import Position, Sample, _token_spans, collect
from steerlab.data import Renderer, sentiment_pairs
from steerlab.fitting import contrastive_samples
from steerlab.models import DEFAULT_MODEL, LoadedModel, load_model

TARGET = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (load_model)")
    p.add_argument("--n-texts", type=int, default=256, help="texts (cycled from the pairs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after a warm-up)")
    p.add_argument("--attn", default="eager", help="attn_implementation (load_model default)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument(
        "--json", dest="json_out", default=None, metavar="OUT", help="write results as JSON"
    )
    args = p.parse_args(argv)
    if min(args.n_texts, args.batch_size, args.repeats) < 1:
        p.error("--n-texts, --batch-size and --repeats must be positive")
    return args


def build_samples(lm: LoadedModel, n: int) -> list[Sample]:
    pos, neg = contrastive_samples(sentiment_pairs(), Renderer(lm.tokenizer))
    pool = [s for pair in zip(pos, neg, strict=True) for s in pair]
    return [pool[i % len(pool)] for i in range(n)]


def pad_batch(lm: LoadedModel, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Tokenize and left-pad one batch the way ``collect`` does, and check that it does."""
    tok = lm.tokenizer
    add_special = not lm.info.is_chat  # rendered chat text holds its own special tokens
    ids = [list(tok(s.text, add_special_tokens=add_special)["input_ids"]) for s in samples]
    if ids != [span[0] for span in _token_spans(lm, samples, add_special)]:
        raise RuntimeError("this tokenization differs from collect's; fix the benchmark")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    length = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, length - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[r, length - len(x) :] = 1
    return {"input_ids": input_ids.to(lm.device), "attention_mask": mask.to(lm.device)}


Case = Callable[[int], object]  # runs one batch, by index


def make_cases(
    lm: LoadedModel,
    batches: list[list[Sample]],
    encoded: list[dict[str, torch.Tensor]],
    site_sets: dict[str, list[str]],
) -> dict[str, Case]:
    model, trunk = lm.model, lm.model.base_model

    def plain(b: int) -> object:
        with torch.no_grad():
            return model(**encoded[b], use_cache=False)

    def trunk_only(b: int) -> object:
        with torch.no_grad():
            return trunk(**encoded[b], use_cache=False)

    def collector(sites: list[str]) -> Case:
        def run(b: int) -> object:
            return collect(
                lm,
                batches[b],
                sites,
                Position.last(),
                batch_size=len(batches[b]),
                cache=False,
                progress=False,
            )

        return run

    cases: dict[str, Case] = {"plain": plain, "trunk": trunk_only}
    for name, sites in site_sets.items():
        cases[f"collect: {name}"] = collector(sites)
    return cases


def run_rounds(cases: dict[str, Case], n_batches: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per case per round; within a round, every batch runs every case, in an order
    shuffled (seeded) for each batch so that no case always follows the same one (a plain
    pass frees ~200 MB of logits, which can slow whatever runs next). A warm-up runs every
    case on the first batch."""
    names = list(cases)
    for name in names:
        cases[name](0)
    times = {name: [0.0] * repeats for name in names}
    rng = random.Random(0)
    for r in range(repeats):
        for b in range(n_batches):
            order = names[:]
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                cases[name](b)
                times[name][r] += time.perf_counter() - t0
        done = ", ".join(f"{n}={times[n][r]:.1f}s" for n in names)
        print(f"  round {r + 1}/{repeats}: {done}", flush=True)
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    facts = machine_facts()
    print_header("activation collection throughput vs plain forward passes", facts)
    lm = load_model(args.model, attn_implementation=args.attn)
    n_layers = lm.info.num_layers
    mid = n_layers // 2
    print(
        f"model: {lm.info.model_id} ({n_layers} layers, d={lm.info.hidden_size}), "
        f"attn={args.attn}, dtype={next(lm.model.parameters()).dtype}"
    )
    samples = build_samples(lm, args.n_texts)
    batches = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    encoded = [pad_batch(lm, b) for b in batches]
    n_tokens = sum(int(e["attention_mask"].sum()) for e in encoded)
    n_padded = sum(e["input_ids"].numel() for e in encoded)
    print(
        f"data: {len(samples)} texts (sentiment pairs, chat-rendered prompt+completion), "
        f"{len(batches)} batches of {args.batch_size}, {n_tokens} tokens "
        f"({n_padded} with padding), position=last"
    )
    site_sets = {
        f"resid_post.{mid}": [f"resid_post.{mid}"],
        f"resid_post.0-{n_layers - 1}": [f"resid_post.{i}" for i in range(n_layers)],
        f"heads.{mid}": [f"heads.{mid}"],
    }
    cases = make_cases(lm, batches, encoded, site_sets)
    print(f"timing {len(cases)} cases x {args.repeats} rounds (after a warm-up) ...", flush=True)
    times = run_rounds(cases, len(batches), args.repeats)

    results: list[dict[str, Any]] = []
    for name, ts in times.items():
        med = median(ts)
        results.append(
            {
                "case": name,
                "times_s": [round(t, 4) for t in ts],
                "median_s": round(med, 4),
                "samples_per_s": round(len(samples) / med, 3),
                "ratio_vs_plain": round(paired_ratio(times["plain"], ts), 4),
                "ratio_vs_trunk": round(paired_ratio(times["trunk"], ts), 4),
                "spread": round(spread(ts), 4),
            }
        )

    print()
    headers = ["case", "samples/s", "vs plain", "vs trunk", "spread", "target", "ok"]
    rows = []
    for r in results:
        is_collect = r["case"].startswith("collect")
        rows.append(
            [
                r["case"],
                f"{r['samples_per_s']:.2f}",
                f"{r['ratio_vs_plain']:.3f}",
                f"{r['ratio_vs_trunk']:.3f}",
                f"{100 * r['spread']:.1f}%",
                f">= {TARGET}" if is_collect else "",
                ("yes" if r["ratio_vs_plain"] >= TARGET else "NO") if is_collect else "",
            ]
        )
    print_table(headers, rows)
    print(
        f"samples/s = {len(samples)} texts / median seconds per round; vs plain / vs trunk = "
        f"median over rounds of (reference seconds / case seconds), i.e. case throughput "
        f"relative to the reference (> 1: faster); target on vs plain; spread = (max - min) / "
        f"median over {args.repeats} rounds"
    )
    print(f"load average (1/5/15 min) at end: {load_average()}")
    payload = {
        "benchmark": "collect",
        "command": command_line(),
        "machine": facts,
        "load_average_at_end": load_average(),
        "model": lm.info.as_dict(),
        "attn_implementation": args.attn,
        "n_texts": len(samples),
        "batch_size": args.batch_size,
        "tokens": n_tokens,
        "padded_tokens": n_padded,
        "repeats": args.repeats,
        "target_ratio": TARGET,
        "results": results,
    }
    write_json(args.json_out, payload)
    return payload


if __name__ == "__main__":
    main()
