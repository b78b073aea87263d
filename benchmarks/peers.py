"""Side by side with the peers: steerlab's methods vs steering-vectors and repeng, one run.

The peers are optional and installed by hand; this script installs nothing::

    pip install --no-deps steering-vectors==0.12.2 repeng==0.4.0

(the ``peers`` extra of pyproject.toml names the same two; ``pip install '.[peers]'`` would
also pull their pins, so install them as above).

``--no-deps`` because steering-vectors 0.12.2 pins ``transformers<5`` and repeng 0.4.0
pins ``numpy<2``; everything else they import (torch, transformers, numpy, scikit-learn,
gguf, tqdm) is already a steerlab dependency, and both run on steerlab's versions. repeng
0.4.0 names ``np.float_`` (removed in NumPy 2) in annotations evaluated at import, so this
script sets ``np.float_ = np.float64`` before importing it.

**Same model, prompts, generation and metrics for every library.** The embedded default
model (``load_model()``: SmolLM2-135M-Instruct, 30 blocks, float32). Data: the built-in
sentiment pairs, split by ``sentiment_pairs().split(test_fraction, seed=0)``: every library
is fitted on the train part, and generation is evaluated on the held-out pairs' prompts,
rendered with steerlab's chat renderer, left-padded in one batch, greedy,
``--new-tokens`` new tokens (:func:`generate_under`: the code path of
``steerlab.runtime.generate``, with the library's own steering context around
``model.generate``). Every text set is measured by steerlab's evaluation stack, the
``steerlab.evals.tasks.Sentiment`` task over these prompts (``Sentiment.measure``):

* behaviour: mean VADER compound (the task's judge,
  ``steerlab.evals.judges.vader_compound``), and its change from the unsteered answers;
* fluency: perplexity of the answers given their prompts under the *unsteered* model
  (the task's fluency, ``steerlab.evals.metrics.conditional_perplexity`` in batches of 8),
  as a ratio to the unsteered answers';
* degenerate fraction (``steerlab.evals.fluency.degenerate_fraction``): the share of answers
  that are empty (after ``strip``) or whose own 4-gram repetition rate exceeds 0.5.

The **best change** of a configuration family in a direction is the largest change in that
direction among its points steered that way (strengths of that sign) with perplexity ratio
<= ``--ppl-budget`` (1.5) and no degenerate answer.

**Fronts.** Every family (a library, a method, its settings) is swept in both directions on
the same rule: start at the family's own strength (steerlab default: 1, the paper's
intervention, ``docs/strength.md``; steerlab ``--auto``: the calibrated ``strength`` /
``strength_negative`` of ``fit_info["auto"]``; peers: multiplier 1, in units of the
mean-difference vector), then double while the point stays admissible (at most ``--up``
doublings), or halve until it becomes admissible (at most ``--down`` halvings). Every
measured point is printed and written; the fronts are these points.

**Libraries.**

* steering-vectors: ``train_steering_vector`` on (prompt + positive, prompt + negative),
  chat-rendered, read at the last token (``read_token_index=-1``), decoder block ``L``
  (default 10, the user report's, and the block steerlab's ``--auto`` picks for CAA);
  applied with ``SteeringVector.apply(model, multiplier=m)``, i.e. at every position.
* repeng: ``ControlVector.train`` (``pca_diff``: PCA of the paired last-token
  differences, a unit vector oriented towards the positive side) on the same strings, block
  16 (the user report's) and the auto CAA block; applied with ``ControlModel`` and
  ``set_control(vector, c)`` (every position; unwrapped afterwards). Every block is wrapped,
  with a zero direction on all but block L, so that the model keeps a list of identical
  blocks (``ab_scores`` enters a steerlab context, which looks them up); and a forward
  pre-hook passes (B, T) position ids to plain forward passes that have none, because
  repeng 0.4.0 builds its padding mask from them and fails on the (1, T) ids transformers 5
  makes (``generate`` passes its own; see :func:`_position_ids_shim`). So that one
  multiplier means one added norm for both peers, ``c = m * ||mean difference at L||``
  (the steering-vectors vector's norm at that block).
* steerlab: every method of ``steerlab.methods.METHODS`` that fits from data (SAS needs an
  SAE: skipped; ActAdd reads only its own prompt pair, "Love"/"Hate", a sentiment pair, so it
  runs on the sentiment set only), fitted with ``steerlab.fitting.fit_method`` at default
  settings and with ``auto=True`` (block, scope and strength chosen on a validation slice of
  the training part: on the sentiment set by greedy validation answers judged against the
  training completions within a 1.5x perplexity ratio, on the A/B set teacher-forced within
  a 0.25-nat KL; ``steerlab.autotune``), each at its default scope (auto: the chosen one).
  Also ``caa@L scope all``: steerlab's CAA at the
  steering-vectors block with scope ``all``, at the steering-vectors multipliers (the same
  intervention, so the same texts up to float rounding: an equivalence check), and
  ``caa@L scope from:-1``: the same vector at CAA's default scope (the effect of the scope
  alone). Neither counts as a steerlab result in the headline (they are not default or
  ``--auto`` settings).

**A/B behaviour set** (``--behaviour``, default corrigible-neutral-HHH, from
``../shared/data/caa``): seeded split as ``steerlab.evals.tasks.ab.BehaviourAB`` does
(``test_fraction=0.25, seed=0``; the first ``--ab-train`` / ``--ab-test`` pairs of each
part). steerlab fits with ``recipe="ab"`` (the answer letter); the peers on the rendered
question + "(A" / "(B" (the answer up to its letter, so their last token is the letter
steerlab reads). Every library is scored by the same function,
``steerlab.evals.ab.ab_scores`` (P(matching letter) at the answer position; steerlab passes
its steers, a peer's steering context is entered around the call). A point is admissible
when the mean probability of the letters A and B at the answer position stays at least half
the unsteered one (the model still answers with a letter). ``--auto`` on the A/B set is
costly (four blocks, a dozen validation passes each), so by default only CAA, A-LQR and
ODESteer are auto-fitted there (``--ab-auto-methods``).

Everything is cached in ``--run-dir`` (default ``results-run/peers``): fitted controllers
(steerlab artifacts, peer vectors) and every measured point (``points.jsonl``), so a rerun
resumes where it stopped. ``--json OUT`` writes all points and summaries.

Run: ``python benchmarks/peers.py --json peers.json`` (see docs/results-peers.md for the
figures and the time it takes).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import command_line, load_average, machine_facts, print_header, print_table
from steerlab import artifacts
from steerlab.data import ContrastiveSet, Renderer, load_caa_ab, sentiment_pairs
from steerlab.evals.ab import ab_scores
from steerlab.evals.fluency import degenerate_fraction
from steerlab.evals.tasks import Sentiment
from steerlab.fitting import fit_method
from steerlab.methods import METHODS
from steerlab.models import LoadedModel, load_model
from steerlab.runtime import Steer, generate, steering, tokenize_prompts

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
INSTALL = "pip install --no-deps steering-vectors==0.12.2 repeng==0.4.0"
AB_AUTO_DEFAULT = ("caa", "alqr", "odesteer")


def import_peers() -> tuple[Any, Any]:
    """The two peer packages (repeng after the NumPy 2 shim); exit with the install line."""
    if not hasattr(np, "float_"):  # repeng 0.4.0 annotates with np.float_ (NumPy < 2)
        np.float_ = np.float64  # type: ignore[attr-defined]
    try:
        import repeng
        import steering_vectors
    except ImportError as exc:
        sys.exit(f"the peers are not importable ({exc}); install them with:\n  {INSTALL}")
    return steering_vectors, repeng


# --------------------------------------------------------------------------- the run folder

class Store:
    """Measured points, one JSON object per line, keyed; appended as they are measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.rows[rec["key"]] = rec

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, rec: dict[str, Any]) -> None:
        self.rows[rec["key"]] = rec
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


