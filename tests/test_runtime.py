"""The steering runtime's semantics (docs: "Semantics that must hold everywhere").

Absolute positions (KV cache on/off, left padding), per-row controllers, hooks that never
outlive their context, and clear errors on bad input, on tiny random models.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from steerlab.errors import SiteError, SteeringError
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.caa import CAA
from steerlab.models import LoadedModel, ModelInfo
from steerlab.runtime import Steer, generate, steering
from steerlab.scope import ALL, GENERATED, LAST, TokenScope, parse_scope
from steerlab.sites import Site, find_layers
from tiny_models import build_tiny_model, tiny_model

ARCHS = ["llama", "gemma3_text", "gpt2", "qwen2", "falcon"]
SCOPES = ["last", "all", "generated", "from:2", "from:-1"]
# Different lengths, so the batch is left-padded (1, 8 and 13 tokens after <bos>).
PROMPTS = ["the cat sat on", "I", "in the house there"]
NEW_TOKENS = 6
STRENGTH = 4.0

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def caa(layer: int = 1, seed: int = 0, d: int = 32, scope: str = "last") -> CAA:
    """A CAA controller with a random unit-variance vector set by hand (no fitting)."""
    c = CAA(layers=[layer], scope=scope)
    g = torch.Generator().manual_seed(seed)
    c.set_vectors({Site("resid_post", layer): torch.randn(d, generator=g)})
    return c


def encode(lm: LoadedModel, prompts: list[str]) -> dict[str, torch.Tensor]:
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def trim(ids: list[int], eos: int) -> list[int]:
    """Generated ids up to and including the first EOS (what follows is padding)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def gen_ids(
    lm: LoadedModel,
    prompts: list[str],
    *,
    steers: Any = None,
    rows: Any = None,
    use_cache: bool = True,
    steer: bool = True,
) -> list[list[int]]:
    """Greedy generation; ``steer=False`` runs with no steering context at all."""
    enc = encode(lm, prompts)
    kw = {
        "max_new_tokens": NEW_TOKENS, "do_sample": False, "use_cache": use_cache,
        "temperature": None, "top_p": None, "top_k": None,
    }
    with torch.no_grad():
        if steer:
            with steering(lm, steers, rows=rows):
                out = lm.model.generate(**enc, **kw)
        else:
            out = lm.model.generate(**enc, **kw)
    eos = lm.tokenizer.eos_token_id
    return [trim(r, eos) for r in out[:, enc["input_ids"].shape[1] :].tolist()]


def forward_logits(lm: LoadedModel, prompts: list[str]) -> torch.Tensor:
    """Logits of one forward pass over a left-padded batch (position ids skip padding)."""
    enc = encode(lm, prompts)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return lm.model(**enc, position_ids=pos).logits


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
    )


# --- 1 and 2: absolute positions ---------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scope", SCOPES)
def test_kv_cache_and_padding_do_not_change_steered_generation(arch: str, scope: str) -> None:
    lm = tiny_model(arch)
    st = Steer(caa(), STRENGTH, scope)
    cached = gen_ids(lm, PROMPTS, steers=st, use_cache=True)
    uncached = gen_ids(lm, PROMPTS, steers=st, use_cache=False)
    plain = gen_ids(lm, PROMPTS, steer=False)
    # Steering is strong enough to matter, so the comparisons below can fail.
    assert cached != plain
    # 1. With and without KV cache, the same tokens.
    assert cached == uncached
    # 2. Each row of the padded batch equals that prompt steered alone (no padding, and
    # then no attention mask at all in transformers >= 5), cached and uncached.
    for i, prompt in enumerate(PROMPTS):
        assert gen_ids(lm, [prompt], steers=st)[0] == cached[i], (i, prompt)
        assert gen_ids(lm, [prompt], steers=st, use_cache=False)[0] == cached[i], (i, prompt)


