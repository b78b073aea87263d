"""Last-token Jacobians of decoder blocks, the linear model behind A-LQR.

For decoder block ``k`` (function ``phi_k`` of its whole ``(seq, d)`` input ``Z_k``),

    A_k = d[phi_k(Z_k)]_last / d(z_k)_last        (a d x d matrix)

is the derivative of the block's last output row with respect to its last input row, the
other rows held fixed, taken at the unsteered forward pass of a prompt and averaged over
prompts (spec ``alqr.md`` section 3).

Two methods compute it, both exact in float32:

* ``"fast"`` (default). Other positions only reach the last row through the keys and values
  of block ``k``'s attention, which do not depend on the last input row. So the model is run
  on the prompt minus its last token with a KV cache, then one decode step on the last token
  with pre-hooks that capture each block's arguments exactly as the model passes them
  (position embeddings, masks, position ids: whatever the architecture uses). Block ``k`` as
  a function of the last row alone is then one one-token block call, ``f_k(x)``, with the
  cache replaced by a read-only stand-in (:class:`ContextCache`) that returns the context's
  cached keys and values for layer ``k`` concatenated with the new ones and never mutates.
  ``torch.func.jacrev`` of ``f_k`` at the unsteered last row gives ``A_k``: ``d`` vectorised
  one-token backward passes, with no per-model code. Before it differentiates, the method
  checks that ``f_k`` reproduces the block's real output of the decode step.
* ``"reference"``. The full prompt with no cache; ``g(Z) = block(Z)[-1]`` and
  ``torch.autograd.functional.jacobian(g, Z, vectorize=True)``, a ``(d, seq, d)`` tensor of
  which the last-row slice is kept. This is what the paper's code computes, at ``seq`` times
  the cost and memory; use it where the fast method refuses an architecture.

The model must be float32 (load it with ``dtype=torch.float32``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from steerlab.errors import SteerlabError
from steerlab.hooks import Hook, HookSet, PreHookFn, TensorHook, on_output, pre_hook
from steerlab.models import LoadedModel
from steerlab.sites import LayerMap, Site, find_layers, get_input, get_output, set_input

JacobianMethod = Literal["fast", "reference"]
JacMode = Literal["rev", "fwd"]
BlockFn = Callable[[torch.Tensor], torch.Tensor]
_OneToken = tuple[BlockFn, torch.Tensor, torch.Tensor]  # (f_k, z_k, real output last row)

# f_k(z_k) must match the real decode-step output of block k to this relative error (float32
# noise is ~1e-7; a wrong stand-in cache or missing argument gives errors of order 1).
_SELF_CHECK_RTOL = 1e-4


class JacobianError(SteerlabError):
    """A block Jacobian cannot be computed (bad prompt, dtype, or untransformable block)."""


@dataclass
class JacobianResult:
    """Mean last-token block Jacobians over prompts.

    Attributes:
        A: ``(len(layers), d, d)`` float32 on the CPU, ``A[i]`` for block ``layers[i]``, with
            ``A[i] @ dz`` the first-order change of the block's last output row.
        layers: the block indices (sorted, non-negative).
        n_prompts: how many prompts were averaged.
        seconds: wall time of the whole computation.
        per_prompt: ``(n_prompts, len(layers), d, d)`` if ``keep_per_prompt`` was set.
        n_truncated: how many prompts were longer than ``max_tokens`` and cut (on the right).
        n_tokens: the token count each prompt was used with (after truncation).
        method: ``"fast"`` or ``"reference"``.
        max_tokens: the truncation length used.
    """

    A: torch.Tensor
    layers: list[int]
    n_prompts: int
    seconds: float
    per_prompt: torch.Tensor | None = None
    n_truncated: int = 0
    n_tokens: list[int] = field(default_factory=list)
    method: str = "fast"
    max_tokens: int = 24


class ContextCache:
    """A read-only stand-in for a transformers KV cache holding one prompt's context.

    ``update(key_states, value_states, layer_idx, ...)`` returns the cached context keys and
    values of that layer with the new ones appended, as a cache's update does, but stores
    nothing: a block can be called with it any number of times (inside ``torch.func``
    transforms too) and always sees the same context.
    """

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        self.keys = list(keys)
        self.values = list(values)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
        *args: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx_k, ctx_v = self.keys[layer_idx], self.values[layer_idx]
        if ctx_k.numel() == 0:
            return key_states, value_states
        return (torch.cat([ctx_k, key_states], dim=-2), torch.cat([ctx_v, value_states], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return int(k.shape[-2]) if k.numel() else 0

    def __len__(self) -> int:
        return len(self.keys)


# --- helpers ------------------------------------------------------------------------------------


def _arch(lm: LoadedModel) -> str:
    return lm.info.architecture


def _math_sdpa() -> contextlib.AbstractContextManager[None]:
    """Route SDPA attention to its math kernel while differentiating.

    The fused kernels have no forward-mode derivative and no vmap rule for their backward
    (vmap then loops over the batch, slowly); the math kernel is plain batched tensor ops.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _block_name(lm: LoadedModel, layer: int) -> str:
    return type(find_layers(lm.model).blocks[layer]).__name__


