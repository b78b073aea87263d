"""Last-token block Jacobians: the fast one-token method against the full-sequence reference,
against finite differences through the real model, and their errors."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from steerlab.control.jacobians import (
    JacobianError,
    block_function,
    block_jacobians,
    encode_prompt,
)
from steerlab.errors import SiteError, SteerlabError
from steerlab.models import LoadedModel, wrap_model
from steerlab.sites import find_layers, get_input, get_output, set_input, set_output
from tiny_models import ARCHS, build_tiny_model, tiny_config, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TEXTS = [
    "the cat sat on the mat in the sun",
    "I like the weather here a lot",
    "where is it now?",
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def tiny_with(arch: str, *, attn: str = "eager", num_layers: int = 3, **overrides: Any
              ) -> LoadedModel:
    config = tiny_config(arch, num_layers=num_layers)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn,
                                             dtype=torch.float32)
    return wrap_model(model, tiny_tokenizer(), model_id=f"tiny-{arch}-{attn}")


# --- fast == reference -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fast_matches_reference(arch: str) -> None:
    lm = tiny_model(arch)
    fast = block_jacobians(lm, TEXTS, keep_per_prompt=True, progress=False)
    ref = block_jacobians(lm, TEXTS, method="reference", keep_per_prompt=True, progress=False)
    assert fast.layers == ref.layers == [0, 1]
    assert fast.A.shape == (2, 32, 32) and fast.A.dtype == torch.float32
    assert fast.per_prompt is not None and ref.per_prompt is not None
    for p in range(len(TEXTS)):
        for i in range(2):
            assert rel(fast.per_prompt[p, i], ref.per_prompt[p, i]) < 1e-5, (arch, p, i)
    for i in range(2):
        assert rel(fast.A[i], ref.A[i]) < 1e-5
    torch.testing.assert_close(fast.A, fast.per_prompt.mean(0), rtol=1e-6, atol=1e-6)
    # Not a trivial map: the block is neither the identity nor the same for every prompt.
    eye = torch.eye(32)
    assert rel(fast.A[0], eye) > 1e-2
    assert rel(fast.per_prompt[0, 0], fast.per_prompt[1, 0]) > 1e-3


@pytest.mark.parametrize(
    ("arch", "attn", "overrides"),
    [
        # contexts longer than the sliding window: the cache keeps only the window
        ("mistral", "eager", {"sliding_window": 4}),
        ("gemma3_text", "eager", {"sliding_window": 4,
                                  "layer_types": ["sliding_attention", "full_attention",
                                                  "sliding_attention"]}),
        ("llama", "sdpa", {}),
        ("gpt2", "sdpa", {}),
    ],
)
def test_fast_matches_reference_sliding_and_sdpa(arch: str, attn: str,
                                                 overrides: dict[str, Any]) -> None:
    lm = tiny_with(arch, attn=attn, **overrides)
    layers = [0, 1, 2]
    ref = block_jacobians(lm, TEXTS[:2], layers=layers, method="reference", progress=False)
    for mode in ("rev", "fwd"):
        fast = block_jacobians(lm, TEXTS[:2], layers=layers, jac_mode=mode, progress=False)
        for i in range(3):
            assert rel(fast.A[i], ref.A[i]) < 1e-5, (mode, i)


def test_jac_modes_and_chunks_agree() -> None:
    lm = tiny_model("llama")
    base = block_jacobians(lm, TEXTS[:1], progress=False)
    for mode, chunk in (("fwd", None), ("rev", 7), ("fwd", 5)):
        other = block_jacobians(lm, TEXTS[:1], jac_mode=mode,  # type: ignore[arg-type]
                                chunk_size=chunk, progress=False)
        assert rel(other.A, base.A) < 1e-5


def test_layer_selection_negative_and_sorted() -> None:
    lm = tiny_model("qwen2")
    full = block_jacobians(lm, TEXTS[:2], progress=False)
    sub = block_jacobians(lm, TEXTS[:2], layers=[-1, 0, 1], progress=False)
    assert sub.layers == [0, 1]
    torch.testing.assert_close(sub.A, full.A)
    one = block_jacobians(lm, TEXTS[:2], layers=[-1], progress=False)
    assert one.layers == [1]
    torch.testing.assert_close(one.A[0], full.A[1])


# --- f_k is the true block function --------------------------------------------------------------


def _full_forward_io(lm: LoadedModel, ids: torch.Tensor, layer: int,
                     delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``layer``'s last input and output rows in a plain full forward (no cache), with
    ``delta`` added to the block's last input row."""
    block = find_layers(lm.model).blocks[layer]
    got: dict[str, torch.Tensor] = {}

    def pre(mod: Any, args: Any, kwargs: Any) -> Any:
        h = get_input(args, kwargs)
        got["in"] = h[0, -1].clone()
        if delta is None:
            return None
        h = h.clone()
        h[0, -1] += delta
        return set_input(args, kwargs, h)

    def post(mod: Any, args: Any, output: Any) -> Any:
        got["out"] = get_output(output)[0, -1].clone()
        return set_output(output, get_output(output))

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True),
               block.register_forward_hook(post)]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got["in"], got["out"]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2", "gpt2", "falcon", "phi3"])
