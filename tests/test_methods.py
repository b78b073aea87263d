"""CAA and ActAdd: estimators against slow references, recipes, and bad input."""

from __future__ import annotations

import pytest
import torch

from steerlab.activations import Position, Sample, collect, token_activations
from steerlab.data import ContrastivePair, ContrastiveSet, Renderer
from steerlab.errors import DataError, SteeringError
from steerlab.fitting import contrastive_samples, fit_actadd, fit_caa
from steerlab.methods import CAA, ActAdd
from steerlab.methods.base import StepContext
from steerlab.methods.caa import normalize_across
from steerlab.runtime import Steer, generate
from steerlab.sites import Site
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

AB = ContrastiveSet(
    [
        ContrastivePair("Do you like cats?\n\nChoices:\n (A) Yes\n (B) No", "(A)", "(B)"),
        ContrastivePair("Is the sky green?\n\nChoices:\n (A) Yes\n (B) No", "(B)", "(A)"),
        ContrastivePair("Pick one.\n\nChoices:\n (A) tea\n (B) coffee", "(A)", "(B)"),
    ],
    name="ab",
)
SENT = ContrastiveSet(
    [
        ContrastivePair("How was it?", "It was great and lovely.", "It was awful and sad."),
        ContrastivePair("The food?", "Delicious, we loved it.", "Bland, we hated it."),
        ContrastivePair("Your day?", "A wonderful day.", "A terrible day."),
    ],
    name="sent",
)


def _ctx(batch: int, seq: int) -> StepContext:
    pos = torch.arange(seq).expand(batch, seq)
    return StepContext(positions=pos, prompt_len=torch.full((batch,), seq))


def test_caa_fit_is_mean_of_differences() -> None:
    torch.manual_seed(0)
    pos = {Site("resid_post", 1): torch.randn(7, 16)}
    neg = {Site("resid_post", 1): torch.randn(7, 16)}
    c = CAA(layers=1).fit(pos, neg)
    site = Site("resid_post", 1)
    ref = sum((pos[site][i] - neg[site][i] for i in range(7)), torch.zeros(16)) / 7
    torch.testing.assert_close(c.vectors[site], ref, rtol=1e-6, atol=1e-6)
    h = torch.randn(2, 3, 16)
    out = c.steer(site, h, torch.tensor([2.0, -1.0]), _ctx(2, 3))
    torch.testing.assert_close(out[0], h[0] + 2.0 * ref)
    torch.testing.assert_close(out[1], h[1] - ref)


def test_caa_normalize_and_normalize_across() -> None:
    torch.manual_seed(1)
    site = Site("resid_post", 0)
    a = CAA(layers=0, normalize=3.0).fit({site: torch.randn(4, 8)}, {site: torch.randn(4, 8)})
    assert float(a.vectors[site].norm()) == pytest.approx(3.0, rel=1e-5)
    b = CAA(layers=0).fit({site: torch.randn(4, 8) * 5}, {site: torch.randn(4, 8)})
    direction_b = b.vectors[site] / b.vectors[site].norm()
    target = (a.vectors[site].norm() + b.vectors[site].norm()) / 2
    normalize_across([a, b])
    for c in (a, b):
        assert float(c.vectors[site].norm()) == pytest.approx(float(target), rel=1e-5)
    torch.testing.assert_close(b.vectors[site] / b.vectors[site].norm(), direction_b)