def check_float32(lm: LoadedModel) -> None:
    """Raise unless every floating-point parameter of the model is float32."""
    bad = sorted({str(p.dtype) for p in lm.model.parameters()
                  if p.is_floating_point() and p.dtype != torch.float32})
    if bad:
        raise JacobianError(
            f"block Jacobians are computed in float32, but {lm.info.model_id} has {', '.join(bad)} "
            f"weights; load the model for fitting with dtype=torch.float32 "
            f"(load_model(..., dtype='float32'))"
        )
    if lm.model.training:
        raise JacobianError("the model is in training mode (dropout); call lm.model.eval() first")


def encode_prompt(
    lm: LoadedModel, text: str, *, max_tokens: int, rendered: bool
) -> tuple[torch.Tensor, bool]:
    """Token ids ``(1, T)`` of one prompt, cut to ``max_tokens``, and whether it was cut."""
    if max_tokens < 2:
        raise JacobianError(f"max_tokens must be at least 2, got {max_tokens}")
    add_special = not (rendered and lm.info.is_chat)
    ids = list(lm.tokenizer(text, add_special_tokens=add_special)["input_ids"])
    if len(ids) < 2:
        raise JacobianError(
            f"prompt {text[:60]!r} has {len(ids)} token(s); the block Jacobian needs at least "
            f"2 (a context and a last token)"
        )
    truncated = len(ids) > max_tokens
    ids = ids[:max_tokens]
    return torch.tensor([ids], dtype=torch.long, device=lm.device), truncated


def _resolve_layers(layer_map: LayerMap, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(layer_map.num_layers))
    out = sorted({layer_map.resolve(Site("resid_pre", int(i))).layer for i in layers})
    if not out:
        raise JacobianError("layers is empty; give block indices or None for every block")
    return out


def _cache_kwarg(model: nn.Module) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _is_cache(obj: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Cache)


def _replace(
    args: tuple[Any, ...], kwargs: dict[str, Any], match: Callable[[Any], bool], new: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args = tuple(new if match(a) else a for a in args)
    kwargs = {k: (new if match(v) else v) for k, v in kwargs.items()}
    return args, kwargs


@dataclass
class _Captured:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    z: torch.Tensor  # the block input: (d,) last row for "fast", (T, d) for "reference"
    out: torch.Tensor | None = None  # the block output, same shape as z


def _capture(
    model: nn.Module,
    layer_map: LayerMap,
    layers: list[int],
    call: Callable[[], Any],
    *,
    last_row_only: bool,
) -> dict[int, _Captured]:
    """Run ``call`` with hooks on the chosen blocks; keep each block's arguments and I/O."""
    got: dict[int, _Captured] = {}

    def capture_args(k: int) -> PreHookFn:
        # a raw pre-hook: the block's whole call is kept, not only its hidden states
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h = get_input(args, kwargs)
            if h.dim() != 3 or h.shape[0] != 1:
                raise JacobianError(
                    f"block {k} got hidden states of shape {tuple(h.shape)}, expected "
                    f"(1, seq, d)"
                )
            z = h[0, -1] if last_row_only else h[0]
            got[k] = _Captured(args=args, kwargs=dict(kwargs), z=z.detach().clone())
        return hook

    def capture_out(k: int) -> TensorHook:
        def read(h: torch.Tensor) -> None:
            got[k].out = (h[0, -1] if last_row_only else h[0]).detach().clone()
        return read

    hooks: list[Hook] = []
    for k in layers:
        block = layer_map.blocks[k]
        hooks += [pre_hook(block, capture_args(k)), on_output(block, capture_out(k))]
    with HookSet(hooks), torch.no_grad():
        call()
    missing = [k for k in layers if k not in got]
    if missing:
        raise JacobianError(f"blocks {missing} did not run in the forward pass")
    return got


def _one_token_functions(
    lm: LoadedModel, layer_map: LayerMap, ids: torch.Tensor, layers: list[int]
) -> dict[int, _OneToken]:
    """Per block: ``(f_k, z_k, real output last row)`` at the last token of ``ids``."""
    model = lm.model
    cache_name = _cache_kwarg(model)
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], use_cache=True)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    cache_layers = getattr(cache, "layers", None)
    if cache is None or cache_layers is None:
        raise JacobianError(
            f"{_arch(lm)} returned no transformers KV cache with per-layer keys and values "
            f"(got {type(cache).__name__}); use method='reference'"
        )
    try:
        ctx_keys = [layer.keys for layer in cache_layers]
        ctx_values = [layer.values for layer in cache_layers]
    except AttributeError as exc:
        raise JacobianError(
            f"the KV cache of {_arch(lm)} ({type(cache).__name__}) does not hold plain keys "
            f"and values per layer; use method='reference'"
        ) from exc
    if any(k is None or not isinstance(k, torch.Tensor) for k in ctx_keys):
        raise JacobianError(
            f"some cache layers of {_arch(lm)} hold no keys after the prefill (shared or "
            f"recurrent layers?); use method='reference'"
        )
    view = ContextCache(ctx_keys, ctx_values)

    def decode() -> None:
        model(input_ids=ids[:, -1:], use_cache=True, **{cache_name: cache})

    captured = _capture(model, layer_map, layers, decode, last_row_only=True)
    result: dict[int, _OneToken] = {}
    for k in layers:
        cap = captured[k]
        args, kwargs = _replace(cap.args, cap.kwargs, lambda o: o is cache, view)
        if any(_is_cache(v) for v in (*args, *kwargs.values())):
            raise JacobianError(
                f"{_arch(lm)} block {k} ({_block_name(lm, k)}) receives a KV cache other than "
                f"the model's own, which the fast method cannot replace by a read-only "
                f"context; use method='reference'"
            )
        block = layer_map.blocks[k]
        d = cap.z.shape[-1]

        def f(x: torch.Tensor, block: nn.Module = block, args: tuple[Any, ...] = args,
              kwargs: dict[str, Any] = kwargs, d: int = d) -> torch.Tensor:
            a, kw = set_input(args, kwargs, x.reshape(1, 1, d))
            return get_output(block(*a, **kw))[0, -1]

        assert cap.out is not None
        result[k] = (f, cap.z, cap.out)
    return result