def test_generated_scope_leaves_first_token_alone() -> None:
    # The first new token comes from the last prompt position, which "generated" does not
    # steer; "last" does.
    lm = tiny_model("llama")
    plain = gen_ids(lm, PROMPTS, steer=False)
    gen = gen_ids(lm, PROMPTS, steers=Steer(caa(), STRENGTH, "generated"))
    last = gen_ids(lm, PROMPTS, steers=Steer(caa(), STRENGTH, "last"))
    assert [r[0] for r in gen] == [r[0] for r in plain]
    assert [r[0] for r in last] != [r[0] for r in plain]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_is_never_steered(arch: str) -> None:
    """Scope "all": padded positions keep their unsteered block output, bit for bit."""
    lm = tiny_model(arch)
    block = find_layers(lm.model).blocks[1]
    outs: list[torch.Tensor] = []

    def run() -> None:
        # Registered after steering's own hook, so it sees the steered output.
        h = block.register_forward_hook(
            lambda m, a, o: outs.append((o if isinstance(o, torch.Tensor) else o[0]).clone())
        )
        try:
            forward_logits(lm, PROMPTS)
        finally:
            h.remove()

    run()
    with steering(lm, Steer(caa(), STRENGTH, "all")):
        run()
    base, steered = outs
    mask = encode(lm, PROMPTS)["attention_mask"].bool()
    assert (~mask).any()
    assert torch.equal(base[~mask], steered[~mask])
    assert not torch.isclose(base[mask], steered[mask]).all(dim=-1).any()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_steered_forward_row_equals_row_alone(arch: str) -> None:
    lm = tiny_model(arch)
    for scope in SCOPES:
        st = Steer(caa(), STRENGTH, scope)
        with steering(lm, st):
            batch = forward_logits(lm, PROMPTS)
        mask = encode(lm, PROMPTS)["attention_mask"].bool()
        for i, prompt in enumerate(PROMPTS):
            with steering(lm, st):
                alone = forward_logits(lm, [prompt])[0]
            # Padded vs unpadded eager attention differs by float noise only.
            torch.testing.assert_close(batch[i][mask[i]], alone, atol=1e-4, rtol=1e-4)


def test_positional_attention_mask_is_read() -> None:
    """A mask given positionally (model(ids, mask)) is seen: padding is not steered."""
    lm = tiny_model("llama")
    enc = encode(lm, PROMPTS)
    st = Steer(caa(), STRENGTH, "all")
    with torch.no_grad():
        with steering(lm, st):
            by_name = lm.model(input_ids=enc["input_ids"],
                               attention_mask=enc["attention_mask"]).logits
        with steering(lm, st):
            positional = lm.model(enc["input_ids"], enc["attention_mask"]).logits
    assert torch.equal(by_name, positional)


def test_prompt_len_override() -> None:
    # Declaring a longer prompt than the first forward moves "generated" later.
    lm = tiny_model("llama")
    enc = encode(lm, ["the cat sat on"])
    n = int(enc["attention_mask"].sum())
    with torch.no_grad():
        base = lm.model(**enc).logits
        with steering(lm, Steer(caa(), STRENGTH, "generated"), prompt_len=[n - 2]):
            steered = lm.model(**enc).logits
    assert torch.equal(steered[0, : n - 2], base[0, : n - 2])
    assert not torch.allclose(steered[0, n - 2 :], base[0, n - 2 :])
    with pytest.raises(SteeringError, match="prompt_len"), steering(
        lm, Steer(caa(), 1.0), prompt_len=[3, 4]
    ):
        lm.model(**enc)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_hidden_states_see_the_steered_block_output(arch: str) -> None:
    """transformers >= 5 captures hidden states with hooks it installs on first use and
    keeps; whichever came first, hidden_states[L + 1] is the steered output of block L."""
    c = CAA(layers=[0], scope="all")
    c.set_vectors({Site("resid_post", 0): torch.full((32,), 3.0)})
    ids = encode(tiny_model(arch), ["hello there"])["input_ids"]
    results = []
    for capture_first in (True, False):
        lm = build_tiny_model(arch)
        with torch.no_grad():
            if capture_first:
                base = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
            with steering(lm, Steer(c, 1.0)):
                steered = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
            if not capture_first:
                base = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(steered[1], base[1] + 3.0)
        torch.testing.assert_close(steered[0], base[0], rtol=0, atol=0)
        results.append(steered[1])
    assert torch.equal(results[0], results[1])


