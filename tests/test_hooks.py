"""steerlab.hooks: hooks go on where they are asked for and always come off.

A toy model stands in for a causal LM: two blocks that return ``(hidden, extra)`` tuples and
take their hidden states positionally or as ``hidden_states=``, each with an attention output
projection, and a config, so that :func:`steerlab.sites.find_layers` maps sites onto it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from steerlab.errors import SteerlabError
from steerlab.hooks import (
    Hook,
    HookSet,
    at_site,
    at_sites,
    on_input,
    on_output,
    post_hook,
    pre_hook,
)
from steerlab.sites import LayerMap, Site, find_layers

D = 4


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.o_proj = nn.Linear(D, D)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attn()
        self.mlp = nn.Linear(D, D)

    def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> tuple[Any, ...]:
        h = self.self_attn.o_proj(hidden_states) * scale
        return hidden_states + self.mlp(h), "extra"


class Toy(nn.Module):
    def __init__(self, by_keyword: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=D, num_attention_heads=2)
        self.layers = nn.ModuleList([Block(), Block()])
        self.by_keyword = by_keyword
        self.extras: list[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            out = block(hidden_states=x) if self.by_keyword else block(x)
            x = out[0]
            self.extras.append(out[1])
        return x


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def toy(by_keyword: bool = False) -> tuple[Toy, LayerMap, torch.Tensor]:
    torch.manual_seed(0)
    model = Toy(by_keyword)
    return model, find_layers(model), torch.randn(2, 3, D)


def every_site() -> list[Site]:
    return [Site(kind, layer) for layer in range(2) for kind in ("resid_pre", "resid_post",
                                                                  "heads")]


# --- removal --------------------------------------------------------------------------------


def test_hooks_removed_after_normal_exit() -> None:
    model, layers, x = toy()
    seen: list[Site] = []
    hooks = at_sites(layers, {s: (lambda h, s=s: seen.append(s)) for s in every_site()})
    hooks.append(pre_hook(model, lambda m, a, k: None))
    hs = HookSet(hooks)
    with hs as entered:
        assert entered is hs and hs.installed
        assert hook_count(model) == 7
        model(x)
    assert hook_count(model) == 0 and not hs.installed
    assert sorted(seen) == sorted(every_site())
    seen.clear()
    model(x)
    assert seen == []


def test_hooks_removed_after_an_error_in_the_block() -> None:
    model, layers, _ = toy()
    with pytest.raises(RuntimeError, match="body"), HookSet(
        at_sites(layers, {s: (lambda h: None) for s in every_site()})
    ):
        assert hook_count(model) == 6
        raise RuntimeError("body")
    assert hook_count(model) == 0


@pytest.mark.parametrize("site", every_site())
def test_hooks_removed_after_an_error_in_a_hook(site: Site) -> None:
    model, layers, x = toy()

    def boom(h: torch.Tensor) -> None:
        raise RuntimeError("boom")

    others = at_sites(layers, {s: (lambda h: None) for s in every_site() if s != site})
    with pytest.raises(RuntimeError, match="boom"), HookSet([*others, at_site(layers, site,
                                                                              boom)]):
        model(x)
    assert hook_count(model) == 0


def test_hooks_removed_when_registering_fails_halfway() -> None:
    model, layers, _ = toy()
    bad = Hook(module=object(), fn=lambda *a: None, pre=True)  # type: ignore[arg-type]
    hs = HookSet([at_site(layers, "resid_post.0", lambda h: None), bad])
    with pytest.raises(AttributeError):
        hs.install()
    assert hook_count(model) == 0 and not hs.installed


def test_a_set_installs_once_at_a_time_and_again_after_removal() -> None:
    model, layers, x = toy()
    calls: list[int] = []
    hs = HookSet([at_site(layers, "resid_post.1", lambda h: calls.append(1))])
    with hs:
        with pytest.raises(SteerlabError, match="already installed"):
            hs.install()
        assert hook_count(model) == 1  # the failed second install left the first in place
    hs.install()
    model(x)
    hs.remove()
    hs.remove()  # removing twice is harmless
    assert calls == [1] and hook_count(model) == 0
    empty = HookSet([])
    with empty:
        assert empty.installed


# --- reading and writing --------------------------------------------------------------------


def test_sites_map_to_block_inputs_outputs_and_the_heads_input() -> None:
    model, layers, x = toy()
    got: dict[str, torch.Tensor] = {}
    with HookSet(at_sites(layers, {str(s): (lambda h, s=s: got.__setitem__(str(s), h))
                                   for s in every_site()})):
        y = model(x)
    # resid_pre.0 is the model input, resid_post.1 its output, resid_pre.1 == resid_post.0
    assert torch.equal(got["resid_pre.0"], x) and torch.equal(got["resid_post.1"], y)
    assert torch.equal(got["resid_pre.1"], got["resid_post.0"])
    # heads.L is what the attention output projection of block L is called with
    assert torch.equal(got["heads.0"], x)
    assert torch.equal(got["heads.1"], got["resid_post.0"])


def test_tuple_outputs_are_read_and_written_in_place_of_their_first_element() -> None:
    model, layers, x = toy()
    plain = model(x)
    model.extras.clear()
    with HookSet([at_site(layers, "resid_post.1", lambda h: h + 1.0)]):
        steered = model(x)
    assert torch.equal(steered, plain + 1.0)
    assert model.extras == ["extra", "extra"]  # the other tuple elements are kept


def test_list_outputs_and_plain_tensor_outputs() -> None:
    lin = nn.Linear(D, D)
    x = torch.randn(3, D)
    with HookSet([on_output(lin, lambda h: h * 0.0)]):
        assert torch.equal(lin(x), torch.zeros(3, D))

    class Lister(nn.Module):
        def forward(self, x: torch.Tensor) -> list[Any]:
            return [x, "kept"]

    mod = Lister()
    with HookSet([on_output(mod, lambda h: h + 2.0)]):
        out = mod(x)
    assert isinstance(out, list) and torch.equal(out[0], x + 2.0) and out[1] == "kept"


def test_returning_none_or_the_same_tensor_leaves_the_output_alone() -> None:
    model, layers, x = toy()
    plain = model(x)
    outs: list[Any] = []
    block = layers.blocks[0]
    with HookSet([
        at_site(layers, "resid_post.0", lambda h: None),
        at_site(layers, "resid_pre.0", lambda h: h),
        post_hook(block, lambda m, a, o: outs.append(o)),
    ]):
        assert torch.equal(model(x), plain)
    assert outs[0][1] == "extra"


@pytest.mark.parametrize("by_keyword", [False, True])
def test_pre_hooks_see_and_write_keyword_hidden_states(by_keyword: bool) -> None:
    model, layers, x = toy(by_keyword)
    plain = model(x)
    got: list[torch.Tensor] = []

    def shift(h: torch.Tensor) -> torch.Tensor:
        got.append(h)
        return h + 1.0

    with HookSet([on_input(layers.blocks[0], shift)]):
        steered = model(x)
    assert torch.equal(got[0], x)
    # the same as calling the model on the shifted input
    assert torch.equal(steered, model(x + 1.0))
    assert not torch.equal(steered, plain)


def test_raw_pre_hooks_get_and_replace_keyword_arguments() -> None:
    model, layers, x = toy(by_keyword=True)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def double_scale(
        mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        calls.append((args, dict(kwargs)))
        return args, {**kwargs, "scale": 2.0}

    block = layers.blocks[0]
    with HookSet([pre_hook(block, double_scale)]):
        hooked = model(x)
    assert calls[0][0] == () and set(calls[0][1]) == {"hidden_states"}
    h0 = block(hidden_states=x, scale=2.0)[0]
    assert torch.equal(hooked, layers.blocks[1](h0)[0])


# --- order ----------------------------------------------------------------------------------


def test_prepend_runs_before_hooks_already_there() -> None:
    model, layers, x = toy()
    block = layers.blocks[0]
    order: list[str] = []
    old_pre = block.register_forward_pre_hook(lambda m, a: order.append("old pre"))
    old_post = block.register_forward_hook(lambda m, a, o: order.append("old post"))
    try:
        with HookSet([
            at_site(layers, "resid_pre.0", lambda h: order.append("pre last")),
            at_site(layers, "resid_pre.0", lambda h: order.append("pre first"), prepend=True),
            at_site(layers, "resid_post.0", lambda h: order.append("post last")),
            post_hook(block, lambda m, a, o: order.append("post first"), prepend=True),
        ]):
            model(x)
    finally:
        old_pre.remove()
        old_post.remove()
    assert order == ["pre first", "old pre", "pre last", "post first", "old post",
                     "post last"]


def test_a_prepended_write_is_what_later_hooks_see() -> None:
    model, layers, x = toy()
    block = layers.blocks[0]
    seen: list[torch.Tensor] = []
    old = block.register_forward_hook(lambda m, a, o: seen.append(o[0]))
    try:
        plain = model(x)
        with HookSet([at_site(layers, "resid_post.0", lambda h: h * 0.0, prepend=True)]):
            model(x)
    finally:
        old.remove()
    assert not torch.equal(seen[0], torch.zeros_like(plain))
    assert torch.equal(seen[1], torch.zeros_like(plain))