# --------------------------------------------------------------------------- generation, metrics

def generate_under(lm: LoadedModel, prompts: Sequence[str],
                   ctx: Callable[[], contextlib.AbstractContextManager[Any]],
                   max_new_tokens: int) -> list[str]:
    """Greedy answers to chat-rendered ``prompts`` in one left-padded batch, with ``ctx()``
    (a library's steering context) around ``model.generate``: the code path of
    ``steerlab.runtime.generate`` (same rendering, tokenization and generate arguments)."""
    renderer = Renderer(lm.tokenizer)
    enc = tokenize_prompts(lm, [renderer.prompt(p) for p in prompts], rendered=True)
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False,
                          "use_cache": True, "pad_token_id": lm.tokenizer.pad_token_id,
                          "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad(), ctx():
        out = lm.model.generate(**enc, **kw)
    return list(lm.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                          skip_special_tokens=True))


def text_metrics(task: Sentiment, lm: LoadedModel, prompts: Sequence[str],
                 texts: Sequence[str]) -> dict[str, Any]:
    """VADER mean, perplexity under the (unsteered) model (inf when every answer is empty)
    and degenerate fraction of answers generated here, as the task measures them (the same
    rules for every library)."""
    m = task.measure(lm, prompts, texts)
    ppl = math.inf if math.isnan(m["ppl"]) else m["ppl"]
    return {"vader": m["vader"], "ppl": ppl, "degenerate": degenerate_fraction(texts)}


