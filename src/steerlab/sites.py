"""Where steerlab reads and writes: decoder blocks found without per-model tables.

Site names (a small, stable vocabulary in the spirit of TransformerLens' hook points):

* ``resid_pre.L``  input of decoder block ``L`` (the residual stream entering it);
* ``resid_post.L`` output of decoder block ``L`` (the residual stream leaving it);
* ``heads.L``      the per-head attention output of block ``L`` before the output projection,
  a ``(batch, seq, n_heads * head_dim)`` tensor whose slice ``[h*head_dim:(h+1)*head_dim]`` is
  head ``h``.

Layer discovery (after steering-vectors' ``layer_matching``): the decoder blocks are the
``nn.ModuleList`` whose children are all of one class and whose length equals the config's
layer count (else the longest such list); the attention output projection is the linear layer
inside the block's attention module with one of the usual names (``o_proj``, ``out_proj``,
``c_proj``, ``dense``, ``wo``). Neither needs a table of model classes. Where a layout is
unusual, name the modules by hand: ``find_layers(model, blocks="model.layers",
attn_out="self_attn.o_proj")``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch
from torch import nn

from steerlab.errors import SiteError

SiteKind = Literal["resid_pre", "resid_post", "heads"]
SITE_KINDS: tuple[str, ...] = get_args(SiteKind)
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "o")
_SITE_RE = re.compile(r"^(?P<kind>[a-z_]+)\.(?P<layer>-?\d+)$")


@dataclass(frozen=True, order=True)
class Site:
    """A place in the model: a kind (see the module docstring) and a block index."""

    kind: SiteKind
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise SiteError(
                f"unknown site kind {self.kind!r}; use one of {', '.join(SITE_KINDS)}"
            )

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        """Parse ``"resid_post.12"``; a :class:`Site` passes through."""
        if isinstance(text, Site):
            return text
        m = _SITE_RE.match(text.strip())
        if m is None:
            raise SiteError(
                f"cannot parse site {text!r}: write KIND.LAYER, e.g. 'resid_post.12', with "
                f"KIND one of {', '.join(SITE_KINDS)}"
            )
        kind = m.group("kind")
        if kind not in SITE_KINDS:
            raise SiteError(f"unknown site kind {kind!r} in {text!r}; use one of "
                            f"{', '.join(SITE_KINDS)}")
        return cls(cast(SiteKind, kind), int(m.group("layer")))


def _conv1d_like(module: nn.Module) -> bool:
    # GPT-2's Conv1D: a weight of shape (in, out) and an nf attribute.
    return hasattr(module, "nf") and isinstance(getattr(module, "weight", None), torch.Tensor)


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    weight = cast(torch.Tensor, module.weight)
    return int(weight.shape[0])


@dataclass
class LayerMap:
    """The decoder blocks of a model and the modules behind each site."""

    blocks: list[nn.Module]
    block_names: list[str]
    attn_out: list[nn.Module] | None
    attn_out_names: list[str] | None
    hidden_size: int
    n_heads: int | None
    head_dim: int | None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def resolve(self, site: Site | str) -> Site:
        """Validate a site and turn a negative layer index into a positive one."""
        site = Site.parse(site)
        n = self.num_layers
        layer = site.layer + n if site.layer < 0 else site.layer
        if not 0 <= layer < n:
            raise SiteError(
                f"layer {site.layer} is out of range: this model has {n} decoder blocks, "
                f"valid layers are 0..{n - 1} (or -{n}..-1)"
            )
        if site.kind == "heads" and self.attn_out is None:
            raise SiteError(
                "this model has no recognisable attention output projection, so 'heads' sites "
                "are unavailable; name it by hand, e.g. find_layers(model, "
                "attn_out='self_attn.o_proj')"
            )
        return Site(site.kind, layer)

    def module(self, site: Site) -> nn.Module:
        if site.kind == "heads":
            assert self.attn_out is not None
            return self.attn_out[site.layer]
        return self.blocks[site.layer]

    def width(self, site: Site) -> int:
        """The last-dimension width of the tensor at a site."""
        if site.kind == "heads":
            assert self.n_heads is not None and self.head_dim is not None
            return self.n_heads * self.head_dim
        return self.hidden_size


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _get_path(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise SiteError(f"no module named {path!r} in {type(root).__name__}") from exc


def _discover_blocks(model: nn.Module, n_expected: int | None) -> tuple[str, nn.ModuleList]:
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        child = module[0]
        if isinstance(child, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Dropout)):
            continue
        if sum(1 for _ in child.parameters()) == 0:
            continue
        candidates.append((name, module))
    if not candidates:
        raise SiteError(
            f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
            f"identical blocks. Name them by hand, e.g. find_layers(model, "
            f"blocks='model.layers') (the dotted path of the ModuleList of decoder blocks)."
        )
    if n_expected is not None:
        exact = [c for c in candidates if len(c[1]) == n_expected]
        if exact:
            candidates = exact
    # Longest list first; among equals, the shortest (outermost) name.
    candidates.sort(key=lambda c: (-len(c[1]), len(c[0]), c[0]))
    return candidates[0]


def _discover_attn_out(block: nn.Module, hidden_size: int) -> str | None:
    found: list[str] = []
    for name, module in block.named_modules():
        parts = name.split(".")
        if len(parts) < 2 or not re.search(r"attn|attention", parts[-2], re.IGNORECASE):
            continue
        if parts[-1] not in _ATTN_OUT_NAMES:
            continue
        if not (isinstance(module, nn.Linear) or _conv1d_like(module)):
            continue
        out = module.out_features if isinstance(module, nn.Linear) else module.nf
        if int(out) == hidden_size:
            found.append(name)
    if len(found) == 1:
        return found[0]
    return None


def find_layers(
    model: nn.Module, *, blocks: str | None = None, attn_out: str | None = None
) -> LayerMap:
    """Find the decoder blocks and attention output projections of a causal LM.

    Args:
        model: a transformers causal LM (or any module with a ModuleList of blocks).
        blocks: dotted path of the ModuleList of decoder blocks, to override discovery.
        attn_out: dotted path, relative to a block, of the attention output projection.
    """
    config = _text_config(model)
    n_expected = getattr(config, "num_hidden_layers", None) if config is not None else None
    if blocks is not None:
        found = _get_path(model, blocks)
        if not isinstance(found, nn.ModuleList):
            raise SiteError(f"{blocks!r} is a {type(found).__name__}, not an nn.ModuleList")
        name, block_list = blocks, found
    else:
        name, block_list = _discover_blocks(model, n_expected)

    hidden = getattr(config, "hidden_size", None) if config is not None else None
    if hidden is None:
        hidden = getattr(config, "n_embd", None) if config is not None else None
    if hidden is None:
        raise SiteError(
            f"cannot read the hidden size of {type(model).__name__} from its config"
        )
    hidden = int(hidden)

    n_heads_raw = None
    if config is not None:
        n_heads_raw = getattr(config, "num_attention_heads", None) or getattr(
            config, "n_head", None
        )
    rel = attn_out if attn_out is not None else _discover_attn_out(block_list[0], hidden)
    attn_modules: list[nn.Module] | None = None
    attn_names: list[str] | None = None
    n_heads: int | None = None
    head_dim: int | None = None
    if rel is not None:
        attn_modules = [_get_path(b, rel) for b in block_list]
        attn_names = [f"{name}.{i}.{rel}" for i in range(len(block_list))]
        if n_heads_raw:
            n_heads = int(n_heads_raw)
            width = _in_features(attn_modules[0])
            if width % n_heads != 0:
                raise SiteError(
                    f"attention output {rel!r} takes {width} features, not a multiple of the "
                    f"{n_heads} heads in the config"
                )
            head_dim = width // n_heads
        else:
            attn_modules, attn_names = None, None
    return LayerMap(
        blocks=list(block_list),
        block_names=[f"{name}.{i}" for i in range(len(block_list))],
        attn_out=attn_modules,
        attn_out_names=attn_names,
        hidden_size=hidden,
        n_heads=n_heads,
        head_dim=head_dim,
    )


# --- reading and writing the tensor a hook sees ------------------------------------------------


def hook_is_pre(site: Site) -> bool:
    """True where the site is read from a module's input (forward pre-hook)."""
    return site.kind in ("resid_pre", "heads")


def get_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return cast(torch.Tensor, args[0])
    if "hidden_states" in kwargs:
        return cast(torch.Tensor, kwargs["hidden_states"])
    raise SiteError("the block was called without hidden states as first argument")


def set_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], value: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (value, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = value
    return args, kwargs


def get_output(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SiteError(f"cannot read hidden states from a block output of type {type(output)}")


def set_output(output: Any, value: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    raise SiteError(f"cannot write hidden states into a block output of type {type(output)}")