# --- 3: rows are independent ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_per_row_controllers(arch: str) -> None:
    lm = tiny_model(arch)
    c1, c2 = caa(seed=1), caa(seed=2)
    prompts = [*PROMPTS, "the end"]
    rows = [
        [Steer(c1, STRENGTH)],
        None,  # no controller: bit-identical to unsteered
        [Steer(c2, -STRENGTH), Steer(c1, 1.5)],
        [Steer(c1, 0.0)],  # strength 0: also identical
    ]
    base = forward_logits(lm, prompts)
    with steering(lm, rows=rows):
        mixed = forward_logits(lm, prompts)
    assert torch.equal(mixed[1], base[1])
    assert torch.equal(mixed[3], base[3])
    assert not torch.allclose(mixed[0], base[0])
    # A steered row equals the same batch with that row's controllers on every row.
    with steering(lm, Steer(c1, STRENGTH)):
        all_c1 = forward_logits(lm, prompts)
    assert torch.equal(mixed[0], all_c1[0])
    with steering(lm, [Steer(c2, -STRENGTH), Steer(c1, 1.5)]):
        all_c2 = forward_logits(lm, prompts)
    torch.testing.assert_close(mixed[2], all_c2[2], atol=1e-6, rtol=0)

    # In generation too.
    plain = gen_ids(lm, prompts, steer=False)
    gen = gen_ids(lm, prompts, rows=rows)
    assert gen[1] == plain[1] and gen[3] == plain[3]
    assert gen[0] == gen_ids(lm, prompts, steers=Steer(c1, STRENGTH))[0]
    assert gen[0] != plain[0]
    # No state leaks: unsteered generation afterwards is the plain one.
    assert gen_ids(lm, prompts, steer=False) == plain
    assert gen_ids(lm, prompts, steers=None) == plain


def test_same_controller_twice_on_a_row_adds_up() -> None:
    lm = tiny_model("llama")
    c = caa()
    with steering(lm, rows=[[Steer(c, 1.5), Steer(c, 2.5)], [Steer(c, 4.0)]]):
        twice = forward_logits(lm, PROMPTS[:2])
    with steering(lm, Steer(c, 4.0)):
        once = forward_logits(lm, PROMPTS[:2])
    assert torch.equal(twice, once)


def test_generate_helper_per_row_and_rendering() -> None:
    lm = tiny_model("llama")
    c = caa()
    plain = generate(lm, PROMPTS, max_new_tokens=5)
    steered = generate(lm, PROMPTS, steers=Steer(c, STRENGTH), max_new_tokens=5)
    mixed = generate(lm, PROMPTS, rows=[Steer(c, STRENGTH), None, [Steer(c, STRENGTH)]],
                     max_new_tokens=5, batch_size=2)
    assert mixed[1] == plain[1]
    assert mixed[0] == steered[0] and mixed[2] == steered[2]
    assert steered != plain
    assert generate(lm, PROMPTS, steers=Steer(c, STRENGTH), max_new_tokens=5,
                    use_cache=False) == steered
    # A chat-template tokenizer: rendered prompts, still per-row exact.
    chat = tiny_model("llama", chat=True)
    assert chat.info.is_chat
    cp = generate(chat, PROMPTS, max_new_tokens=5)
    cm = generate(chat, PROMPTS, rows=[None, Steer(c, STRENGTH), None], max_new_tokens=5)
    assert cm[0] == cp[0] and cm[2] == cp[2] and cm[1] != cp[1]


# --- 4: hooks never outlive their context ---------------------------------------------------


class Exploding(CAA):
    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        raise RuntimeError("boom")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooks_removed_on_exit_and_on_error(arch: str) -> None:
    lm = tiny_model(arch)
    before = hook_count(lm.model)
    ctx = steering(lm, [Steer(caa(0), 1.0), Steer(caa(1), 1.0)])
    with ctx:
        assert hook_count(lm.model) == before + 3  # the model and two blocks
        forward_logits(lm, PROMPTS)
    assert hook_count(lm.model) == before

    with pytest.raises(RuntimeError, match="body"), ctx:
        raise RuntimeError("body")
    assert hook_count(lm.model) == before

    boom = Exploding(layers=[1])
    boom.set_vectors({Site("resid_post", 1): torch.ones(32)})
    with pytest.raises(RuntimeError, match="boom"):
        gen_ids(lm, PROMPTS, steers=Steer(boom, 1.0))
    assert hook_count(lm.model) == before

    # A per-row mismatch raises inside the model's forward; hooks still go.
    with pytest.raises(SteeringError, match="per-row"):
        gen_ids(lm, PROMPTS, rows=[Steer(caa(), 1.0)] * 2)
    assert hook_count(lm.model) == before

    # A wrong-width vector is only noticed at run time; hooks still go.
    wide = CAA(layers=[1])
    wide.set_vectors({Site("resid_post", 1): torch.ones(48)})
    with pytest.raises(SteeringError, match="width"):
        gen_ids(lm, PROMPTS, steers=Steer(wide, 1.0))
    assert hook_count(lm.model) == before