@contextlib.contextmanager
def letter_mass(lm: LoadedModel, out: list[float]) -> Iterator[None]:
    """Reads P(A) + P(B) at the last real token of every row the model scores (ab_scores
    right-pads, so that is the answer position) into ``out``, without changing anything."""
    tok = lm.tokenizer
    a_id = tok.encode("A", add_special_tokens=False)[0]
    b_id = tok.encode("B", add_special_tokens=False)[0]

    def hook(_m: Any, _args: Any, kwargs: dict[str, Any], output: Any) -> None:
        mask = kwargs.get("attention_mask")
        logits = output.logits
        last = (mask.sum(dim=1) - 1) if mask is not None else torch.full(
            (logits.shape[0],), logits.shape[1] - 1, device=logits.device)
        p = torch.softmax(logits[torch.arange(logits.shape[0]), last].float(), dim=-1)
        out.extend((p[:, a_id] + p[:, b_id]).tolist())

    handle = lm.model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def ab_measure(lm: LoadedModel, test: ContrastiveSet, steers: Any,
               ctx: Callable[[], contextlib.AbstractContextManager[Any]]) -> dict[str, Any]:
    """``ab_scores`` on the test pairs (steerlab: ``steers``; a peer: inside ``ctx()``)."""
    mass: list[float] = []
    with ctx(), letter_mass(lm, mass):
        scores = ab_scores(lm, test, steers, batch_size=16)
    n = len(scores)
    return {"p_match": sum(scores.p_match) / n, "p_a": sum(scores.p_a) / n,
            "letter_mass": sum(mass) / max(len(mass), 1)}


# --------------------------------------------------------------------------- families

@dataclass
class Family:
    """One library / method / settings, swept over strengths (see the module docstring)."""

    library: str
    method: str
    settings: str
    block: str
    scope: str
    # strength -> (context factory, steerlab steers or None)
    make: Callable[[float], tuple[Callable[[], Any], Any]]
    start_pos: float = 1.0
    start_neg: float = 1.0
    fixed: list[float] | None = None  # evaluate exactly these strengths (no ladder)
    fit_seconds: float | None = None
    note: str = ""
    points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.library}:{self.method}:{self.settings}"


def sweep(fam: Family, task: str, store: Store, measure: Callable[[Family, float], dict],
          admissible: Callable[[dict[str, Any]], bool], up: int, down: int) -> None:
    """Measure ``fam`` on the ladder of both directions (cached in ``store``)."""

    def point(s: float) -> dict[str, Any]:
        key = f"{task}|{fam.name}|{s:+.6g}"
        rec = store.get(key)
        if rec is None:
            t0 = time.perf_counter()
            rec = {"key": key, "task": task, "family": fam.name, "strength": s,
                   **measure(fam, s), "seconds": round(time.perf_counter() - t0, 2)}
            store.put(rec)
            print(f"  {fam.name:44s} {s:+9.4g}  " + _point_text(task, rec), flush=True)
        fam.points.append(rec)
        return rec

    if fam.fixed is not None:
        for s in fam.fixed:
            point(s)
        return
    for sign, start in ((1.0, fam.start_pos), (-1.0, fam.start_neg)):
        s = abs(start)
        if not math.isfinite(s) or s <= 0:
            continue
        if admissible(point(sign * s)):
            for _ in range(up):
                s *= 2.0
                if not admissible(point(sign * s)):
                    break
        else:
            for _ in range(down):
                s /= 2.0
                if admissible(point(sign * s)):
                    break


def _point_text(task: str, rec: dict[str, Any]) -> str:
    if task == "sentiment":
        return (f"VADER {rec['vader']:+.3f} ({rec['change']:+.3f})  ppl x{rec['ppl_ratio']:.2f}"
                f"  degenerate {rec['degenerate']:.2f}   {rec['example'][:70]!r}")
    return (f"P(match) {rec['p_match']:.3f} ({rec['change']:+.3f})  letter mass "
            f"{rec['letter_mass']:.3f}  P(A) {rec['p_a']:.3f}")


