"""vLLM + steerlab's plugin under load, against itself unsteered and against ``steerlab serve``.

Ratios come from one run (same machine, same minutes):

* tok/s of C concurrent clients (default 32), half of the requests steered with mixed
  controllers, over tok/s of the same load unsteered (target >= 0.9);
* vLLM + plugin over ``steerlab serve`` (its own engine) on the same loads;
* engine start-up (process start to ``/health`` 200) of vLLM with the plugin, and the
  plugin's own share of it (the time its ``load_model`` wrapper spends loading and checking
  the controllers and installing hooks, from the server log).

Run from the repository root with the vLLM venv (``bash scripts/setup_vllm.sh``)::

    .venv-vllm/bin/python benchmarks/vllm_serve.py --controllers DIR [--clients 32]
        [--requests 2] [--tokens 32] [--rounds 2] [--out results-run/vllm_serve.json]

``DIR`` holds steerlab artifacts for the embedded model (e.g. ``steerlab fit --out
DIR/caa.safetensors --method caa --layers 8`` and ``--method odesteer --layers 12``); the
steered half cycles through every controller in it. ``steerlab serve`` runs this checkout's
``src`` with the main venv's interpreter (``--steerlab-python``, default ``.venv/bin/python``),
so both servers run the same controller code. Requests use ``ignore_eos`` so every request
produces exactly ``--tokens``. Loads alternate ``none``, then ``--rounds`` times
``half_steered`` and ``none`` again, on each server; a ratio is the mean of a server's
``half_steered`` loads over the mean of its ``none`` loads (on a noisy machine, more rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Describe a river.", "Tell me about your day.", "What is a cat?",
           "Write about the sea.", "Give me a tip for cooking rice.", "Explain rain.",
           "What makes a good friend?", "Describe a mountain at dawn."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_health(url: str, proc: subprocess.Popen[bytes], log: Path, limit: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no /health after {limit} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


async def load(url: str, model: str, clients: int, per_client: int, tokens: int,
               steering: list[list[dict[str, Any]] | None]) -> dict[str, float]:
    """``clients`` concurrent clients, each sending ``per_client`` chat requests in turn;
    request k of the run uses ``steering[k % len(steering)]``."""
    counter = iter(range(10**9))
    done_tokens = 0
    errors = 0
    async with httpx.AsyncClient(timeout=600) as client:
        async def one_client(c: int) -> None:
            nonlocal done_tokens, errors
            for _ in range(per_client):
                k = next(counter)
                body: dict[str, Any] = {
                    "model": model, "max_tokens": tokens, "temperature": 0,
                    "ignore_eos": True,
                    "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}]}
                s = steering[k % len(steering)]
                if s:
                    body["steering"] = s
                r = await client.post(url + "/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors += 1
                    continue
                done_tokens += int(r.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return {"tokens": done_tokens, "seconds": round(wall, 2),
            "tok_per_s": round(done_tokens / wall, 2), "errors": errors}


def _timed(timers: dict[str, float], calls: dict[str, int], name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrap(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timers[name] += time.perf_counter() - t0
            calls[name] += 1

    return wrap


def profile(args: argparse.Namespace, folder: str,
            loads: list[tuple[str, list[list[dict[str, Any]] | None]]]) -> dict[str, Any]:
    """``--profile``: the same loads offline, with vLLM's engine core and model runner in this
    process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), timing where a load's time goes: the
    model runner's forward passes, the plugin's per-step plan (``begin_step``), its hooks'
    reads and writes (gather, controller, scatter) and each controller class's ``steer``."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["STEERLAB_VLLM_CONTROLLERS"] = str(args.controllers.resolve())
    from vllm import LLM, SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from steerlab.methods import METHODS
    from steerlab.vllm_plugin import _internals, worker

    timers: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    ws = worker.WorkerSteering
    for meth in ("begin_step", "_read", "_write"):
        setattr(ws, meth, _timed(timers, calls, f"plugin.{meth}", getattr(ws, meth)))
    owners = {base for cls in METHODS.values() for base in cls.__mro__ if "steer" in vars(base)}
    for base in owners:  # the classes that define steer (ODESteer's is _ODEBase's, ...)
        base.steer = _timed(timers, calls, f"steer.{base.__name__}", base.steer)  # type: ignore[method-assign]
    _internals.install()
    GPUModelRunner._model_forward = _timed(  # type: ignore[method-assign]
        timers, calls, "model_forward", GPUModelRunner._model_forward)
    llm = LLM(folder, enforce_eager=True, dtype="float32", max_model_len=1024,
              max_num_seqs=args.clients, seed=0)
    tok = llm.get_tokenizer()
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for p in PROMPTS]
    n = args.clients * args.requests
    out: dict[str, list[dict[str, Any]]] = {"none": [], "half_steered": []}
    warm = [SamplingParams(temperature=0, max_tokens=4, extra_args={"steering": s} if s else None)
            for s in ([None] + [x for _, load_ in loads[:1] for x in load_])]
    llm.generate([{"prompt_token_ids": ids[0]}] * len(warm), warm, use_tqdm=False)
    for key, steering in [("none", [None]), *loads]:
        sps = [SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                              extra_args={"steering": s} if s else None)
               for s in (steering[k % len(steering)] for k in range(n))]
        timers.clear()
        calls.clear()
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": ids[k % len(ids)]} for k in range(n)], sps,
                            use_tqdm=False)
        wall = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        plugin = sum(v for k, v in timers.items() if k.startswith("plugin."))
        r = {"tok_per_s": round(tokens / wall, 2), "seconds": round(wall, 2),
             "plugin_share": round(plugin / wall, 4),
             "timers_s": {k: round(v, 3) for k, v in sorted(timers.items())},
             "calls": dict(sorted(calls.items()))}
        out[key].append(r)
        print(key, r, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--controllers", required=True, type=Path)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1,
                    help="half_steered / none pairs after the first none load")
    ap.add_argument("--skip-steerlab", action="store_true")
    ap.add_argument("--steerlab-python", type=Path, default=ROOT / ".venv" / "bin" / "python",
                    help="the interpreter of steerlab serve (the main venv)")
    ap.add_argument("--vllm-arg", action="append", default=[],
                    help="one more argument for vllm serve (repeat it), e.g. "
                         "--vllm-arg=--no-enable-prefix-caching")
    ap.add_argument("--profile", action="store_true",
                    help="offline, in-process engine: where the time goes (no servers)")
    ap.add_argument("--out", type=Path, default=ROOT / "results-run" / "vllm_serve.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from steerlab.vllm_plugin.cli import model_folder

    folder = model_folder("smollm2-135m")
    names = sorted(p.stem for p in args.controllers.glob("*.safetensors"))
    if not names:
        raise SystemExit(f"no *.safetensors controllers in {args.controllers}")
    # half steered: alternate unsteered / steered, the steered ones cycling the controllers
    mixed: list[list[dict[str, Any]] | None] = []
    for n in names:
        mixed += [None, [{"controller": n}]]
    none: list[list[dict[str, Any]] | None] = [None]
    result: dict[str, Any] = {"clients": args.clients, "requests_per_client": args.requests,
                              "tokens": args.tokens, "controllers": names}
    logs = args.out.parent
    logs.mkdir(parents=True, exist_ok=True)
    if args.profile:
        result["profile"] = profile(args, folder, [("half_steered", mixed), ("none", none)]
                                    * args.rounds)
        args.out.write_text(json.dumps(result, indent=2))
        return

    def run_loads(url: str, model: str) -> dict[str, Any]:
        asyncio.run(load(url, model, 4, 1, 4, none))  # warm-up
        asyncio.run(load(url, model, 4, 1, 4, mixed))  # and the steered path
        runs: dict[str, list[dict[str, float]]] = {"none": [], "half_steered": []}
        order = [("none", none)] + [("half_steered", mixed), ("none", none)] * args.rounds
        for key, steering in order:
            r = asyncio.run(load(url, model, args.clients, args.requests, args.tokens,
                                 steering))
            runs[key].append(r)
            print(key, r, flush=True)
        return {"runs": runs, **{f"{k}_tok_per_s": round(
            sum(x["tok_per_s"] for x in v) / len(v), 2) for k, v in runs.items()}}

    # vLLM + plugin
    port = free_port()
    env = dict(os.environ, STEERLAB_VLLM_CONTROLLERS=str(args.controllers.resolve()))
    log = logs / "vllm_serve.server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "steerlab.vllm_plugin.launch", folder, "--dtype", "float32",
             "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port),
             "--served-model-name", "smollm2-135m", "--max-num-seqs", str(args.clients),
             *args.vllm_arg],
            env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        startup = wait_health(f"http://127.0.0.1:{port}", proc, log, 900)
        text = log.read_text()
        m = re.search(r"steerlab: \d+ controller\(s\) attached in ([0-9.]+) s", text)
        result["vllm_startup_s"] = round(startup, 1)
        result["plugin_attach_s"] = float(m.group(1)) if m else None
        installs = [float(x) for x in
                    re.findall(r"steerlab: plugin installed in ([0-9.]+) s", text)]
        result["plugin_install_s"] = installs  # one per vLLM process
        result["vllm"] = run_loads(f"http://127.0.0.1:{port}", "smollm2-135m")
    finally:
        stop(proc)
    v = result["vllm"]
    result["vllm_half_steered_over_none"] = round(
        v["half_steered_tok_per_s"] / v["none_tok_per_s"], 3)

    if not args.skip_steerlab:
        port = free_port()
        log = logs / "steerlab_serve.server.log"
        senv = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [str(args.steerlab_python), "-m", "steerlab.cli", "serve", "--controllers",
                 str(args.controllers), "--port", str(port), "--max-batch", str(args.clients),
                 "--max-queue", "1024"],
                env=senv, stdout=fh, stderr=subprocess.STDOUT)
        try:
            result["steerlab_startup_s"] = round(
                wait_health(f"http://127.0.0.1:{port}", proc, log, 900), 1)
            result["steerlab"] = run_loads(f"http://127.0.0.1:{port}", "smollm2-135m")
        finally:
            stop(proc)
        s = result["steerlab"]
        result["steerlab_half_steered_over_none"] = round(
            s["half_steered_tok_per_s"] / s["none_tok_per_s"], 3)
        result["vllm_over_steerlab_none"] = round(v["none_tok_per_s"] / s["none_tok_per_s"], 3)
        result["vllm_over_steerlab_half_steered"] = round(
            v["half_steered_tok_per_s"] / s["half_steered_tok_per_s"], 3)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