def test_context_can_be_reentered_but_not_nested() -> None:
    lm = tiny_model("llama")
    ctx = steering(lm, Steer(caa(), STRENGTH))
    with ctx:
        first = forward_logits(lm, PROMPTS)
    with ctx:
        second = forward_logits(lm, PROMPTS)
        with pytest.raises(SteeringError, match="already active"), ctx:
            pass
        # The failed nested entry left the active context's hooks in place.
        third = forward_logits(lm, PROMPTS)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert torch.equal(forward_logits(lm, PROMPTS), forward_logits(lm, PROMPTS))
    assert not torch.allclose(forward_logits(lm, PROMPTS), first)


# --- 5: bad input ------------------------------------------------------------------------


def test_bad_input_errors() -> None:
    lm = tiny_model("llama")
    c = caa()
    for bad in (math.nan, math.inf, -math.inf, "strong", None):
        with pytest.raises(SteeringError, match="strength"):
            steering(lm, Steer(c, bad))  # type: ignore[arg-type]
    with pytest.raises(SteeringError, match="strength"):
        steering(lm, rows=[Steer(c, 1.0), Steer(c, math.nan)])
    for scope in ("everything", "from:", "from:x", "from:1.5", ""):
        with pytest.raises(SteeringError, match="token scope"):
            steering(lm, Steer(c, 1.0, scope))
    with pytest.raises(SteeringError, match="token scope"):
        CAA(layers=[1], scope="sometimes")
    with pytest.raises(SteeringError, match="token scope"):
        TokenScope("some")  # type: ignore[arg-type]
    with pytest.raises(SteeringError, match="not both"):
        steering(lm, Steer(c, 1.0), rows=[None])
    with pytest.raises(SteeringError, match="Steer objects"):
        steering(lm, [c])  # type: ignore[list-item]
    # Per-row count mismatch with the batch.
    with pytest.raises(SteeringError, match="rows"), steering(lm, rows=[Steer(c, 1.0)] * 2):
        forward_logits(lm, PROMPTS)
    with pytest.raises(SteeringError, match="rows"):
        generate(lm, PROMPTS, rows=[None], max_new_tokens=2)
    # A controller fitted on a model of another hidden size.
    other = caa()
    other.model_info = ModelInfo("big-model", "LlamaForCausalLM", 64, 2, False)
    with pytest.raises(SteeringError, match=r"big-model.*64.*32"):
        steering(lm, Steer(other, 1.0))
    # Layer out of range.
    far = CAA(layers=[5])
    far.set_vectors({Site("resid_post", 5): torch.ones(32)})
    with pytest.raises(SiteError, match="out of range"):
        steering(lm, Steer(far, 1.0))
    # Unfitted.
    with pytest.raises(SteeringError, match="not fitted"):
        steering(lm, Steer(CAA(layers=[1]), 1.0))
    with pytest.raises(SteeringError, match="max_new_tokens"):
        generate(lm, PROMPTS, max_new_tokens=0)
    with pytest.raises(SteeringError, match="non-finite"):
        caa().set_vectors({Site("resid_post", 1): torch.full((32,), math.nan)})


def test_negative_layer_controller() -> None:
    lm = tiny_model("llama")
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    neg = CAA(layers=[-1])
    neg.set_vectors({Site("resid_post", -1): v})
    pos = CAA(layers=[1])
    pos.set_vectors({Site("resid_post", 1): v})
    with steering(lm, Steer(neg, STRENGTH)):
        a = forward_logits(lm, PROMPTS)
    with steering(lm, Steer(pos, STRENGTH)):
        b = forward_logits(lm, PROMPTS)
    assert torch.equal(a, b)