def best(points: Sequence[dict[str, Any]], sign: float,
         admissible: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """Among the points steered in direction ``sign`` (strengths of that sign), the
    admissible one with the largest change in that direction (None if none moves that way)."""
    ok = [p for p in points if admissible(p) and sign * p["strength"] > 0
          and sign * p["change"] > 0]
    return max(ok, key=lambda p: sign * p["change"]) if ok else None


# --------------------------------------------------------------------------- fitting, cached

def block_of(c: Any) -> str:
    if getattr(c, "layer", None) is not None:
        return str(c.layer)
    layers = getattr(c, "layers", None)
    if layers:
        return str(layers[0]) if len(layers) == 1 else f"{len(layers)} blocks"
    return "all"


def steerlab_fit(lm: LoadedModel, fits: Path, task: str, method: str, data: ContrastiveSet,
                 auto: bool, recipe: str | None) -> tuple[Any, float]:
    """Fit (or load the cached artifact of) ``method`` with fit_method, default or auto."""
    path = fits / f"{task}-{method}-{'auto' if auto else 'default'}.safetensors"
    if path.is_file():
        c = artifacts.load(path, lm.info)
        return c, float(c.fit_info.get("wall_seconds", math.nan))
    t0 = time.perf_counter()
    # ActAdd reads only its own prompt pair, and fit_method refuses data for it (its --auto
    # still needs the data: the validation slice it scores strengths on)
    c = fit_method(lm, method, None if method == "actadd" and not auto else data,
                   recipe=recipe, auto=auto)
    wall = round(time.perf_counter() - t0, 2)
    c.fit_info["wall_seconds"] = wall
    artifacts.save(c, path)
    return c, wall


def sv_fit(sv_mod: Any, lm: LoadedModel, fits: Path, task: str, layer: int,
           samples: list[tuple[str, str]]) -> tuple[Any, float]:
    path = fits / f"{task}-steering-vectors-L{layer}.pt"
    if path.is_file():
        saved = torch.load(path)
        return sv_mod.SteeringVector(saved["vectors"], "decoder_block"), saved["seconds"]
    t0 = time.perf_counter()
    vec = sv_mod.train_steering_vector(lm.model, lm.tokenizer, samples, layers=[layer],
                                       read_token_index=-1, batch_size=8, move_to_cpu=True)
    wall = round(time.perf_counter() - t0, 2)
    torch.save({"vectors": dict(vec.layer_activations), "seconds": wall}, path)
    return vec, wall


def repeng_fit(rp_mod: Any, lm: LoadedModel, fits: Path, task: str, layer: int,
               samples: list[tuple[str, str]]) -> tuple[Any, float]:
    path = fits / f"{task}-repeng-L{layer}.pt"
    if path.is_file():
        saved = torch.load(path)
        dirs = {k: v.numpy() for k, v in saved["directions"].items()}
        return rp_mod.ControlVector(model_type=saved["model_type"], directions=dirs), \
            saved["seconds"]
    t0 = time.perf_counter()
    entries = [rp_mod.DatasetEntry(positive=p, negative=n) for p, n in samples]
    vec = rp_mod.ControlVector.train(lm.model, lm.tokenizer, entries, hidden_layers=[layer],
                                     batch_size=16, method="pca_diff")
    wall = round(time.perf_counter() - t0, 2)
    torch.save({"directions": {k: torch.from_numpy(np.asarray(v)) for k, v in
                               vec.directions.items()},
                "model_type": vec.model_type, "seconds": wall}, path)
    return vec, wall


def _position_ids_shim(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Give a forward pass without position ids the (B, T) ids of its attention mask.

    repeng 0.4.0's ControlModule builds its padding mask from the ``position_ids`` the
    decoder block receives and reshapes it to (B, T, 1); for a plain batched forward pass
    (``ab_scores``) transformers 5 computes them as (1, T), and the reshape fails. ``generate``
    passes (B, T) ids itself and is left alone. For the right-padded rows ``ab_scores`` scores,
    these are the positions the model would use anyway (0..n-1 on the real tokens), so no
    logit changes; repeng then steers every position, as it does in generation."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    if kwargs.get("position_ids") is None and isinstance(ids, torch.Tensor) and \
            isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    return args, kwargs


@contextlib.contextmanager
def repeng_control(rp_mod: Any, lm: LoadedModel, vec: Any, layer: int,
                   coeff: float) -> Iterator[None]:
    """repeng's own steering: ``ControlModel`` around the model and ``set_control(vector, c)``,
    unwrapped on exit (ControlModel mutates the model it is given).

    Every block is wrapped, with a zero direction on all but block ``layer`` (adding zeros
    changes no value), so that the model still has a list of identical blocks:
    ``ab_scores`` enters a steerlab context, which looks the blocks up."""
    n = lm.info.num_layers
    u = np.asarray(vec.directions[layer], dtype=np.float32)
    full = rp_mod.ControlVector(model_type=vec.model_type, directions={
        i: (u if i == layer else np.zeros_like(u)) for i in range(n)})
    cm = rp_mod.ControlModel(lm.model, list(range(n)))
    handle = lm.model.register_forward_pre_hook(_position_ids_shim, with_kwargs=True)
    try:
        cm.set_control(full, coeff)
        yield
    finally:
        handle.remove()
        cm.reset()
        cm.unwrap()


def peer_text(lm: LoadedModel, text: str) -> str:
    """``text`` as the peers must be given it to read the token ids steerlab reads: they
    tokenize with the tokenizer's special tokens, steerlab reads rendered text without (the
    chat template writes them), so a BOS the template wrote and the tokenizer would add again
    is dropped. (SmolLM2's tokenizer adds none: the text is unchanged.)"""
    tok = lm.tokenizer
    want = list(tok(text, add_special_tokens=False)["input_ids"])
    if list(tok(text)["input_ids"]) == want:
        return text
    bos = tok.bos_token
    if bos and text.startswith(bos) and list(tok(text[len(bos):])["input_ids"]) == want:
        return text[len(bos):]
    raise SystemExit(f"cannot give the peers the token ids steerlab reads for {text[:60]!r}")


# --------------------------------------------------------------------------- one task

FIRST = ("caa", "alqr", "odesteer")  # fitted and swept first, so a partial run has them


def families(task: str, lm: LoadedModel, fits: Path, train: ContrastiveSet,
             methods: Sequence[str], auto_methods: Sequence[str], peer_samples: list,
             sv_layers: Sequence[int], rp_layers: Sequence[int], sv_mod: Any, rp_mod: Any,
             recipe: str | None, equivalence: bool, info: dict[str, Any]) -> Iterator[Family]:
    """Fit (or load) and yield one family at a time: the peers at their blocks, steerlab at
    default settings, steerlab with ``auto=True``, the peers at the block auto chose for CAA,
    and the equivalence family. The caller sweeps each family before the next is fitted."""
    null = contextlib.nullcontext
    info.setdefault("fits", {})
    sv_done: dict[int, Family] = {}

    def sv_family(layer: int) -> Family:
        vec, wall = sv_fit(sv_mod, lm, fits, task, layer, peer_samples)
        norm = float(vec.layer_activations[layer].norm())
        info["fits"][f"steering-vectors:caa:L{layer}"] = {"seconds": wall, "norm": norm}
        print(f"  steering-vectors caa block {layer}: fit {wall:.2f} s, |v| = {norm:.3f}",
              flush=True)
        fam = Family("steering-vectors", "caa", f"L{layer}", str(layer), "all (every position)",
                     make=lambda s, vec=vec: (lambda: vec.apply(lm.model, multiplier=s), None),
                     fit_seconds=wall, note=f"|v| = {norm:.2f}")
        sv_done[layer] = fam
        return fam

    def rp_family(layer: int) -> Family:
        vec, wall = repeng_fit(rp_mod, lm, fits, task, layer, peer_samples)
        ref, _ = sv_fit(sv_mod, lm, fits, task, layer, peer_samples)
        scale = float(ref.layer_activations[layer].norm())
        cos = float(np.dot(vec.directions[layer], ref.layer_activations[layer].cpu().numpy())
                    / scale / np.linalg.norm(vec.directions[layer]))
        info["fits"][f"repeng:pca_diff:L{layer}"] = {"seconds": wall, "coeff_unit": scale,
                                                     "cos_with_mean_diff": cos}
        print(f"  repeng pca_diff block {layer}: fit {wall:.2f} s, multiplier 1 = coefficient "
              f"{scale:.3f}, cos with the mean difference {cos:+.3f}", flush=True)
        return Family("repeng", "pca_diff", f"L{layer}", str(layer), "all (every position)",
                      make=lambda s, vec=vec, layer=layer, scale=scale: (
                          lambda: repeng_control(rp_mod, lm, vec, layer, s * scale), None),
                      fit_seconds=wall, note=f"coefficient = m x {scale:.2f}")

    for layer in sv_layers:
        yield sv_family(layer)
    for layer in rp_layers:
        yield rp_family(layer)
    caa_auto_layer: int | None = None
    for mode in ("default", "auto"):
        chosen = methods if mode == "default" else auto_methods
        for m in [*[x for x in FIRST if x in chosen], *[x for x in chosen if x not in FIRST]]:
            t0 = time.perf_counter()
            try:
                c, wall = steerlab_fit(lm, fits, task, m, train, mode == "auto", recipe)
            except Exception as exc:  # report, keep going with the other methods
                print(f"  steerlab {m} ({mode}): fit FAILED: {type(exc).__name__}: {exc}",
                      flush=True)
                info["fits"][f"steerlab:{m}:{mode}"] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            auto = c.fit_info.get("auto") if mode == "auto" else None
            scope = str(getattr(c, "scope", None) or c.default_scope)
            fam = Family("steerlab", m, mode, block_of(c), scope,
                         make=lambda s, c=c: (null, [Steer(c, s)]), fit_seconds=wall)
            if auto:
                fam.start_pos = float(auto["strength"])
                fam.start_neg = float(auto.get("strength_negative") or auto["strength"])
                fam.note = (f"auto: block {auto.get('layer')}, scope {auto.get('scope')}, "
                            f"s+ {auto['strength']:g}, "
                            f"s- {auto.get('strength_negative')}")
                if m == "caa" and auto.get("layer") is not None:
                    caa_auto_layer = int(auto["layer"])
                    info["caa_auto_layer"] = caa_auto_layer
            info["fits"][fam.name] = {"seconds": wall, "block": fam.block, "scope": scope,
                                      "hyperparameters": _jsonable(c.hyperparameters()),
                                      "auto": _jsonable({k: v for k, v in (auto or {}).items()
                                                         if k != "points"}) or None,
                                      "wall_this_run": round(time.perf_counter() - t0, 2)}
            print(f"  steerlab {m:14s} {mode:7s} block {fam.block:>9s} scope {scope:8s} "
                  f"fit {wall:8.2f} s {fam.note}", flush=True)
            yield fam
    if caa_auto_layer is not None:
        if caa_auto_layer not in sv_layers:
            yield sv_family(caa_auto_layer)
        if caa_auto_layer not in rp_layers:
            yield rp_family(caa_auto_layer)
    if equivalence and sv_layers and "caa" in methods:
        from steerlab.methods import CAA

        layer = sv_layers[0]
        vec, _ = sv_fit(sv_mod, lm, fits, task, layer, peer_samples)
        for scope in ("all", "from:-1"):
            c = CAA(layers=layer, scope=scope)
            c.set_vectors({c.fit_sites()[0]: vec.layer_activations[layer].float().cpu()})
            yield Family("steerlab", "caa", f"L{layer}-scope-{scope}=sv-vector", str(layer),
                         scope, make=lambda s, c=c: (null, [Steer(c, s)]),
                         fixed=[q["strength"] for q in sv_done[layer].points],
                         note="steering-vectors' vector applied by steerlab: scope all is "
                              "the equivalence check, from:-1 (CAA's default) the effect "
                              "of the scope alone")


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))