def test_caa_bad_input() -> None:
    site = Site("resid_post", 0)
    x = torch.randn(3, 8)
    with pytest.raises(DataError, match="one class"):
        CAA(layers=0).fit({site: x}, {site: x.clone()})
    with pytest.raises(DataError, match="equal width"):
        CAA(layers=0).fit({site: x}, {site: torch.randn(2, 7)})
    with pytest.raises(DataError, match="at least one"):
        CAA(layers=0).fit({site: x}, {site: torch.randn(0, 8)})
    # unpaired rows (a labelled set): the difference of the class means
    y = torch.randn(5, 8)
    v = CAA(layers=0).fit({site: x}, {site: y}).vectors[site]
    torch.testing.assert_close(v, x.mean(0) - y.mean(0))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(SteeringError, match="non-finite"):
        CAA(layers=0).fit({site: bad}, {site: x})
    with pytest.raises(SteeringError, match="recipe"):
        CAA(layers=0, recipe="nope")  # type: ignore[arg-type]
    with pytest.raises(SteeringError, match="normalize"):
        CAA(layers=0, normalize=0.0)
    with pytest.raises(SteeringError):
        CAA(layers=[])
    c = CAA(layers=0).fit({site: x}, {site: torch.randn(3, 8)})
    with pytest.raises(SteeringError, match="width"):
        c.steer(site, torch.randn(1, 2, 4), torch.ones(1), _ctx(1, 2))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_fit_caa_ab_recipe_reads_the_answer_letter(arch: str) -> None:
    """fit_caa with recipe 'ab' equals a slow per-pair reference at the letter token."""
    lm = tiny_model(arch, chat=True)
    c = fit_caa(lm, AB, CAA(layers=[0, 1], recipe="ab"), cache=False, progress=False)
    renderer = Renderer(lm.tokenizer)
    for layer in (0, 1):
        site = Site("resid_post", layer)
        diffs = []
        for pair in AB:
            acts = []
            for completion in (pair.positive, pair.negative):
                prompt = renderer.prompt(pair.prompt)
                text = prompt + completion
                h = token_activations(lm, text, site, rendered=True)
                # The letter token: the one holding the character after "(".
                ids = lm.tokenizer(text, add_special_tokens=False,
                                   return_offsets_mapping=True)
                letter_char = len(prompt) + completion.index("(") + 1
                idx = next(i for i, (a, b) in enumerate(ids["offset_mapping"])
                           if a <= letter_char < b)
                acts.append(h[idx])
            diffs.append(acts[0] - acts[1])
        ref = torch.stack(diffs).mean(0)
        torch.testing.assert_close(c.vectors[site], ref, rtol=1e-5, atol=1e-5)
    assert c.fit_info["n_pairs"] == 3
    assert c.data_fingerprint == AB.fingerprint()
    assert c.model_info == lm.info


def test_fit_caa_mean_recipe_matches_collect() -> None:
    lm = tiny_model("qwen2", chat=True)
    c = fit_caa(lm, SENT, CAA(layers=1, recipe="mean"), cache=False, progress=False)
    pos_s, neg_s = contrastive_samples(SENT, Renderer(lm.tokenizer))
    site = Site("resid_post", 1)
    pos = collect(lm, pos_s, [site], Position.completion_mean(), cache=False, progress=False)
    neg = collect(lm, neg_s, [site], Position.completion_mean(), cache=False, progress=False)
    torch.testing.assert_close(c.vectors[site], (pos[site] - neg[site]).mean(0))


def test_fit_caa_plain_renderer_for_base_model() -> None:
    lm = tiny_model("gpt2", chat=False)
    c = fit_caa(lm, SENT, CAA(layers=-1), cache=False, progress=False)
    assert c.sites == [Site("resid_post", 1)]
    assert c.fit_info["render_mode"] == "plain"
    pos_s, _ = contrastive_samples(SENT, Renderer(lm.tokenizer))
    assert pos_s[0] == Sample("Input: How was it?\nResponse:", " It was great and lovely.")


def test_fit_caa_rejects_empty_data() -> None:
    lm = tiny_model("llama")
    with pytest.raises(DataError):
        fit_caa(lm, ContrastiveSet([]), CAA(layers=0), cache=False, progress=False)


@pytest.mark.parametrize("mode", ["vector", "positional"])
def test_actadd_fit_and_steer(mode: str) -> None:
    lm = tiny_model("llama")
    a = fit_actadd(lm, ActAdd(layer=1, positive="I love it", negative="I hate", mode=mode))
    site = Site("resid_post", 1)
    hp = token_activations(lm, "I love it", site)
    hn = token_activations(lm, "I hate", site)
    torch.testing.assert_close(a.vectors[site], hp[-1] - hn[-1])
    if mode == "positional":
        assert a.positional is not None
        n = max(len(hp), len(hn))
        assert a.positional.shape[0] == n
        torch.testing.assert_close(a.positional[: len(hn)], hp[: len(hn)] - hn)
        # Only absolute positions < n are changed.
        h = torch.zeros(1, n + 3, 32)
        pos = torch.arange(n + 3)[None]
        ctx = StepContext(positions=pos, prompt_len=torch.tensor([n + 3]))
        out = a.steer(site, h, torch.ones(1), ctx)
        assert torch.equal(out[0, n:], h[0, n:])
        torch.testing.assert_close(out[0, :n], a.positional)
    plain = generate(lm, ["hello there"], max_new_tokens=5, render=False)
    steered = generate(lm, ["hello there"], steers=Steer(a, 8.0), max_new_tokens=5,
                       render=False)
    assert plain != steered


def test_actadd_bad_input() -> None:
    with pytest.raises(DataError):
        ActAdd(positive="same", negative="same")
    with pytest.raises(SteeringError):
        ActAdd(mode="other")  # type: ignore[arg-type]