def _self_check(lm: LoadedModel, layer: int, f: BlockFn,
                z: torch.Tensor, real: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            got = f(z)
    except Exception as exc:
        raise JacobianError(
            f"{_arch(lm)} block {layer} ({_block_name(lm, layer)}) cannot run on one token with a "
            f"read-only context cache ({type(exc).__name__}: {exc}); use method='reference'"
        ) from exc
    err = float((got - real).norm() / real.norm().clamp_min(1e-30))
    if not math.isfinite(err) or err > _SELF_CHECK_RTOL:
        raise JacobianError(
            f"{_arch(lm)} block {layer} ({_block_name(lm, layer)}): the one-token block "
            f"function does not reproduce the model's own output (relative error {err:.2e}), "
            f"so the block reads state the fast method does not capture; use "
            f"method='reference'"
        )


def _jacobian_fast(
    lm: LoadedModel, layer: int, f: BlockFn, z: torch.Tensor,
    mode: JacMode, chunk_size: int | None,
) -> torch.Tensor:
    # The no_grad: the transform differentiates w.r.t. z only, so no parameter graph is built.
    try:
        with torch.no_grad(), _math_sdpa():
            if mode == "rev":
                return torch.func.jacrev(f, chunk_size=chunk_size)(z)
            # jacfwd has no chunk_size: vmap the JVP over the basis ourselves.
            basis = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)

            def column(v: torch.Tensor) -> torch.Tensor:
                return torch.func.jvp(f, (z,), (v,))[1]

            return torch.func.vmap(column, chunk_size=chunk_size)(basis).T
    except Exception as exc:
        raise JacobianError(
            f"torch.func cannot differentiate {_arch(lm)} block {layer} "
            f"({_block_name(lm, layer)}): {type(exc).__name__}: {exc}. Blocks that read "
            f"tensor data outside torch (.numpy(), custom kernels, autograd Functions without "
            f"torch.func support, e.g. quantised matmuls) cannot be transformed; use "
            f"method='reference' (slower, plain autograd)"
        ) from exc


def _jacobians_reference(
    lm: LoadedModel, layer_map: LayerMap, ids: torch.Tensor, layers: list[int]
) -> dict[int, torch.Tensor]:
    model = lm.model
    captured = _capture(
        model, layer_map, layers, lambda: model(input_ids=ids, use_cache=False),
        last_row_only=False,
    )
    out = {}
    for k in layers:
        cap = captured[k]
        # A cache created despite use_cache=False would grow on every call: drop it.
        args, kwargs = _replace(cap.args, cap.kwargs, _is_cache, None)
        block = layer_map.blocks[k]

        def g(zz: torch.Tensor, block: nn.Module = block, args: tuple[Any, ...] = args,
              kwargs: dict[str, Any] = kwargs) -> torch.Tensor:
            a, kw = set_input(args, kwargs, zz[None])
            return get_output(block(*a, **kw))[0, -1]

        with _math_sdpa():
            jac = torch.autograd.functional.jacobian(g, cap.z, vectorize=True)
        assert isinstance(jac, torch.Tensor)
        out[k] = jac[:, -1, :].detach()
    return out


