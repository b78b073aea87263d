"""Regenerate ``docs/results.md``: every landed method on the embedded model, one command.

Runs two resumable sweeps with the evaluation harness (:mod:`steerlab.evals.sweep`) into
``--run`` (default ``results-run/``), then writes the report with its plots into
``docs/results/`` and the page ``docs/results.md``:

1. **Methods** (all of ``steerlab.methods`` that fit from data; ActAdd reads only its own
   prompt pair, A-LQR+ shares A-LQR's fit, and StepODESteer and ActAdd-LFS are ablations
   with their own results pages, so these are left out), block ``--layer`` (A-LQR and
   S-PID steer every block and ignore it; ITI chooses among that block's heads only), two
   strengths each, scope ``all``, on:
   - ``sentiment``: VADER of greedy answers (``--new-tokens``) to the first ``--prompts``
     neutral prompts, with perplexity;
   - ``ab:BEHAVIOUR`` (``--behaviour``): P(behaviour-matching letter) on held-out CAA A/B
     pairs, and CAA's MMLU A/B accuracy scored under the same steering (capability);
   - ``truthfulqa_mc``: MC1/MC2 by log-probability, 2-fold (``--tqa-questions`` questions);
   every cell also gets the next-token KL from the unsteered model on the neutral prompts.
2. **Stronger A/B grid**: the additive methods' answer-letter vectors are short, so they get
   a second sweep on the A/B task with larger strengths (``STRONG_AB``).
3. **Layer sweep**: CAA at blocks 4..24 on sentiment.

INNSteer and SAS are steerlab's reconstructions (no official code exists): their labels get a
``†`` in every table of the page and a note says so (``RECONSTRUCTED``).

SAS needs a sparse autoencoder at the block: ``--sae FOLDER`` (SAELens format); without
it, one is trained (8×, TopK, 100 000 tokens of ``../shared/data``, about 4 minutes) into
the run folder and reused afterwards.

A rerun skips finished cells (and cached fits), so an interrupted run is resumed by running
the command again. Needs ``../shared/data``.

Run: ``python benchmarks/results_page.py`` (under an hour on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from _common import command_line, machine_facts
from steerlab.corpus import corpus_activations, load_corpus
from steerlab.data import neutral_prompts
from steerlab.evals.report import compare_table, write_report
from steerlab.evals.sweep import SweepResults, SweepSpec, run_sweep
from steerlab.evals.tasks import CapabilityUnder, make_task
from steerlab.models import load_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

STRENGTHS: dict[str, list[float]] = {
    "caa": [2.0, 4.0], "repe": [2.0, 4.0], "probe": [2.0, 4.0], "mean_act": [2.0, 4.0],
    "linear_act": [1.0, 2.0], "mimic": [1.0, 2.0], "angular": [0.5, 1.0], "iti": [1.0, 2.0],
    "odesteer": [20.0, 40.0], "innsteer": [1.0, 2.0], "sas": [4.0, 8.0], "alqr": [1.0, 2.0],
    "spid": [1.0, 2.0],
}

# On the A/B task the answer-letter vectors are short (CAA x4 costs a KL of 0.014), so the
# additive methods get a second, stronger grid there ("ab-strong"), to reach the KL budget.
STRONG_AB: dict[str, list[float]] = {
    "caa": [8.0, 16.0, 32.0], "repe": [8.0, 16.0, 32.0], "probe": [8.0, 16.0, 32.0],
    "mean_act": [8.0, 16.0, 32.0], "linear_act": [4.0, 8.0, 16.0],
    "innsteer": [4.0, 8.0, 16.0],
}


# Methods whose results are steerlab's reconstructions, not the authors' code (none exists):
# their labels are marked with RECONSTRUCTION_MARK in every table and the page explains why.
RECONSTRUCTED: dict[str, str] = {
    "innsteer": "INNSteer (arXiv 2606.08454): no official code exists and only the abstract was "
                "available; the loss, the training and the defaults are a third-party recipe's "
                "or steerlab's (`docs/innsteer.md`)",
    "sas": "SAS (arXiv 2503.00177): no official code exists (the authors' `chandar-lab/SAS` "
           "holds only a README); the algorithm is reconstructed from the paper's Algorithms 1/2 "
           "as quoted by re-implementations, with an SAE trained by steerlab (`docs/sas.md`)",
}
RECONSTRUCTION_MARK = "†"
_RECONSTRUCTED_LABEL = re.compile(
    r"(?<=\| )((?:" + "|".join(RECONSTRUCTED) + r")(?:\[[0-9a-f]+\])?)(?= \|)")


def mark_reconstructions(text: str) -> str:
    """Mark the labels of :data:`RECONSTRUCTED` methods in markdown table cells (idempotent)."""
    return _RECONSTRUCTED_LABEL.sub(lambda m: f"{m.group(1)} {RECONSTRUCTION_MARK}", text)


def reconstruction_note() -> list[str]:
    """The page's note on the marked methods."""
    lines = [f"{RECONSTRUCTION_MARK} **steerlab's reconstructions.** The methods marked "
             f"{RECONSTRUCTION_MARK} have no official code; their rows are results of "
             f"steerlab's reconstruction, not of the authors' methods:", ""]
    lines += [f"- {text}." for text in RECONSTRUCTED.values()]
    return [*lines, ""]