# --------------------------------------------------------------------------- reporting

def summary_rows(fams: Sequence[Family], admissible: Callable[[dict], bool],
                 fmt: Callable[[dict[str, Any] | None], str]) -> list[list[str]]:
    rows = []
    for f in fams:
        up, down = best(f.points, 1.0, admissible), best(f.points, -1.0, admissible)
        rows.append([f.name, f.block, f.scope, fmt(up), fmt(down),
                     f"{f.fit_seconds:.1f}" if f.fit_seconds is not None else "-"])
    return rows


def headline(fams: Sequence[Family], admissible: Callable[[dict], bool]) -> dict[str, Any]:
    """Best steerlab family per direction vs the best of each peer."""
    out: dict[str, Any] = {}
    for sign, label in ((1.0, "positive"), (-1.0, "negative")):
        per_lib: dict[str, tuple[float, str, dict[str, Any]] | None] = {}
        for lib in ("steering-vectors", "repeng", "steerlab"):
            cands = []
            for f in fams:
                if f.library != lib or "=sv-vector" in f.settings:
                    continue
                b = best(f.points, sign, admissible)
                if b is not None:
                    cands.append((sign * b["change"], f.name, b))
            per_lib[lib] = max(cands, key=lambda x: x[0]) if cands else None
        peers = [per_lib[k] for k in ("steering-vectors", "repeng")]
        bar = max((p[0] for p in peers if p is not None), default=0.0)
        winners = []
        for f in fams:
            if f.library != "steerlab" or "=sv-vector" in f.settings:
                continue
            b = best(f.points, sign, admissible)
            if b is not None and sign * b["change"] > bar:
                winners.append({"family": f.name, "change": b["change"],
                                "margin": round(sign * b["change"] - bar, 4),
                                "strength": b["strength"]})
        out[label] = {
            "best": {k: (None if v is None else {"family": v[1], "change": v[2]["change"],
                                                 "strength": v[2]["strength"]})
                     for k, v in per_lib.items()},
            "peer_bar": bar, "steerlab_beating_both": sorted(
                winners, key=lambda w: -w["margin"]),
        }
    return out