# --- public API ---------------------------------------------------------------------------------


def block_function(
    lm: LoadedModel, text: str, layer: int, *, max_tokens: int = 24, rendered: bool = True
) -> tuple[BlockFn, torch.Tensor]:
    """Block ``layer`` as a function of the last input row of one prompt, and that row.

    Returns ``(f, z)``: ``f`` maps a ``(d,)`` float32 tensor (the block input at the prompt's
    last token, other positions held at their unsteered values) to the block output's last
    row; ``z`` is the unsteered last-row input. ``f(z)`` is the model's own block output, so
    ``f(z + dz) - f(z) - A @ dz`` measures how far the block is from its linearisation.
    """
    check_float32(lm)
    layer_map = find_layers(lm.model)
    k = _resolve_layers(layer_map, [layer])[0]
    ids, _ = encode_prompt(lm, text, max_tokens=max_tokens, rendered=rendered)
    f, z, real = _one_token_functions(lm, layer_map, ids, [k])[k]
    _self_check(lm, k, f, z, real)
    return f, z


def block_jacobians(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    max_tokens: int = 24,
    rendered: bool = True,
    method: JacobianMethod = "fast",
    keep_per_prompt: bool = False,
    progress: bool = True,
    jac_mode: JacMode = "rev",
    chunk_size: int | None = None,
) -> JacobianResult:
    """Mean last-token Jacobians ``A_k`` of decoder blocks over prompts (float32).

    The operating points are the model's own forward passes: call it outside any steering
    context (hooks on the blocks would be differentiated too).

    Args:
        lm: a float32 model (``load_model(..., dtype="float32")``).
        texts: the prompts (the operating points), e.g. positive-class texts.
        layers: block indices (negative ones count from the end); None for every block.
        max_tokens: prompts longer than this are cut to their first ``max_tokens`` tokens.
        rendered: whether the texts come from a chat template, which holds its own special
            tokens (then the tokenizer adds none), as in :func:`steerlab.activations.collect`.
        method: ``"fast"`` (one-token block functions, see the module docstring) or
            ``"reference"`` (full-sequence reverse mode, as the paper's code).
        keep_per_prompt: also return every prompt's Jacobians.
        progress: show a progress bar over prompts.
        jac_mode: for the fast method, ``"rev"`` (``torch.func.jacrev``) or ``"fwd"``
            (``jacfwd``); both are exact.
        chunk_size: for the fast method, how many of the ``d`` vectorised passes run at once
            (None: all); lower it to save memory on large models.
    """
    t0 = time.perf_counter()
    texts = list(texts)
    if not texts:
        raise JacobianError("no prompts given: the Jacobians are averaged over prompts")
    if method not in ("fast", "reference"):
        raise JacobianError(f"method must be 'fast' or 'reference', got {method!r}")
    if jac_mode not in ("rev", "fwd"):
        raise JacobianError(f"jac_mode must be 'rev' or 'fwd', got {jac_mode!r}")
    check_float32(lm)
    layer_map = find_layers(lm.model)
    ks = _resolve_layers(layer_map, layers)
    encoded = [encode_prompt(lm, t, max_tokens=max_tokens, rendered=rendered) for t in texts]

    d = layer_map.hidden_size
    total = torch.zeros(len(ks), d, d, dtype=torch.float32, device=lm.device)
    per_prompt = (
        torch.empty(len(texts), len(ks), d, d, dtype=torch.float32) if keep_per_prompt else None
    )
    iterator: Any = enumerate(encoded)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(encoded), desc=f"block Jacobians ({method})",
                        unit="prompt", leave=False)
    for p, (ids, _) in iterator:
        if method == "fast":
            fns = _one_token_functions(lm, layer_map, ids, ks)
            jacs = {}
            for k in ks:
                f, z, real = fns[k]
                _self_check(lm, k, f, z, real)
                jacs[k] = _jacobian_fast(lm, k, f, z, jac_mode, chunk_size)
        else:
            jacs = _jacobians_reference(lm, layer_map, ids, ks)
        for i, k in enumerate(ks):
            jac = jacs[k].to(torch.float32)
            if not bool(torch.isfinite(jac).all()):
                raise JacobianError(f"the Jacobian of block {k} on prompt {p} is not finite")
            total[i] += jac
            if per_prompt is not None:
                per_prompt[p, i] = jac.cpu()
    return JacobianResult(
        A=(total / len(texts)).cpu(),
        layers=ks,
        n_prompts=len(texts),
        seconds=time.perf_counter() - t0,
        per_prompt=per_prompt,
        n_truncated=sum(1 for _, cut in encoded if cut),
        n_tokens=[int(ids.shape[1]) for ids, _ in encoded],
        method=method,
        max_tokens=max_tokens,
    )