def test_block_function_is_the_block(arch: str) -> None:
    lm = tiny_model(arch)
    ids, _ = encode_prompt(lm, TEXTS[0], max_tokens=24, rendered=True)
    for layer in (0, 1):
        f, z = block_function(lm, TEXTS[0], layer)
        z_full, out_full = _full_forward_io(lm, ids, layer)
        torch.testing.assert_close(z, z_full, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(f(z), out_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_jacobian_matches_finite_differences_of_the_model(arch: str) -> None:
    """Central differences through the real model's full forward, perturbing only the last
    row of the block input: independent of both methods."""
    lm = tiny_model(arch)
    ids, _ = encode_prompt(lm, TEXTS[1], max_tokens=24, rendered=True)
    res = block_jacobians(lm, [TEXTS[1]], progress=False)
    gen = torch.Generator().manual_seed(1)
    for i, layer in enumerate(res.layers):
        z, _ = _full_forward_io(lm, ids, layer)
        v = torch.randn(32, generator=gen)
        v = v * (1e-3 * z.norm() / v.norm())  # a step of 1e-3 relative to the state
        _, up = _full_forward_io(lm, ids, layer, v)
        _, down = _full_forward_io(lm, ids, layer, -v)
        fd = (up - down) / 2
        assert rel(res.A[i] @ v, fd) < 1e-3, (arch, layer)


def test_linearisation_residual_with_block_function() -> None:
    lm = tiny_model("llama")
    f, z = block_function(lm, TEXTS[0], 1)
    res = block_jacobians(lm, [TEXTS[0]], layers=[1], progress=False)
    delta = 1e-3 * torch.randn(32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        resid = f(z + delta) - f(z) - res.A[0] @ delta
    assert float(resid.norm()) < 1e-2 * float((res.A[0] @ delta).norm())


# --- prompts: truncation, special tokens ----------------------------------------------------


def test_max_tokens_truncation() -> None:
    lm = tiny_model("llama")
    long_text = "the weather in the south is warm and the rain comes in the spring " * 2
    n_full = len(lm.tokenizer(long_text)["input_ids"])
    assert n_full > 8
    res = block_jacobians(lm, [long_text, "hi there"], max_tokens=8, keep_per_prompt=True,
                          progress=False)
    assert res.n_tokens == [8, len(lm.tokenizer("hi there")["input_ids"])]
    assert res.n_truncated == 1 and res.max_tokens == 8
    ref = block_jacobians(lm, [long_text], max_tokens=8, method="reference", progress=False)
    assert rel(res.per_prompt[0], ref.A) < 1e-5  # type: ignore[index]
    # The operating point is the 8th token of the untruncated prompt (attention is causal).
    ids, cut = encode_prompt(lm, long_text, max_tokens=8, rendered=True)
    assert cut and ids.shape == (1, 8)
    full_ids, _ = encode_prompt(lm, long_text, max_tokens=10_000, rendered=True)
    _, z = block_function(lm, long_text, 0, max_tokens=8)
    block = find_layers(lm.model).blocks[0]
    got: dict[str, torch.Tensor] = {}
    handle = block.register_forward_pre_hook(
        lambda m, a, k: got.__setitem__("h", get_input(a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            lm.model(input_ids=full_ids, use_cache=False)
    finally:
        handle.remove()
    torch.testing.assert_close(z, got["h"][0, 7], rtol=1e-5, atol=1e-6)


def test_rendered_controls_special_tokens() -> None:
    chat = tiny_model("llama", chat=True)
    rendered = block_jacobians(chat, ["hello there"], rendered=True, progress=False)
    raw = block_jacobians(chat, ["hello there"], rendered=False, progress=False)
    assert raw.n_tokens[0] == rendered.n_tokens[0] + 1  # the <bos> the tokenizer adds


# --- errors --------------------------------------------------------------------------------------


def test_errors() -> None:
    lm = tiny_model("llama")
    with pytest.raises(JacobianError, match="no prompts"):
        block_jacobians(lm, [], progress=False)
    with pytest.raises(JacobianError, match="at least"):
        block_jacobians(lm, ["fine text", ""], progress=False)  # "" is just <bos>
    chat = tiny_model("llama", chat=True)
    with pytest.raises(JacobianError, match="1 token"):
        block_jacobians(chat, ["a"], rendered=True, progress=False)
    with pytest.raises(JacobianError, match="max_tokens"):
        block_jacobians(lm, TEXTS, max_tokens=1, progress=False)
    with pytest.raises(JacobianError, match="method"):
        block_jacobians(lm, TEXTS, method="slow", progress=False)  # type: ignore[arg-type]
    with pytest.raises(SiteError, match="out of range"):
        block_jacobians(lm, TEXTS, layers=[5], progress=False)
    with pytest.raises(JacobianError, match="empty"):
        block_jacobians(lm, TEXTS, layers=[], progress=False)
    assert issubclass(JacobianError, SteerlabError)


def test_non_float32_model_is_refused() -> None:
    lm = build_tiny_model("llama")
    lm.model.to(torch.bfloat16)
    with pytest.raises(JacobianError, match="float32"):
        block_jacobians(lm, TEXTS, progress=False)
    with pytest.raises(JacobianError, match="float32"):
        block_function(lm, TEXTS[0], 0)


def _patch_forward(lm: LoadedModel, layer: int, wrap: Any) -> None:
    block = find_layers(lm.model).blocks[layer]
    original = block.forward
    block.forward = types.MethodType(lambda self, *a, **k: wrap(original, *a, **k), block)


def test_data_dependent_control_flow_is_fine() -> None:
    """torch.func runs the forward once at the unbatched primal point, so Python branches on
    values (``.item()``) are allowed and give the Jacobian of the branch taken there."""
    lm = build_tiny_model("llama")
    plain = block_jacobians(lm, TEXTS[:1], progress=False)

    def branchy(original: Any, hidden_states: torch.Tensor, *a: Any, **k: Any) -> Any:
        if hidden_states.sum().item() > 1e9:
            hidden_states = hidden_states * 2
        return original(hidden_states, *a, **k)

    _patch_forward(lm, 1, branchy)
    for mode in ("rev", "fwd"):
        got = block_jacobians(lm, TEXTS[:1], jac_mode=mode, progress=False)  # type: ignore[arg-type]
        assert rel(got.A, plain.A) < 1e-6


def test_untransformable_block_names_reference() -> None:
    lm = build_tiny_model("llama")

    def reads_numpy(original: Any, hidden_states: torch.Tensor, *a: Any, **k: Any) -> Any:
        # Reads the data outside torch: torch.func's wrapped tensors have no storage.
        shift = float(hidden_states.detach().numpy().mean()) * 0.0
        return original(hidden_states + shift, *a, **k)

    _patch_forward(lm, 1, reads_numpy)
    for mode in ("rev", "fwd"):
        with pytest.raises(JacobianError, match=r"LlamaDecoderLayer.*method='reference'"):
            block_jacobians(lm, TEXTS[:1], jac_mode=mode, progress=False)  # type: ignore[arg-type]
    ref = block_jacobians(lm, TEXTS[:1], method="reference", progress=False)
    assert torch.isfinite(ref.A).all()


def test_block_with_hidden_state_fails_self_check() -> None:
    lm = build_tiny_model("llama")
    calls = {"n": 0}

    def stateful(original: Any, hidden_states: torch.Tensor, *a: Any, **k: Any) -> Any:
        calls["n"] += 1  # the output depends on how often the block ran: not a function
        return original(hidden_states, *a, **k) + calls["n"]

    _patch_forward(lm, 0, stateful)
    with pytest.raises(JacobianError, match="does not reproduce"):
        block_jacobians(lm, TEXTS[:1], progress=False)


def test_result_metadata() -> None:
    lm = tiny_model("gpt2")
    res = block_jacobians(lm, TEXTS, progress=False)
    assert res.n_prompts == 3 and res.per_prompt is None and res.method == "fast"
    assert res.seconds > 0 and res.n_truncated == 0
    assert res.A.device.type == "cpu"