class BlockInputFeedback(Controller):
    """A closed-loop toy: adds strength x (block input) to the block output, both named with
    negative layers, which the runtime must hand back under the controller's own names."""

    method = "feedback"

    def __init__(self) -> None:
        super().__init__()
        self.sites = [Site("resid_post", -1)]
        self.default_scope = ALL
        self.seen: list[Site] = []

    @property
    def read_sites(self) -> list[Site]:
        return [Site("resid_pre", -1)]

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        self.seen.append(site)
        return h + strength[:, None, None] * ctx.reads[Site("resid_pre", -1)]

    def hyperparameters(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        pass


def test_read_sites_reach_the_controller() -> None:
    lm = tiny_model("llama")
    block = find_layers(lm.model).blocks[1]
    got: dict[str, torch.Tensor] = {}
    h1 = block.register_forward_pre_hook(lambda m, a: got.__setitem__("in", a[0].clone()))
    h2 = block.register_forward_hook(lambda m, a, o: got.__setitem__("out", o.clone()))
    try:
        forward_logits(lm, PROMPTS)
    finally:
        h1.remove()
        h2.remove()
    c = BlockInputFeedback()
    outs: list[torch.Tensor] = []
    with steering(lm, rows=[Steer(c, 0.5), None, Steer(c, -1.0)]):
        h3 = block.register_forward_hook(lambda m, a, o: outs.append(o.clone()))
        try:
            forward_logits(lm, PROMPTS)
        finally:
            h3.remove()
    assert c.seen == [Site("resid_post", -1)]
    mask = encode(lm, PROMPTS)["attention_mask"].bool()
    expected = got["out"].clone()
    for r, k in ((0, 0.5), (2, -1.0)):
        expected[r][mask[r]] += k * got["in"][r][mask[r]]
    torch.testing.assert_close(outs[0], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(outs[0][1], got["out"][1])


def test_bare_module_and_fresh_model() -> None:
    # steering accepts a bare transformers model; a second instance is unaffected.
    lm = build_tiny_model("qwen2", seed=5)
    other = build_tiny_model("qwen2", seed=5)
    with steering(lm.model, Steer(caa(), STRENGTH)):
        a = forward_logits(lm, PROMPTS)
        b = forward_logits(other, PROMPTS)
    assert torch.equal(b, forward_logits(lm, PROMPTS))
    assert not torch.allclose(a, b)


# --- 6: scope masks ---------------------------------------------------------------------------


def _mask(scope: str | TokenScope, positions: list[list[int]], prompt_len: list[int]) -> list:
    return (
        parse_scope(scope)
        .mask(torch.tensor(positions), torch.tensor(prompt_len))
        .int()
        .tolist()
    )


def test_scope_masks_on_a_padded_prefill() -> None:
    # Row 0: two padding tokens then a 4-token prompt; row 1: a 6-token prompt.
    pos = [[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    pl = [4, 6]
    assert _mask("all", pos, pl) == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert _mask("last", pos, pl) == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]]
    assert _mask("generated", pos, pl) == [[0] * 6, [0] * 6]
    assert _mask("from:2", pos, pl) == [[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert _mask("from:0", pos, pl) == _mask("all", pos, pl)
    assert _mask("from:-1", pos, pl) == _mask("last", pos, pl)
    assert _mask("from:-3", pos, pl) == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert _mask("from:99", pos, pl) == [[0] * 6, [0] * 6]


def test_scope_masks_on_decode_steps_and_full_recompute() -> None:
    # A cached decode step: one token per row at absolute positions 4 and 6.
    step = [[4], [6]]
    pl = [4, 6]
    for scope in ("all", "last", "generated", "from:-1", "from:3"):
        assert _mask(scope, step, pl) == [[1], [1]], scope
    assert _mask("from:5", step, pl) == [[0], [1]]
    # Uncached: the whole sequence again; the same positions are selected as in prefill +
    # decode, which is why cached and uncached generation agree.
    full = [[-1, -1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
    assert _mask("generated", full, pl) == [[0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1]]
    assert _mask("last", full, pl) == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1]]


def test_parse_scope() -> None:
    assert parse_scope("last") is not None and parse_scope("last") == LAST
    assert parse_scope(" ALL ") == ALL
    assert parse_scope("generated") == GENERATED
    assert parse_scope("from:-1") == TokenScope("from", -1)
    assert parse_scope("from:7") == TokenScope("from", 7)
    assert parse_scope(ALL) is ALL
    assert str(TokenScope("from", -2)) == "from:-2" and str(LAST) == "last"
    assert Steer(caa(scope="from:-1"), 1.0).resolved_scope() == TokenScope("from", -1)
    assert Steer(caa(), 1.0, "all").resolved_scope() == ALL
