"""Layer discovery and site semantics on tiny random models of many architectures."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from steerlab.activations import token_activations
from steerlab.errors import SiteError
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.caa import CAA
from steerlab.runtime import Steer, steering
from steerlab.scope import ALL
from steerlab.sites import SITE_KINDS, LayerMap, Site, find_layers
from tiny_models import ARCHS, build_tiny_model, tiny_model

ALL_ARCHS = sorted(ARCHS)
TEXT = "the cat sat on the mat"

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class Recorder(Controller):
    """Records the tensor it is given at each site and returns it unchanged."""

    method = "recorder"

    def __init__(self, sites: list[Site]) -> None:
        super().__init__()
        self.sites = list(sites)
        self.default_scope = ALL
        self.seen: dict[Site, torch.Tensor] = {}

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        self.seen[site] = h.detach().clone()
        return h

    def hyperparameters(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        self.sites = list(sites)


def _text_config(model: nn.Module) -> Any:
    return model.config.get_text_config()


def _ids(lm: Any, text: str = TEXT) -> torch.Tensor:
    return lm.tokenizer(text, return_tensors="pt")["input_ids"]


# --- discovery -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_find_layers_shapes(arch: str) -> None:
    lm = tiny_model(arch)
    cfg = _text_config(lm.model)
    layers = find_layers(lm.model)
    assert layers.num_layers == cfg.num_hidden_layers == 2
    assert layers.hidden_size == 32
    assert len(layers.block_names) == 2
    for name, block in zip(layers.block_names, layers.blocks, strict=True):
        assert lm.model.get_submodule(name) is block
    # The attention output projection, with the config's heads and the real head width.
    assert layers.attn_out is not None and layers.attn_out_names is not None
    assert layers.n_heads == cfg.num_attention_heads == 4
    expected_head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // 4
    assert layers.head_dim == expected_head_dim
    for name, module in zip(layers.attn_out_names, layers.attn_out, strict=True):
        assert lm.model.get_submodule(name) is module
        assert name.rsplit(".", 1)[-1] in ("o_proj", "c_proj", "dense")
        assert "attn" in name or "attention" in name
    assert layers.width(Site("heads", 0)) == layers.n_heads * layers.head_dim
    assert layers.width(Site("resid_post", 0)) == 32
    assert lm.info.num_layers == 2 and lm.info.hidden_size == 32


def test_head_dim_differs_from_hidden_over_heads() -> None:
    # Qwen3 is built with head_dim 16, 4 heads, hidden 32: the heads site is 64 wide.
    layers = find_layers(tiny_model("qwen3").model)
    assert layers.head_dim == 16
    assert layers.width(Site("heads", 1)) == 64


def test_gpt2_attention_projection_not_mlp() -> None:
    # GPT-2 has c_proj in both attn and mlp; the attention one must be chosen.
    layers = find_layers(tiny_model("gpt2").model)
    assert layers.attn_out_names == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]


# --- what the hooks see ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_resid_sites_match_hidden_states(arch: str) -> None:
    """resid_pre.L is hidden_states[L] (the input of block L) and resid_post.L that of L+1.

    The last entry of ``hidden_states`` may have the final norm applied, so it is not used.
    """
    # A fresh model: output_hidden_states installs transformers' own capture hooks for good.
    lm = build_tiny_model(arch)
    ids = _ids(lm)
    with torch.no_grad():
        hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    n = find_layers(lm.model).num_layers
    assert len(hs) == n + 1
    for layer in range(n):
        pre = token_activations(lm, TEXT, f"resid_pre.{layer}")
        torch.testing.assert_close(pre, hs[layer][0], rtol=0, atol=0)
    torch.testing.assert_close(
        token_activations(lm, TEXT, "resid_post.0"), hs[1][0], rtol=0, atol=0
    )


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_runtime_hooks_see_block_input_and_output(arch: str) -> None:
    """The steering runtime hands a controller the block input / output / o_proj input."""
    lm = tiny_model(arch)
    layers = find_layers(lm.model)
    ids = _ids(lm)
    direct: dict[str, torch.Tensor] = {}

    def pre(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            direct[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return hook

    def post(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            direct[name] = (out if isinstance(out, torch.Tensor) else out[0]).detach().clone()

        return hook

    handles = [
        layers.blocks[1].register_forward_pre_hook(pre("resid_pre.1"), with_kwargs=True),
        layers.blocks[1].register_forward_hook(post("resid_post.1")),
        layers.attn_out[1].register_forward_pre_hook(pre("heads.1"), with_kwargs=True),
    ]
    rec = Recorder([Site("resid_pre", 1), Site("resid_post", 1), Site("heads", 1)])
    try:
        with torch.no_grad(), steering(lm, Steer(rec, 1.0)):
            lm.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    assert set(rec.seen) == {Site("resid_pre", 1), Site("resid_post", 1), Site("heads", 1)}
    for site, t in rec.seen.items():
        assert torch.equal(t, direct[str(site)]), site
    assert rec.seen[Site("heads", 1)].shape[-1] == layers.n_heads * layers.head_dim
    assert rec.seen[Site("resid_post", 1)].shape[-1] == layers.hidden_size


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text", "falcon"])
def test_resid_pre_next_equals_resid_post_prev(arch: str) -> None:
    """Adding v at resid_pre.1 is the same as adding it at resid_post.0 (same tensor)."""
    lm = tiny_model(arch)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    a = CAA(layers=[1], site="resid_pre", scope="all")
    a.set_vectors({Site("resid_pre", 1): v})
    b = CAA(layers=[0], scope="all")
    b.set_vectors({Site("resid_post", 0): v})
    ids = _ids(lm)
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        with steering(lm, Steer(a, 2.0)):
            la = lm.model(input_ids=ids).logits
        with steering(lm, Steer(b, 2.0)):
            lb = lm.model(input_ids=ids).logits
    assert torch.equal(la, lb)
    assert not torch.allclose(la, base)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_heads_site_is_before_output_projection(arch: str) -> None:
    """A change d at the heads site changes the attention output by W_o d, nothing more."""
    lm = tiny_model(arch)
    layers = find_layers(lm.model)
    width = layers.width(Site("heads", 1))
    d = torch.zeros(width)
    d[layers.head_dim : 2 * layers.head_dim] = 1.0  # head 1 only
    c = CAA(layers=[1], scope="all")
    c.set_vectors({Site("heads", 1): d})
    got: dict[str, torch.Tensor] = {}

    def grab(key: str) -> Any:
        def hook(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            got[key] = out.detach().clone()

        return hook

    ids = _ids(lm)
    proj = layers.attn_out[1]
    h = proj.register_forward_hook(grab("base"))
    with torch.no_grad():
        lm.model(input_ids=ids)
    h.remove()
    h = proj.register_forward_hook(grab("steered"))
    try:
        with torch.no_grad(), steering(lm, Steer(c, 1.0)):
            lm.model(input_ids=ids)
    finally:
        h.remove()
    weight = proj.weight.detach()
    # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out).
    delta = weight @ d if isinstance(proj, nn.Linear) else d @ weight
    torch.testing.assert_close(got["steered"] - got["base"], delta.expand_as(got["base"]),
                               atol=1e-5, rtol=1e-5)


# --- overrides and errors --------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mixer = nn.Module()
        self.mixer.qkv = nn.Linear(d, 3 * d)
        self.mixer.proj_out = nn.Linear(d, d)
        self.ff = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(x) + self.mixer.proj_out(x)


class _Unusual(nn.Module):
    """A custom model: two lists of blocks, and an attention output with an unusual name."""

    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=d, num_attention_heads=4, num_hidden_layers=n)
        self.trunk = nn.ModuleList([_Block(d) for _ in range(n)])
        self.side = nn.ModuleList([_Block(d) for _ in range(n + 2)])


def test_unknown_layout_message_names_blocks_override() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    with pytest.raises(SiteError, match=r"blocks="):
        find_layers(Plain())


def test_discovery_prefers_config_layer_count_and_overrides() -> None:
    model = _Unusual()
    found = find_layers(model)
    # The list whose length equals num_hidden_layers wins over the longer one.
    assert found.block_names[0] == "trunk.0" and found.num_layers == 3
    # proj_out under "mixer" is not a recognised attention projection.
    assert found.attn_out is None
    with pytest.raises(SiteError, match="attn_out="):
        found.resolve("heads.0")
    # Naming the modules by hand.
    custom = find_layers(model, blocks="side", attn_out="mixer.proj_out")
    assert custom.num_layers == 5
    assert custom.blocks[4] is model.side[4]
    assert custom.attn_out is not None and custom.attn_out[2] is model.side[2].mixer.proj_out
    assert custom.attn_out_names is not None and custom.attn_out_names[0] == "side.0.mixer.proj_out"
    assert custom.n_heads == 4 and custom.head_dim == 4
    assert custom.resolve("heads.-1") == Site("heads", 4)


def test_overrides_on_a_transformers_model() -> None:
    lm = tiny_model("llama")
    auto = find_layers(lm.model)
    manual = find_layers(lm.model, blocks="model.layers", attn_out="self_attn.o_proj")
    assert manual.block_names == auto.block_names
    assert manual.attn_out_names == auto.attn_out_names
    assert (manual.n_heads, manual.head_dim) == (auto.n_heads, auto.head_dim)
    with pytest.raises(SiteError, match="no module named"):
        find_layers(lm.model, blocks="model.nope")
    with pytest.raises(SiteError, match=r"not an nn\.ModuleList"):
        find_layers(lm.model, blocks="model.embed_tokens")
    with pytest.raises(SiteError, match="no module named"):
        find_layers(lm.model, attn_out="self_attn.nope")


def test_layer_index_handling() -> None:
    layers: LayerMap = find_layers(tiny_model("llama").model)
    assert layers.resolve("resid_post.-1") == Site("resid_post", 1)
    assert layers.resolve("resid_pre.-2") == Site("resid_pre", 0)
    assert layers.resolve(Site("heads", 1)) == Site("heads", 1)
    for bad in ("resid_post.2", "resid_post.-3", "heads.7"):
        with pytest.raises(SiteError, match="out of range"):
            layers.resolve(bad)
    with pytest.raises(SiteError, match=r"0\.\.1"):
        layers.resolve("resid_pre.99")


def test_site_parsing() -> None:
    assert Site.parse("resid_post.12") == Site("resid_post", 12)
    assert Site.parse(" heads.3 ") == Site("heads", 3)
    assert Site.parse("resid_pre.-1") == Site("resid_pre", -1)
    assert str(Site("resid_pre", 4)) == "resid_pre.4"
    s = Site("heads", 2)
    assert Site.parse(s) is s
    assert sorted([Site("resid_post", 1), Site("heads", 0)])[0] == Site("heads", 0)
    assert set(SITE_KINDS) == {"resid_pre", "resid_post", "heads"}
    for bad in ("resid_post", "resid_post.", "resid_post.x", "12", "", "resid post.1",
                "resid_post.1.2"):
        with pytest.raises(SiteError, match="cannot parse"):
            Site.parse(bad)
    with pytest.raises(SiteError, match="unknown site kind"):
        Site.parse("mlp_out.3")
    with pytest.raises(SiteError, match="unknown site kind"):
        Site("attn", 0)  # type: ignore[arg-type]
    with pytest.raises(SiteError):
        find_layers(tiny_model("llama").model).resolve("embed.0")