def sae_for(run: Path, layer: int, lm: Any, given: str | None) -> str:
    if given:
        return given
    out = run / f"sae-8x-L{layer}"
    if (out / "cfg.json").is_file():
        return str(out)
    from steerlab.sae import SAEConfig, hook_name_for_site, save_saelens, train_sae

    site = f"resid_post.{layer}"
    shards = corpus_activations(lm, load_corpus(SHARED), site, max_tokens=100_000)
    d = lm.info.hidden_size
    cfg = SAEConfig(d_in=d, d_sae=8 * d, architecture="topk", k=32, site=site,
                    hook_name=hook_name_for_site(site), model_name=lm.info.model_id)
    sae, _ = train_sae(shards, cfg, epochs=2)
    save_saelens(sae, out)
    return str(out)


def page(main: SweepResults, layers: SweepResults, run: Path, seconds: float,
         budget: float, facts: dict[str, Any]) -> str:
    docs = REPO / "docs"
    rep_main = write_report(main, docs / "results" / "methods", budget=budget,
                            title="Every method on the embedded model")
    rep_layers = write_report(layers, docs / "results" / "layers", budget=budget,
                              title="CAA across blocks (sentiment)")

    def body(path: Path, prefix: str) -> str:
        text = path.read_text()
        text = re.sub(r"^# .*\n", "", text, count=1)
        text = re.sub(r"\]\((figures/[^)]+)\)", lambda m: f"]({prefix}/{m.group(1)})", text)
        return re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)

    best = compare_table(main, "kl", budget)
    lines = [
        "# Results: every method on the embedded model",
        "",
        f"`smollm2-135m` (SmolLM2-135M-Instruct, 30 blocks, d = 576, float32) on this "
        f"{facts['cpu_count']}-core CPU. Regenerate with:",
        "",
        "```bash",
        ".venv/bin/python benchmarks/results_page.py",
        "```",
        "",
        f"Regeneration took {seconds / 60:.1f} minutes of sweeping in all on this machine "
        f"(last invocation: `{command_line()}`; a rerun skips the cells already finished in "
        f"`{run.name}/`, so an interrupted run resumes, and the time adds up over "
        f"invocations). Methods are compared at equal fluency: for each task, the largest "
        f"change of the task's primary metric each method reaches among its cells whose "
        f"next-token KL from the unsteered model on the neutral prompts is at most {budget:g} "
        f"nats.",
        "",
        *reconstruction_note(),
        "## Best change within the KL budget",
        "",
    ]
    tasks = list(best)
    lines.append("| method | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    labels = sorted({lab for t in tasks for lab in best[t]})
    for lab in labels:
        row = []
        for t in tasks:
            b = best[t].get(lab)
            row.append("—" if b is None else
                       f"{b['delta']:+.3f} (s={b['strength']:g}, KL {b['cost']:.3f})")
        lines.append(f"| {lab} | " + " | ".join(row) + " |")
    lines += ["", "## All cells", "", body(rep_main, "results/methods"), "",
              "## Layer sweep", "", body(rep_layers, "results/layers")]
    return mark_reconstructions("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(REPO / "results-run"))
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--behaviour", default="corrigible-neutral-HHH")
    p.add_argument("--methods", nargs="+", default=list(STRENGTHS))
    p.add_argument("--tqa-questions", type=int, default=60)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--prompts", type=int, default=19)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.25, help="KL budget (nats)")
    p.add_argument("--sae", default=None)
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--retry-failed", action="store_true",
                   help="run the failed cells of an earlier run again")
    args = p.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: the results page needs the shipped datasets")
    facts = machine_facts()
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    lm = load_model()
    t0 = time.perf_counter()
    hp: dict[str, dict[str, Any]] = {}
    if "sas" in args.methods:
        hp["sas"] = {"sae": sae_for(run, args.layer, lm, args.sae)}
    if "innsteer" in args.methods:
        hp["innsteer"] = {"epochs": 150}
    sent = make_task("sentiment", lm, n_test=args.prompts, max_new_tokens=args.new_tokens,
                     batch_size=args.prompts)
    ab = make_task(f"ab:{args.behaviour}", lm, n_test=args.n_test)
    mmlu = make_task("mmlu_ab", lm, n_test=args.n_test)
    tqa = make_task("truthfulqa_mc", lm, n_questions=args.tqa_questions, fit_format="pairs")
    spec = SweepSpec(methods=list(args.methods), layers=[args.layer],
                     strengths={m: STRENGTHS[m] for m in args.methods},
                     tasks=[sent, ab, CapabilityUnder(mmlu, ab), tqa], scope="all",
                     hyperparameters=hp, fluency_texts=neutral_prompts()[: args.prompts])
    main_res = run_sweep(lm, spec, run / "methods", retry_failed=args.retry_failed)
    strong = [m for m in args.methods if m in STRONG_AB]
    strong_res = SweepResults()
    if strong:
        sspec = SweepSpec(methods=strong, layers=[args.layer],
                          strengths={m: STRONG_AB[m] for m in strong}, tasks=[ab],
                          scope="all", hyperparameters=hp,
                          fluency_texts=neutral_prompts()[: args.prompts])
        strong_res = run_sweep(lm, sspec, run / "ab-strong")
    layer_res = SweepResults()
    if not args.skip_layers:
        lspec = SweepSpec(methods=["caa"], layers=[4, 8, 12, 16, 20, 24],
                          strengths=[2.0, 4.0], tasks=[sent], scope="all",
                          fluency_texts=neutral_prompts()[: args.prompts])
        layer_res = run_sweep(lm, lspec, run / "layers")
    seconds = time.perf_counter() - t0
    timing_path = run / "timing.json"
    history: list[float] = []
    if timing_path.is_file():
        history = list(json.loads(timing_path.read_text()).get("history_seconds", []))
    history.append(round(seconds, 1))
    seconds = sum(history)
    (REPO / "docs" / "results.md").write_text(
        page(SweepResults([*main_res, *(c for c in strong_res
                                         if c.get("method") is not None)]),
             layer_res, run, seconds, args.budget, facts))
    timing_path.write_text(json.dumps({"sweep_seconds": round(seconds, 1),
                                       "history_seconds": history, "stats": main_res.stats},
                                      indent=1))
    print(f"wrote docs/results.md ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
