"""Activation collection against a slow reference: one unpadded forward per sample, with
hooks that read the block input / output / attention-projection input directly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from steerlab.activations import Position, Sample, collect, token_activations
from steerlab.data import Renderer
from steerlab.errors import DataError, SiteError
from steerlab.models import LoadedModel
from steerlab.sites import Site, find_layers
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

QUESTIONS = [
    ("Is the sky blue?", "(A) yes"),
    ("Pick one", "(B)"),
    ("What is the answer to the question about cats and dogs?", " 42 is it"),
    ("Hi", "Sure: c"),
    ("the the the", "(A)"),
]
SITES = ["resid_pre.0", "resid_post.0", "resid_post.1", "heads.1", "resid_pre.1"]
POSITIONS = [
    Position.last(),
    Position.at(-2),
    Position.at(1),
    Position.at(0),
    Position.answer_letter(),
    Position.completion_mean(),
]


def samples(lm: LoadedModel) -> list[Sample]:
    r = Renderer(lm.tokenizer)
    return [Sample(r.prompt(q), c if r.mode == "chat" else " " + c) for q, c in QUESTIONS]


def _char_end(lm: LoadedModel, ids: list[int], k: int) -> int:
    """Characters decoded from ids[: k + 1] (the byte-level tokenizer decodes exactly)."""
    return len(lm.tokenizer.decode(ids[: k + 1], skip_special_tokens=True))


def reference(
    lm: LoadedModel, sample: Sample, sites: list[str], position: Position, *, add_special: bool
) -> dict[Site, torch.Tensor]:
    """One sample, no padding, hooks on the modules themselves; positions found by decoding."""
    layers = find_layers(lm.model)
    tok = lm.tokenizer
    ids: list[int] = tok(sample.text, add_special_tokens=add_special)["input_ids"]
    got: dict[Site, torch.Tensor] = {}
    handles = []
    for name in sites:
        site = layers.resolve(name)
        if site.kind == "heads":
            assert layers.attn_out_names is not None
            module = lm.model.get_submodule(layers.attn_out_names[site.layer])
            handles.append(module.register_forward_pre_hook(
                lambda m, a, s=site: got.__setitem__(s, a[0][0].clone())))
        elif site.kind == "resid_pre":
            module = lm.model.get_submodule(layers.block_names[site.layer])
            handles.append(module.register_forward_pre_hook(
                lambda m, a, s=site: got.__setitem__(s, a[0][0].clone())))
        else:
            module = lm.model.get_submodule(layers.block_names[site.layer])
            handles.append(module.register_forward_hook(
                lambda m, a, o, s=site: got.__setitem__(
                    s, (o if isinstance(o, torch.Tensor) else o[0])[0].clone())))
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    n = len(ids)
    if position.kind == "last":
        sl = slice(n - 1, n)
    elif position.kind == "index":
        j = position.index % n
        sl = slice(j, j + 1)
    elif position.kind == "answer_letter":
        letter_char = len(sample.prompt) + next(
            k for k, ch in enumerate(sample.completion) if ch.isalnum()
        )
        j = next(k for k in range(n) if _char_end(lm, ids, k) > letter_char)
        sl = slice(j, j + 1)
    else:
        first = next(k for k in range(n) if _char_end(lm, ids, k) > len(sample.prompt))
        sl = slice(first, n)
    return {s: t[sl].mean(dim=0) for s, t in got.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text", "qwen3", "falcon"])
def test_positions_match_reference(arch: str) -> None:
    lm = tiny_model(arch)
    items = samples(lm)
    layers = find_layers(lm.model)
    for position in POSITIONS:
        # batch_size 2: rows of different lengths share batches, so padding is exercised.
        got = collect(lm, items, SITES, position, batch_size=2, cache=False, progress=False)
        assert set(got) == {layers.resolve(s) for s in SITES}
        for site, t in got.items():
            assert t.dtype == torch.float32
            assert t.shape == (len(items), layers.width(site))
        for i, sample in enumerate(items):
            ref = reference(lm, sample, SITES, position, add_special=True)
            for site, t in got.items():
                torch.testing.assert_close(
                    t[i], ref[site], atol=1e-5, rtol=1e-5,
                    msg=lambda m, s=site, i=i, p=position: f"{arch} {p} {s} sample {i}: {m}",
                )


def test_answer_letter_and_completion_tokens() -> None:
    # "(A)" after " (" merges: the letter is its own token; check the token chosen is "A".
    lm = tiny_model("llama")
    tok = lm.tokenizer
    sample = Sample("Input: Q\nResponse:", " (A) yes")
    ids = tok(sample.text)["input_ids"]
    letter = collect(lm, [sample], ["resid_pre.0"], Position.answer_letter(), cache=False,
                     progress=False)[Site("resid_pre", 0)]
    emb = lm.model.get_input_embeddings().weight.detach()
    a_id = tok.convert_tokens_to_ids("A")
    assert a_id in ids
    # resid_pre.0 of llama is the token embedding itself.
    torch.testing.assert_close(letter[0], emb[a_id])
    first = collect(lm, [sample], ["resid_pre.0"], Position.completion_mean(), cache=False,
                    progress=False)[Site("resid_pre", 0)]
    completion_ids = ids[len(tok(sample.prompt)["input_ids"]) :]
    torch.testing.assert_close(first[0], emb[completion_ids].mean(dim=0))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_left_padding_does_not_change_values(arch: str) -> None:
    lm = tiny_model(arch)
    items = samples(lm)
    for position in (Position.last(), Position.completion_mean(), Position.at(2)):
        batched = collect(lm, items, SITES, position, batch_size=8, cache=False, progress=False)
        single = collect(lm, items, SITES, position, batch_size=1, cache=False, progress=False)
        for site in batched:
            torch.testing.assert_close(batched[site], single[site], atol=1e-5, rtol=1e-5)


def test_chat_rendered_samples_add_no_special_tokens() -> None:
    lm = tiny_model("llama", chat=True)
    items = samples(lm)
    assert items[0].prompt.startswith("<bos>")
    got = collect(lm, items, ["resid_post.1"], Position.at(0), batch_size=3, cache=False,
                  progress=False)
    for i, sample in enumerate(items):
        ref = reference(lm, sample, ["resid_post.1"], Position.at(0), add_special=False)
        torch.testing.assert_close(got[Site("resid_post", 1)][i], ref[Site("resid_post", 1)],
                                   atol=1e-5, rtol=1e-5)
    # Plain strings work too, and rendered=False lets the tokenizer add its <bos>.
    plain = collect(lm, ["hello there"], ["resid_pre.0"], Position.at(0), rendered=False,
                    cache=False, progress=False)
    bos = lm.model.get_input_embeddings().weight[lm.tokenizer.bos_token_id].detach()
    torch.testing.assert_close(plain[Site("resid_pre", 0)][0], bos)


def test_token_activations_matches_collect() -> None:
    lm = tiny_model("gpt2")
    text = "the cat sat on the mat"
    n = len(lm.tokenizer(text)["input_ids"])
    for site in ("resid_post.1", "heads.0", "resid_pre.1"):
        every = token_activations(lm, text, site)
        assert every.shape[0] == n
        for i in (0, 3, n - 1):
            one = collect(lm, [text], [site], Position.at(i), rendered=False, cache=False,
                          progress=False)
            torch.testing.assert_close(one[Site.parse(site)][0], every[i], atol=1e-5, rtol=1e-5)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_forward_stops_after_deepest_block() -> None:
    lm = tiny_model("llama")
    before = hook_count(lm.model)
    calls = {"head": 0, "block1": 0}
    layers = find_layers(lm.model)
    h1 = lm.model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", 1))
    h2 = layers.blocks[1].register_forward_pre_hook(lambda *a: calls.__setitem__("block1", 1))
    try:
        collect(lm, ["abc"], ["resid_post.0"], cache=False, progress=False)
        assert calls == {"head": 0, "block1": 0}
        collect(lm, ["abc"], ["heads.1", "resid_pre.0"], cache=False, progress=False)
        assert calls == {"head": 0, "block1": 1}
    finally:
        h1.remove()
        h2.remove()
    assert hook_count(lm.model) == before  # collect left no hooks behind


def _count_forwards(model: nn.Module) -> tuple[dict[str, int], Any]:
    count = {"n": 0}
    handle = model.register_forward_pre_hook(lambda *a: count.__setitem__("n", count["n"] + 1))
    return count, handle


def test_cache_hits_and_misses(steerlab_cache: Path) -> None:
    folder = steerlab_cache / "activations"
    lm = tiny_model("llama", seed=0)
    other = tiny_model("llama", seed=1)
    items = samples(lm)
    sites = ["resid_post.1", "heads.0"]

    def files() -> set[str]:
        return set(os.listdir(folder)) if folder.is_dir() else set()

    before = files()
    first = collect(lm, items, sites, Position.last(), progress=False)
    made = files() - before
    assert len(made) == 1 and next(iter(made)).endswith(".safetensors")
    count, handle = _count_forwards(lm.model)
    try:
        again = collect(lm, items, sites, Position.last(), progress=False)
    finally:
        handle.remove()
    assert count["n"] == 0  # served from the cache
    assert set(again) == set(first)
    for site in first:
        assert torch.equal(again[site], first[site])

    # Another model (same architecture and id, other weights) misses the cache.
    count, handle = _count_forwards(other.model)
    try:
        theirs = collect(other, items, sites, Position.last(), progress=False)
    finally:
        handle.remove()
    assert count["n"] > 0
    assert len(files() - before) == 2
    assert not torch.allclose(theirs[Site("resid_post", 1)], first[Site("resid_post", 1)])
    # Another position or another set of sites misses too.
    collect(lm, items, sites, Position.at(1), progress=False)
    collect(lm, items, ["resid_post.1"], Position.last(), progress=False)
    assert len(files() - before) == 4
    # A sub-request never reads a wrong entry: values equal the full request's.
    sub = collect(lm, items, ["resid_post.1"], Position.last(), progress=False)
    assert torch.equal(sub[Site("resid_post", 1)], first[Site("resid_post", 1)])


def test_cache_folder_argument_and_corrupt_entry(tmp_path: Path) -> None:
    lm = tiny_model("gpt2")
    items = samples(lm)
    fresh = collect(lm, items, ["resid_post.0"], cache=tmp_path, progress=False)
    (entry,) = list(tmp_path.glob("*.safetensors"))
    entry.write_bytes(b"not a safetensors file")
    again = collect(lm, items, ["resid_post.0"], cache=tmp_path, progress=False)
    assert torch.equal(again[Site("resid_post", 0)], fresh[Site("resid_post", 0)])
    assert entry.stat().st_size > 100  # rewritten
    assert not list(tmp_path.glob("*.tmp"))


def test_collect_errors() -> None:
    lm = tiny_model("llama")
    before = hook_count(lm.model)
    with pytest.raises(DataError, match="no samples"):
        collect(lm, [], ["resid_post.0"], cache=False, progress=False)
    with pytest.raises(DataError, match="no sites"):
        collect(lm, ["abc"], [], cache=False, progress=False)
    with pytest.raises(DataError, match="batch_size"):
        collect(lm, ["abc"], ["resid_post.0"], batch_size=0, cache=False, progress=False)
    with pytest.raises(DataError, match="empty completion"):
        collect(lm, [Sample("Input: hi\nResponse:", ""), Sample("a", " b")], ["resid_post.0"],
                Position.completion_mean(), cache=False, progress=False)
    with pytest.raises(DataError, match="empty completion"):
        collect(lm, ["no completion here"], ["resid_post.0"], Position.completion_mean(),
                cache=False, progress=False)
    with pytest.raises(DataError, match="outside"):
        collect(lm, ["abc"], ["resid_post.0"], Position.at(50), cache=False, progress=False)
    with pytest.raises(DataError, match="outside"):
        collect(lm, ["abc"], ["resid_post.0"], Position.at(-50), cache=False, progress=False)
    with pytest.raises(DataError, match="letter or digit"):
        collect(lm, [Sample("Q:", " ()")], ["resid_post.0"], Position.answer_letter(),
                cache=False, progress=False)
    with pytest.raises(SiteError, match="out of range"):
        collect(lm, ["abc"], ["resid_post.9"], cache=False, progress=False)
    with pytest.raises(SiteError):
        collect(lm, ["abc"], ["mlp.0"], cache=False, progress=False)
    # A failed collection leaves no hooks behind.
    assert hook_count(lm.model) == before
