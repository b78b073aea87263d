"""Load test of ``steerlab serve``: concurrent clients with mixed per-request steering.

Starts the server as a separate process on the embedded model, with four controllers fitted
once and cached in ``--controllers`` (default ``$STEERLAB_CACHE/serve-load``):

* ``positive`` / ``negative``: one CAA sentiment vector (block 8, built-in pairs) at +4 / -4;
* ``alqr``: A-LQR on every block (closed loop, scope ``last``), λ = 1;
* ``love``: ActAdd "Love" - "Hate" at block 6.

The request pool is ``--prompts`` neutral prompts (chat), each sent with four steering
configs (``positive``; ``negative``; ``alqr``; ``love`` at 3 plus ``positive`` at 2 on the
generated tokens: two controllers at once), and the same prompts four times with no
steering. Every request is streamed, greedy (temperature 0), ``ignore_eos`` so that every
response has exactly ``--max-tokens`` tokens and both arms do the same work.

For each client count N (default 1, 8, 32), N closed-loop clients share the pool (cycled to
at least ``--per-client`` requests per client, so that the batch stays full); the
unsteered and steered arms run back to back, ``--rounds`` times (the order alternates). Reported
per arm: completion tokens/s (all tokens over the arm's wall time), requests/s, latency and
time-to-first-content percentiles, and the server's mean rows per decode step; then the
steered/unsteered ratios of tokens/s and of median latency, measured in the same run.

Leakage check: with one client every request is alone on the server, so the N = 1 responses
are the reference; every response at every other N (and every repeat of an identical
request) must equal it exactly. Mismatches are printed and the script exits with status 1.

Run: ``python benchmarks/serve_load.py [--clients 1 8 32] [--prompts 12] [--max-tokens 32]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from _common import load_average, machine_facts, print_header, print_table, write_json
from steerlab.models import DEFAULT_MODEL, cache_root

Steering = list[dict[str, Any]] | None

STEERED: list[tuple[str, Steering]] = [
    ("positive", [{"controller": "positive"}]),
    ("negative", [{"controller": "negative"}]),
    ("alqr", [{"controller": "alqr"}]),
    ("love+positive", [{"controller": "love", "strength": 3.0},
                       {"controller": "positive", "strength": 2.0, "scope": "generated"}]),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompts", type=int, default=12, help="distinct prompts in the pool")
    p.add_argument("--per-client", type=int, default=3,
                   help="requests per client at least (the pool is cycled to fill it)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds per client count (arm order alternates)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per response")
    p.add_argument("--max-batch", type=int, default=32, help="server --max-batch")
    p.add_argument("--threads", type=int, default=None, help="server torch threads")
    p.add_argument("--controllers", type=Path, default=None,
                   help="folder for the fitted controllers (reused when present)")
    p.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT")
    args = p.parse_args(argv)
    if min(args.clients) < 1 or min(args.prompts, args.max_tokens, args.rounds,
                                     args.per_client) < 1:
        p.error("--clients, --prompts, --max-tokens, --per-client and --rounds must be "
                "positive")
    return args


def ensure_controllers(folder: Path, model: str) -> None:
    """Fit and save the four controllers once (about a minute, mostly A-LQR's Jacobians)."""
    names = ["sentiment.safetensors", "alqr.safetensors", "love.safetensors"]
    folder.mkdir(parents=True, exist_ok=True)
    if not all((folder / n).is_file() for n in names):
        from steerlab import artifacts
        from steerlab.data import sentiment_pairs
        from steerlab.fitting import fit_actadd, fit_alqr, fit_caa
        from steerlab.methods import ALQR, CAA, ActAdd
        from steerlab.models import load_model

        lm = load_model(model)
        data = sentiment_pairs()
        t0 = time.perf_counter()
        artifacts.save(fit_caa(lm, data, CAA(layers=8, recipe="mean", scope="all"),
                               progress=False), folder / "sentiment.safetensors")
        artifacts.save(fit_actadd(lm, ActAdd(layer=6)), folder / "love.safetensors")
        artifacts.save(fit_alqr(lm, data, ALQR(), progress=False), folder / "alqr.safetensors")
        print(f"fitted the controllers in {time.perf_counter() - t0:.1f} s -> {folder}")
        del lm
        gc.collect()
    (folder / "controllers.json").write_text(json.dumps({
        "positive": {"file": "sentiment.safetensors", "strength": 4.0,
                     "description": "CAA sentiment, more positive"},
        "negative": {"file": "sentiment.safetensors", "strength": -4.0,
                     "description": "CAA sentiment, more negative"},
        "alqr": {"file": "alqr.safetensors", "strength": 1.0,
                 "description": "A-LQR towards positive sentiment (closed loop)"},
        "love": {"file": "love.safetensors", "strength": 4.0, "description": "ActAdd Love-Hate"},
    }, indent=1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, folder: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "steerlab.cli", "serve", "--model", args.model,
           "--controllers", str(folder), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "1024",
           "--max-tokens", str(max(args.max_tokens, 16)), "--log-level", "warning"]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise SystemExit(f"the server exited: {err}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start in 300 s")
        time.sleep(0.5)


@dataclass(frozen=True)
class Job:
    key: str  # identifies the request: prompt index and steering config
    prompt: str
    steering: Steering


@dataclass
class Result:
    key: str
    text: str
    tokens: int
    ttft: float
    latency: float


async def one_request(http: httpx.AsyncClient, url: str, model: str, job: Job,
                      max_tokens: int) -> Result:
    body: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": job.prompt}],
        "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if job.steering:
        body["steering"] = job.steering
    parts: list[str] = []
    tokens, ttft = 0, None
    t0 = time.perf_counter()
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"{job.key}: HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise SystemExit(f"{job.key}: {obj['error']}")
            if obj.get("usage"):
                tokens = int(obj["usage"]["completion_tokens"])
            for choice in obj.get("choices", []):
                text = choice.get("delta", {}).get("content") or ""
                if text and ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(text)
    latency = time.perf_counter() - t0
    return Result(job.key, "".join(parts), tokens, ttft if ttft is not None else latency, latency)


async def run_load(url: str, model: str, jobs: Sequence[Job], clients: int,
                   max_tokens: int) -> tuple[list[Result], float]:
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        async def worker() -> None:
            while True:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(http, url, model, job, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarise(runs: Sequence[tuple[list[Result], float, dict[str, Any], dict[str, Any]]]
              ) -> dict[str, Any]:
    """Pool an arm's rounds: tokens/s over all rounds, percentiles over all requests."""
    results = [x for rs, _, _, _ in runs for x in rs]
    wall = sum(w for _, w, _, _ in runs)
    lat = [r.latency for r in results]
    ttft = [r.ttft for r in results]
    tokens = sum(r.tokens for r in results)
    steps = sum(a["steps"] - b["steps"] for _, _, b, a in runs)
    gen = sum(a["generated_tokens"] - b["generated_tokens"] for _, _, b, a in runs)
    prefills = sum(a["prefills"] - b["prefills"] for _, _, b, a in runs)
    return {
        "rounds": len(runs), "requests": len(results), "tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
        "round_tokens_per_s": [sum(x.tokens for x in rs) / w for rs, w, _, _ in runs],
        "latency_p50": percentile(lat, 0.5), "latency_p90": percentile(lat, 0.9),
        "latency_p99": percentile(lat, 0.99),
        "ttft_p50": percentile(ttft, 0.5), "ttft_p90": percentile(ttft, 0.9),
        "ttft_p99": percentile(ttft, 0.99),
        # tokens sampled per forward pass: decode steps plus the pre-fills' first tokens
        "rows_per_step": gen / max(steps + prefills, 1), "decode_steps": steps,
        "prefills": prefills,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = machine_facts()
    print_header("steerlab serve under load: steered vs unsteered, leakage check", facts)
    folder = args.controllers or cache_root() / "serve-load" / args.model.replace("/", "_")
    ensure_controllers(folder, args.model)
    port = args.port or free_port()
    proc = start_server(args, folder, port)
    url = f"http://127.0.0.1:{port}"
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]

    from steerlab.data import neutral_prompts

    prompts = neutral_prompts()[: args.prompts]
    steered = [Job(f"p{i}/{name}", p, st) for i, p in enumerate(prompts)
               for name, st in STEERED]
    plain = [Job(f"p{i}/none", p, None) for i, p in enumerate(prompts) for _ in STEERED]
    # interleave prompts so that concurrent rows have different lengths and configs
    steered.sort(key=lambda j: (j.key.split("/")[1], j.key))
    arms = {"unsteered": plain, "steered": steered}
    clients = sorted(set(args.clients))
    if clients[0] != 1:
        clients = [1, *clients]  # the alone reference
        print("adding N = 1: it is the alone reference of the leakage check")
    report: dict[str, Any] = {"command": " ".join(sys.argv), "machine": facts,
                              "max_tokens": args.max_tokens, "prompts": args.prompts,
                              "max_batch": args.max_batch, "runs": {}}
    reference: dict[str, str] = {}
    mismatches: list[str] = []
    raw: dict[str, list[tuple[list[Result], float, dict[str, Any], dict[str, Any]]]] = {}
    try:
        for k, n in enumerate(clients):
            for r in range(args.rounds):
                order = list(arms) if (k + r) % 2 == 0 else list(arms)[::-1]
                for arm in order:
                    before = httpx.get(f"{url}/health").json()
                    pool = arms[arm]
                    jobs = [pool[i % len(pool)]
                            for i in range(max(len(pool), n * args.per_client))]
                    results, wall = asyncio.run(run_load(url, model, jobs, n, args.max_tokens))
                    after = httpx.get(f"{url}/health").json()
                    raw.setdefault(f"{arm}@{n}", []).append((results, wall, before, after))
                    short = [x.key for x in results if x.tokens != args.max_tokens]
                    if short:
                        mismatches.append(f"{arm}@{n}: {len(short)} responses without "
                                          f"{args.max_tokens} tokens ({short[:3]})")
                    for x in results:
                        if x.key not in reference:
                            reference[x.key] = x.text
                        elif reference[x.key] != x.text:
                            mismatches.append(f"{arm}@{n} {x.key}: {x.text!r} != alone "
                                              f"{reference[x.key]!r}")
                    tokens = sum(x.tokens for x in results)
                    print(f"N={n:>2} round {r + 1} {arm:>9}: {tokens / wall:.1f} tok/s, "
                          f"{wall:.1f} s")
    finally:
        proc.terminate()
        proc.wait(60)
    for key, runs in raw.items():
        report["runs"][key] = summarise(runs)
    rows = []
    for n in clients:
        for arm in arms:
            s = report["runs"][f"{arm}@{n}"]
            rows.append([str(n), arm, str(s["requests"]), f"{s['tokens_per_s']:.1f}",
                         f"{s['requests_per_s']:.2f}", f"{s['latency_p50']:.2f}",
                         f"{s['latency_p90']:.2f}", f"{s['latency_p99']:.2f}",
                         f"{s['ttft_p50']:.2f}", f"{s['ttft_p99']:.2f}",
                         f"{s['rows_per_step']:.1f}"])
    print()
    print_table(["N", "arm", "reqs", "tok/s", "req/s", "lat p50", "lat p90", "lat p99",
                 "ttft p50", "ttft p99", "rows/step"], rows, left=2)
    print()
    ratio_rows = []
    for n in clients:
        s, u = report["runs"][f"steered@{n}"], report["runs"][f"unsteered@{n}"]
        # paired within each round, then the median: noise that hits a round cancels
        tput = statistics.median(a / b for a, b in zip(s["round_tokens_per_s"],
                                                       u["round_tokens_per_s"], strict=True))
        lat = s["latency_p50"] / u["latency_p50"]
        report["runs"][f"ratio@{n}"] = {"tokens_per_s": tput, "latency_p50": lat}
        ratio_rows.append([str(n), f"{tput:.3f}", f"{lat:.3f}"])
    print_table(["N", "tok/s steered / unsteered (median over rounds)",
                 "p50 latency steered / unsteered"], ratio_rows)
    print("\nbatching vs serving one request at a time (tok/s at N / tok/s at N = 1):")
    for arm in arms:
        base = report["runs"][f"{arm}@1"]["tokens_per_s"]
        print(f"  {arm:>9}: " + ", ".join(
            f"N={n}: {report['runs'][f'{arm}@{n}']['tokens_per_s'] / base:.2f}x"
            for n in clients))
    checked = sum(report["runs"][f"{a}@{n}"]["requests"] for n in clients for a in arms)
    report["leakage"] = {"responses": checked, "distinct_requests": len(reference),
                         "mismatches": mismatches}
    print(f"\nleakage check: {checked} responses ({len(reference)} distinct requests), "
          f"{len(mismatches)} differ from the same request served alone")
    for m in mismatches[:20]:
        print("  " + m)
    print(f"load average at end: {load_average()}")
    write_json(args.json_out, report)
    return 1 if mismatches else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