# --------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=str(ROOT / "results-run" / "peers"))
    p.add_argument("--test-fraction", type=float, default=0.17,
                   help="held-out share of the built-in sentiment set (0.17: 12 prompts)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--ppl-budget", type=float, default=1.5)
    p.add_argument("--up", type=int, default=3, help="doublings at most per direction")
    p.add_argument("--down", type=int, default=2, help="halvings at most per direction")
    p.add_argument("--methods", nargs="+", default=None,
                   help="steerlab methods (default: every registered one but sas)")
    p.add_argument("--auto-methods", nargs="*", default=None,
                   help="methods also fitted with auto=True (default: --methods)")
    p.add_argument("--sv-layers", nargs="+", type=int, default=[10])
    p.add_argument("--repeng-layers", nargs="+", type=int, default=[16])
    p.add_argument("--no-equivalence", action="store_true",
                   help="skip steerlab applying steering-vectors' vector (scope all)")
    p.add_argument("--behaviour", default="corrigible-neutral-HHH")
    p.add_argument("--ab-train", type=int, default=64)
    p.add_argument("--ab-test", type=int, default=48)
    p.add_argument("--ab-auto-methods", nargs="*", default=list(AB_AUTO_DEFAULT))
    p.add_argument("--skip-ab", action="store_true")
    p.add_argument("--skip-sentiment", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; 1 is much faster on a "
                        "machine whose cores other jobs share)")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sv_mod, rp_mod = import_peers()
    import importlib.metadata as md

    facts = machine_facts()
    print_header("steerlab vs steering-vectors and repeng, side by side", facts)
    versions = {k: md.version(k) for k in ("steering-vectors", "repeng", "torch",
                                           "transformers", "numpy")}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    run = Path(args.run_dir)
    fits = run / "fits"
    fits.mkdir(parents=True, exist_ok=True)
    store = Store(run / "points.jsonl")
    t_start = time.perf_counter()
    lm = load_model()
    renderer = Renderer(lm.tokenizer)
    methods = args.methods or [m for m in METHODS if m != "sas"]
    auto_methods = args.auto_methods if args.auto_methods is not None else methods
    out: dict[str, Any] = {"command": command_line(), "machine": facts, "versions": versions,
                           "model": lm.info.as_dict(), "args": vars(args), "tasks": {}}

    # ---------------------------------------------------------------- sentiment
    if not args.skip_sentiment:
        train, test = sentiment_pairs().split(test_fraction=args.test_fraction, seed=0)
        prompts = [q.prompt for q in test]
        judge = Sentiment(prompts=prompts, max_new_tokens=args.new_tokens,
                          batch_size=len(prompts), ppl_batch_size=8)
        print(f"\n## sentiment: fit on {len(train)} pairs, {len(prompts)} held-out prompts x "
              f"{args.new_tokens} greedy tokens")
        base = store.get("sentiment|unsteered")
        if base is None:
            texts = generate_under(lm, prompts, contextlib.nullcontext, args.new_tokens)
            ref = generate(lm, prompts, max_new_tokens=args.new_tokens,
                           batch_size=len(prompts))
            base = {"key": "sentiment|unsteered", "texts": texts,
                    "same_as_runtime_generate": texts == ref,
                    **text_metrics(judge, lm, prompts, texts)}
            store.put(base)
        print(f"  unsteered: VADER {base['vader']:+.3f}, ppl {base['ppl']:.3f}, degenerate "
              f"{base['degenerate']:.2f}; generate_under == steerlab.runtime.generate: "
              f"{base['same_as_runtime_generate']}", flush=True)

        def sent_measure(fam: Family, s: float) -> dict[str, Any]:
            ctx, steers = fam.make(s)
            if steers is not None:
                ctx = functools.partial(steering, lm, steers)
            texts = generate_under(lm, prompts, ctx, args.new_tokens)
            m = text_metrics(judge, lm, prompts, texts)
            return {**m, "change": m["vader"] - base["vader"],
                    "ppl_ratio": m["ppl"] / base["ppl"], "example": texts[0][:120],
                    "texts": texts}

        def sent_ok(rec: dict[str, Any]) -> bool:
            return rec["ppl_ratio"] <= args.ppl_budget and rec["degenerate"] == 0

        samples = [(peer_text(lm, renderer.prompt(q.prompt) + q.positive),
                    peer_text(lm, renderer.prompt(q.prompt) + q.negative)) for q in train]
        info: dict[str, Any] = {}
        fams = []
        for fam in families("sentiment", lm, fits, train, methods, auto_methods, samples,
                            args.sv_layers, args.repeng_layers, sv_mod, rp_mod, None,
                            not args.no_equivalence, info):
            sweep(fam, "sentiment", store, sent_measure, sent_ok, args.up, args.down)
            fams.append(fam)
        report("sentiment", fams, sent_ok, out, info, base, args, store)

    # ---------------------------------------------------------------- A/B
    path = SHARED / "caa" / args.behaviour / "generate_dataset.json"
    if not args.skip_ab and path.is_file():
        ab_train, ab_test = load_caa_ab(path).split(test_fraction=0.25, seed=0)
        ab_train, ab_test = ab_train[:args.ab_train], ab_test[:args.ab_test]
        task = f"ab:{args.behaviour}"
        print(f"\n## {task}: fit on {len(ab_train)} A/B pairs, P(matching letter) on "
              f"{len(ab_test)} held-out pairs", flush=True)
        key = f"{task}|unsteered"
        base = store.get(key)
        if base is None:
            base = {"key": key, **ab_measure(lm, ab_test, None, contextlib.nullcontext)}
            store.put(base)
        print(f"  unsteered: P(match) {base['p_match']:.3f}, letter mass "
              f"{base['letter_mass']:.3f}, P(A) {base['p_a']:.3f}", flush=True)

        def ab_meas(fam: Family, s: float) -> dict[str, Any]:
            ctx, steers = fam.make(s)
            m = ab_measure(lm, ab_test, steers, ctx)
            return {**m, "change": m["p_match"] - base["p_match"]}

        def ab_ok(rec: dict[str, Any]) -> bool:
            return rec["letter_mass"] >= 0.5 * base["letter_mass"]

        def letter_prefix(ans: str) -> str:
            k = next(i for i, ch in enumerate(ans) if ch.isalpha())
            return ans[:k + 1]

        samples = [(peer_text(lm, renderer.prompt(q.prompt) + letter_prefix(q.positive)),
                    peer_text(lm, renderer.prompt(q.prompt) + letter_prefix(q.negative)))
                   for q in ab_train]
        ab_methods = [m for m in methods if m != "actadd"]
        info = {}
        fams = []
        for fam in families(task, lm, fits, ab_train, ab_methods,
                            [m for m in args.ab_auto_methods if m in ab_methods], samples,
                            args.sv_layers, args.repeng_layers, sv_mod, rp_mod, "ab", False,
                            info):
            sweep(fam, task, store, ab_meas, ab_ok, min(args.up, 3), args.down)
            fams.append(fam)
        report(task, fams, ab_ok, out, info, base, args, store)
    elif not args.skip_ab:
        print(f"\n{path} is absent: the A/B part is skipped")

    total = time.perf_counter() - t_start
    out["wall_seconds_this_invocation"] = round(total, 1)
    print(f"\nwall time of this invocation: {total / 60:.1f} min; load average at start "
          f"{facts['load_average_at_start']}, at the end {load_average()}")
    out["load_average_at_end"] = load_average()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json_out}")


