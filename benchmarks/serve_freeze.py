"""Does one cheap hostile request freeze ``steerlab serve``?

Starts ``steerlab serve`` as a separate process on 127.0.0.1 (the tiny random model of the
tests by default, saved to a temporary folder; ``--model NAME`` for the embedded or any other
model) and runs, ``--rounds`` times, two arms back to back (the order alternates):

* ``quiet``: one streamed, greedy completion of ``--max-tokens`` tokens (``ignore_eos``), with
  ``GET /health`` polled every 50 ms meanwhile;
* ``hostile``: the same, while another client sends, one after the other from the stream's
  first event until it ends, bodies under the 1 MiB limit that are cheap to send and were
  expensive to refuse: ~170,000 one-character prompts, one 1 MB text prompt, 20,000 chat
  messages, and a prompt of 200,000 floats (which pydantic's union of list types reported
  item by item, for seconds).

Reported per arm: the stream's longest and median gap between events, ``/health``'s
longest latency, and the hostile requests' statuses; then the ratio of the stream's longest
gap with vs without the hostile requests (median over rounds) and the longest ``/health``
latency seen under them. Before the fix (tokenization on the event loop under the engine's
tokenizer lock, counts checked after it), the gap went from 0.08 s to 5.7 s and ``/health``
took 5.2 s; a ratio near 1 means the server stayed responsive.

Every loop is bounded (a stream has ``--max-tokens`` events; the hostile client sends at
most ``--max-hostile`` requests per stream; every HTTP call has a timeout) and the server is
stopped at the end, whatever happens. Exit status 0 (this measures, it does not judge).

Run: ``python benchmarks/serve_freeze.py [--rounds 3] [--max-tokens 200] [--model NAME]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny",
                   help="'tiny' (the tests' random llama, default) or a model name or folder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=200, help="tokens of the measured stream")
    p.add_argument("--max-hostile", type=int, default=12,
                   help="hostile requests per stream at most")
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if min(args.rounds, args.max_tokens, args.max_hostile, args.threads) < 1:
        p.error("--rounds, --max-tokens, --max-hostile and --threads must be >= 1")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_folder(name: str, tmp: Path) -> str:
    if name != "tiny":
        return name
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_model

    return str(save_tiny_model("llama", 0, tmp / "tiny-llama"))


def start_server(model: str, port: int, args: argparse.Namespace,
                 log: Any) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "steerlab.cli", "serve", "--model", model, "--port", str(port),
           "--threads", str(args.threads), "--max-tokens", str(max(args.max_tokens, 16)),
           "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if k != "STEERLAB_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} at start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within {args.startup_timeout} s")


def hostile_bodies(model: str) -> list[tuple[str, str, bytes]]:
    """(label, path, body) of cheap requests under the 1 MiB limit."""
    many = {"model": model, "prompt": ["a"] * 170_000, "max_tokens": 1}
    big = {"model": model, "prompt": "x" * 1_000_000, "max_tokens": 1}
    chat = {"model": model, "max_tokens": 1,
            "messages": [{"role": "user", "content": "x"}] * 20_000}
    floats = {"model": model, "prompt": [1.5] * 200_000, "max_tokens": 1}
    out = []
    for label, path, body in (("170k prompts", "/v1/completions", many),
                              ("1 MB prompt", "/v1/completions", big),
                              ("20k messages", "/v1/chat/completions", chat),
                              ("200k floats", "/v1/completions", floats)):
        data = json.dumps(body).encode()
        assert len(data) < 1 << 20, (label, len(data))
        out.append((label, path, data))
    return out


def one_arm(url: str, model: str, args: argparse.Namespace,
            hostile: list[tuple[str, str, bytes]] | None) -> dict[str, Any]:
    events: list[float] = []
    health: list[float] = []
    statuses: dict[str, list[int]] = {}
    first = threading.Event()
    done = threading.Event()

    def stream() -> None:
        body = {"model": model, "prompt": "the cat sat on", "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}
        try:
            with httpx.Client(timeout=120) as http, \
                    http.stream("POST", f"{url}/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(time.perf_counter())
                        first.set()
        finally:
            first.set()
            done.set()

    def poll_health() -> None:
        with httpx.Client(timeout=60) as http:
            for _ in range(100_000):  # bounded; ends with the stream
                if done.is_set():
                    return
                t = time.perf_counter()
                http.get(f"{url}/health")
                health.append(time.perf_counter() - t)
                time.sleep(0.05)

    def attack() -> None:
        assert hostile is not None
        first.wait(120)
        with httpx.Client(timeout=120) as http:
            for i in range(args.max_hostile):
                if done.is_set():
                    return
                label, path, data = hostile[i % len(hostile)]
                r = http.post(f"{url}{path}", content=data,
                              headers={"Content-Type": "application/json"})
                statuses.setdefault(label, []).append(r.status_code)

    threads = [threading.Thread(target=stream), threading.Thread(target=poll_health)]
    if hostile is not None:
        threads.append(threading.Thread(target=attack))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    gaps = [b - a for a, b in itertools.pairwise(events)]
    return {"events": len(events), "max_gap": max(gaps, default=float("nan")),
            "median_gap": statistics.median(gaps) if gaps else float("nan"),
            "health_max": max(health, default=float("nan")), "health_n": len(health),
            "statuses": statuses}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve-freeze-") as tmp_name:
        tmp = Path(tmp_name)
        model = model_folder(args.model, tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        print("# serve_freeze: a stream's gaps and /health latency under hostile requests")
        print(f"model: {args.model} ({model}) | server threads {args.threads} | "
              f"load average {os.getloadavg()}")
        with open(tmp / "server.log", "wb") as log:
            proc = start_server(model, port, args, log)
            try:
                served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
                bodies = hostile_bodies(served)
                one_arm(url, served, argparse.Namespace(**{**vars(args), "max_tokens": 8}),
                        None)  # warm-up
                rows: list[tuple[int, str, dict[str, Any]]] = []
                for r in range(args.rounds):
                    order = ("quiet", "hostile") if r % 2 == 0 else ("hostile", "quiet")
                    for arm in order:
                        res = one_arm(url, served, args, bodies if arm == "hostile" else None)
                        rows.append((r, arm, res))
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
    print()
    print("| round | arm | events | max gap (s) | median gap (s) | /health max (s) | "
          "hostile statuses |")
    print("|---|---|---|---|---|---|---|")
    for r, arm, res in rows:
        st = "; ".join(f"{k}: {sorted(set(v))} x{len(v)}" for k, v in res["statuses"].items())
        print(f"| {r} | {arm} | {res['events']} | {res['max_gap']:.3f} | "
              f"{res['median_gap']:.4f} | {res['health_max']:.3f} | {st or '-'} |")
    ratios = []
    for r in range(args.rounds):
        by_arm = {arm: res for rr, arm, res in rows if rr == r}
        ratios.append(by_arm["hostile"]["max_gap"] / by_arm["quiet"]["max_gap"])
    health_hostile = max(res["health_max"] for _, arm, res in rows if arm == "hostile")
    health_quiet = max(res["health_max"] for _, arm, res in rows if arm == "quiet")
    print()
    print(f"stream max-gap ratio, hostile / quiet (median over {args.rounds} rounds): "
          f"{statistics.median(ratios):.2f} (per round: {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"/health max latency: {health_hostile:.3f} s under hostile requests, "
          f"{health_quiet:.3f} s without")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