def report(task: str, fams: list[Family], ok: Callable[[dict], bool], out: dict[str, Any],
           info: dict[str, Any], base: dict[str, Any], args: Any, store: Store) -> None:
    sentiment = task == "sentiment"

    def fmt(b: dict[str, Any] | None) -> str:
        if b is None:
            return "-"
        if sentiment:
            return f"{b['change']:+.3f} (s={b['strength']:g}, ppl x{b['ppl_ratio']:.2f})"
        return f"{b['change']:+.3f} (s={b['strength']:g}, mass {b['letter_mass']:.2f})"

    rule = (f"ppl ratio <= {args.ppl_budget:g} and no degenerate answer" if sentiment
            else "letter mass >= half the unsteered")
    print(f"\n### {task}: best change within {rule}")
    print_table(["family", "block", "scope", "positive", "negative", "fit s"],
                summary_rows(fams, ok, fmt))
    head = headline(fams, ok)
    for label, h in head.items():
        peers = ", ".join(f"{k} {v['change']:+.3f} ({v['family']})" if v else f"{k} -"
                          for k, v in h["best"].items() if k != "steerlab")
        win = h["steerlab_beating_both"]
        print(f"{label}: peers' best: {peers}; steerlab's best: "
              + (f"{h['best']['steerlab']['change']:+.3f} ({h['best']['steerlab']['family']})"
                 if h["best"]["steerlab"] else "-")
              + f"; steerlab families beating both: {len(win)}"
              + (f" (best {win[0]['family']} by {win[0]['margin']:+.3f})" if win else ""))
    out["tasks"][task] = {
        "unsteered": {k: v for k, v in base.items() if k != "key"},
        "fits": info, "headline": head,
        "families": [{"name": f.name, "library": f.library, "method": f.method,
                      "settings": f.settings, "block": f.block, "scope": f.scope,
                      "note": f.note, "fit_seconds": f.fit_seconds,
                      "best_positive": best(f.points, 1.0, ok),
                      "best_negative": best(f.points, -1.0, ok),
                      "points": [{k: v for k, v in q.items() if k != "texts"}
                                 for q in f.points]} for f in fams],
    }


if __name__ == "__main__":
    main()
