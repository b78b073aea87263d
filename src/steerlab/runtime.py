"""The steering runtime: hooks that apply controllers at their sites on the scoped positions.

``with steering(lm, [Steer(caa, 4.0)]): lm.model.generate(...)`` steers every row;
``steering(lm, rows=[[Steer(caa, 4.0)], [], [Steer(caa, -4.0)]])`` gives each row of the
batch its own controllers and strengths. Semantics (see docs/architecture.md):

* Positions are absolute. A forward pre-hook on the model reads the attention mask (without
  one, the position ids or the length of the KV cache) and computes, for each token of the
  current chunk, its position among the row's real tokens; left padding gets -1 and is never
  steered. The prompt length of each row is the number of real tokens in the first forward
  pass of the context. Scopes are predicates on these positions (:mod:`steerlab.scope`), so
  cached and uncached generation steer the same tokens.
* Rows are independent. Each (controller, scope) pair carries a per-row strength and a
  per-row "active" flag (a row whose strengths for a controller sum to 0 is not active:
  strength 0 is the unsteered model for every method); the steered tensor is written only
  where the row is active and the scope selects the position (``torch.where``), so a row
  with no controller is bit-identical to unsteered generation of the same batch.
* Hooks never outlive the context: they are removed in ``__exit__``, also when the body
  raises. A context holds no state after it exits and can be re-entered.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import torch
from torch import nn

from steerlab.errors import SteeringError
from steerlab.hooks import HookSet, TensorHook, at_site, pre_hook
from steerlab.methods.base import Controller, StepContext, check_strength
from steerlab.models import LoadedModel
from steerlab.scope import TokenScope, parse_scope
from steerlab.sites import LayerMap, Site, find_layers, hook_is_pre


@dataclass(frozen=True)
class Steer:
    """One controller applied at one strength on one token scope (default: the controller's)."""

    controller: Controller
    strength: float = 1.0
    scope: TokenScope | str | None = None

    def resolved_scope(self) -> TokenScope:
        if self.scope is None:
            return self.controller.default_scope
        return parse_scope(self.scope)


@dataclass
class _Group:
    controller: Controller
    scope: TokenScope
    strengths: torch.Tensor  # (rows,) float32
    active: torch.Tensor  # (rows,) bool
    # resolved site -> the site as the controller names it (a negative layer stays negative)
    own_sites: dict[Site, Site] = field(default_factory=dict)


def _as_list(spec: Steer | Sequence[Steer] | None) -> list[Steer]:
    if spec is None:
        return []
    if isinstance(spec, Steer):
        return [spec]
    out = list(spec)
    for s in out:
        if not isinstance(s, Steer):
            raise SteeringError(f"expected Steer objects, got {type(s).__name__}")
    return out


def _unwrap(lm: LoadedModel | nn.Module) -> tuple[nn.Module, Any]:
    if isinstance(lm, LoadedModel):
        return cast(nn.Module, lm.model), lm.info
    return lm, None


def _call_arguments(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The model call's arguments by name, so that a positional attention mask is seen too.

    The order of positional parameters differs between models (GPT-2 takes the cache second),
    hence the binding to the signature of ``forward``.
    """
    if len(args) <= 1:
        return {"input_ids": args[0], **kwargs} if args else dict(kwargs)
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {"input_ids": args[0], **kwargs}
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            out[name] = value
    return out


class _GatheredReads(Mapping[Site, torch.Tensor]):
    """A read-only view of a forward pass's reads at the selected positions, gathered lazily
    (a closed-loop controller reads one or two of them per site)."""

    def __init__(self, reads: dict[Site, torch.Tensor], sel: torch.Tensor) -> None:
        self._reads, self._sel = reads, sel

    def __getitem__(self, key: Site) -> torch.Tensor:
        return self._reads[key][self._sel][:, None, :]

    def __iter__(self) -> Iterator[Site]:
        return iter(self._reads)

    def __len__(self) -> int:
        return len(self._reads)


def check_compatible(controller: Controller, layers: LayerMap, model_name: str) -> None:
    """Fail clearly when a controller was fitted on a model of another shape."""
    controller.check_fitted()
    info = controller.model_info
    if info is not None and info.hidden_size != layers.hidden_size:
        raise SteeringError(
            f"{controller.method} controller was fitted on {info.model_id} (hidden size "
            f"{info.hidden_size}) but this model ({model_name}) has hidden size "
            f"{layers.hidden_size}; fit it again on this model"
        )
    for site in [*controller.sites, *controller.read_sites]:
        layers.resolve(site)


class steering:
    """Apply controllers to a model inside a ``with`` block.

    Args:
        lm: a :class:`~steerlab.models.LoadedModel` or a bare transformers model.
        steers: controllers applied to every row of every batch.
        rows: per-row controllers, one entry (a Steer, a list of them, or None) per batch row;
            the batch size of every forward pass must then equal ``len(rows)``.
        layers: a precomputed :class:`~steerlab.sites.LayerMap` (found if omitted).
        prompt_len: real prompt length of each row, if the first forward pass of the context
            is not the prompt (e.g. when the caller pre-fills the cache itself).
        carry: one dict per row for the state a controller carries from one forward pass
            to the next (:attr:`~steerlab.methods.base.StepContext.carry`), for a caller
            that runs each forward pass in its own context (the server keeps one per
            request). By default the context makes fresh ones at its first forward pass, so
            nothing carries over between contexts (one context per generate call).
    """

    def __init__(
        self,
        lm: LoadedModel | nn.Module,
        steers: Steer | Sequence[Steer] | None = None,
        *,
        rows: Sequence[Steer | Sequence[Steer] | None] | None = None,
        layers: LayerMap | None = None,
        prompt_len: Sequence[int] | None = None,
        carry: Sequence[dict[Any, Any]] | None = None,
    ) -> None:
        self.model, info = _unwrap(lm)
        self.model_name = info.model_id if info is not None else type(self.model).__name__
        if steers is not None and rows is not None:
            raise SteeringError("give either steers (all rows) or rows (per row), not both")
        self.layers = layers if layers is not None else find_layers(self.model)
        self.per_row = rows is not None
        row_specs = [_as_list(r) for r in rows] if rows is not None else [_as_list(steers)]
        self.n_rows = len(row_specs)
        self._groups: dict[Site, list[_Group]] = {}
        # resolved read site -> every name a controller gave it (StepContext.reads keys)
        self._reads: dict[Site, set[Site]] = {}
        groups: dict[tuple[int, TokenScope], _Group] = {}
        for r, specs in enumerate(row_specs):
            for spec in specs:
                strength = check_strength(spec.strength)
                check_compatible(spec.controller, self.layers, self.model_name)
                key = (id(spec.controller), spec.resolved_scope())
                if key not in groups:
                    groups[key] = _Group(
                        controller=spec.controller,
                        scope=key[1],
                        strengths=torch.zeros(self.n_rows, dtype=torch.float32),
                        active=torch.zeros(self.n_rows, dtype=torch.bool),
                    )
                g = groups[key]
                if bool(g.active[r]):
                    g.strengths[r] += strength  # the same controller twice on a row adds up
                else:
                    g.strengths[r] = strength
                    g.active[r] = True
        for g in groups.values():
            # strength 0 is the unsteered model, for every method (docs/strength.md): such a
            # row is not steered at all, so its output is bit-identical to no controller
            g.active &= g.strengths != 0
            for site in g.controller.sites:
                resolved = self.layers.resolve(site)
                g.own_sites[resolved] = site
                self._groups.setdefault(resolved, []).append(g)
            for site in g.controller.read_sites:
                resolved = self.layers.resolve(site)
                self._reads.setdefault(resolved, {resolved}).add(site)
        self._prompt_len_given = (
            torch.tensor(list(prompt_len), dtype=torch.long) if prompt_len is not None else None
        )
        self._carry_given = list(carry) if carry is not None else None
        self._carry: list[dict[Any, Any]] | None = None
        self._hooks: HookSet | None = None
        self._positions: torch.Tensor | None = None
        self._prompt_len: torch.Tensor | None = None
        self._ctx: StepContext | None = None
        self._plan: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._sparse: set[int] = set()

    # -- hooks ---------------------------------------------------------------------------------
    def _on_model_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        kwargs = _call_arguments(module, args, kwargs)
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            raise SteeringError("the steered model was called without input_ids or inputs_embeds")
        batch, seq = int(ids.shape[0]), int(ids.shape[1])
        device = ids.device
        if self.per_row and batch != self.n_rows:
            raise SteeringError(
                f"per-row steering was set up for {self.n_rows} rows but the model got a batch "
                f"of {batch} (beam search and num_return_sequences > 1 change the batch size; "
                f"give one rows entry per sequence)"
            )
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= seq:
            m = mask.to(torch.long)
            real = torch.cumsum(m, dim=1) - 1
            positions = torch.where(m.bool(), real, torch.full_like(real, -1))[:, -seq:]
        else:
            # No 2-D mask, hence no padding (transformers >= 5 drops an all-ones mask in
            # generate): the positions are the model's own position ids, else the number of
            # cached tokens (``cache`` in transformers >= 5, ``past_key_values`` before) plus
            # the offset in this chunk.
            position_ids = kwargs.get("position_ids")
            if (
                isinstance(position_ids, torch.Tensor)
                and position_ids.dim() == 2
                and position_ids.shape[1] == seq
                and position_ids.shape[0] in (1, batch)
            ):
                positions = position_ids.to(device=device, dtype=torch.long).expand(batch, seq)
            else:
                past = 0
                cache_position = kwargs.get("cache_position")
                pkv = kwargs.get("cache", kwargs.get("past_key_values"))
                if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0:
                    past = int(cache_position.reshape(-1)[0])
                elif pkv is not None and hasattr(pkv, "get_seq_length"):
                    past = int(pkv.get_seq_length())
                positions = (past + torch.arange(seq, device=device)).expand(batch, seq)
        if self._prompt_len is None:
            if self._prompt_len_given is not None:
                if len(self._prompt_len_given) != batch:
                    raise SteeringError(
                        f"prompt_len has {len(self._prompt_len_given)} entries for a batch of "
                        f"{batch}"
                    )
                self._prompt_len = self._prompt_len_given.to(device)
            else:
                self._prompt_len = positions.max(dim=1).values + 1
        if self._carry_given is not None:
            if len(self._carry_given) != batch:
                raise SteeringError(
                    f"carry has {len(self._carry_given)} entries for a batch of {batch}")
            self._carry = self._carry_given
        elif self._carry is None or len(self._carry) != batch:
            self._carry = [{} for _ in range(batch)]
        self._positions = positions
        self._ctx = StepContext(positions=positions, prompt_len=self._prompt_len, reads={},
                                carry=self._carry)
        self._plan_groups(batch, device)

    def _plan_groups(self, batch: int, device: torch.device) -> None:
        """Per forward pass, once for all sites: each group's strengths and write mask.

        The mask depends only on the positions of this forward pass, so computing it here
        instead of at every steered site keeps the per-site cost to the controller's own
        arithmetic (see benchmarks/overhead.py). ``None`` as mask means "every position".
        """
        ctx = self._ctx
        assert ctx is not None
        plan: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        sparse: set[int] = set()
        seen: set[int] = set()
        for groups in self._groups.values():
            for g in groups:
                if id(g) in seen:
                    continue
                seen.add(id(g))
                strengths = g.strengths.to(device)
                active = g.active.to(device)
                if not self.per_row:
                    strengths = strengths.expand(batch)
                    active = active.expand(batch)
                mask = g.scope.mask(ctx.positions, ctx.prompt_len) & active[:, None]
                if not bool(mask.any()):
                    continue
                plan[id(g)] = (strengths, None if bool(mask.all()) else mask[..., None])
                if mask.shape[1] > 1 and int(mask.sum()) * 2 <= mask.numel():
                    sparse.add(id(g))
        self._plan = plan
        self._sparse = sparse

    def _apply(self, site: Site, h: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx
        if ctx is None:
            raise SteeringError("a steered block ran before the model's forward pass started")
        for g in self._groups.get(site, []):
            planned = self._plan.get(id(g))
            if planned is None:
                continue
            strengths, mask = planned
            if strengths.device != h.device:  # a model split over devices
                strengths = strengths.to(h.device)
                mask = mask.to(h.device) if mask is not None else None
            own = g.own_sites.get(site, site)
            if mask is not None and id(g) in self._sparse:
                h = self._apply_gathered(g, own, h, strengths, mask[..., 0], ctx)
                continue
            ctx.steered = None if mask is None else mask[..., 0]
            new = g.controller.steer(own, h, strengths, ctx)
            if new.shape != h.shape:
                raise SteeringError(
                    f"{g.controller.method} returned shape {tuple(new.shape)} at {site}, "
                    f"expected {tuple(h.shape)}"
                )
            h = new.to(h.dtype) if mask is None else torch.where(mask, new.to(h.dtype), h)
        return h

    def _apply_gathered(
        self,
        g: _Group,
        site: Site,
        h: torch.Tensor,
        strengths: torch.Tensor,
        sel: torch.Tensor,
        ctx: StepContext,
    ) -> torch.Tensor:
        """Steer only the selected positions, as a batch of one-token rows.

        Used when a scope selects few positions of the chunk (scope ``last`` in a prefill):
        the controller then computes on those rows only, which matters for expensive
        controllers (ODESteer integrates an ODE per row). Controllers are row-wise, so the
        result equals steering the whole chunk and masking.
        """
        b_idx = sel.nonzero()[:, 0]
        sub = StepContext(
            positions=ctx.positions[sel][:, None],
            prompt_len=ctx.prompt_len[b_idx],
            reads=cast(dict[Site, torch.Tensor], _GatheredReads(ctx.reads, sel)),
            scratch=ctx.scratch.setdefault(("gathered", id(g)), {}),
            carry=[ctx.carry[i] for i in b_idx.tolist()] if ctx.carry is not None else None,
        )
        h_sel = h[sel][:, None, :]
        new = g.controller.steer(site, h_sel, strengths[b_idx], sub)
        if new.shape != h_sel.shape:
            raise SteeringError(
                f"{g.controller.method} returned shape {tuple(new.shape)} at {site}, "
                f"expected {tuple(h_sel.shape)}"
            )
        out = h.clone()
        out[sel] = new[:, 0, :].to(h.dtype)
        return out

    def _site_callback(self, site: Site, write: bool, read: bool) -> TensorHook:
        """What runs on the tensor at ``site`` in every forward pass: store it for the
        controllers that read it, then apply the controllers that write there."""
        if not read:
            # the common case: a write-only site calls the controllers and nothing else
            return functools.partial(self._apply, site)
        names = self._reads[site]

        def on_site(h: torch.Tensor) -> torch.Tensor | None:
            if self._ctx is not None:
                for name in names:
                    self._ctx.reads[name] = h
            return self._apply(site, h) if write else None

        return on_site

    # -- context protocol ----------------------------------------------------------------------
    def __enter__(self) -> steering:
        if self._hooks is not None:
            raise SteeringError("this steering context is already active")
        try:
            hooks = [pre_hook(self.model, self._on_model_call)]
            for site in sorted(set(self._groups) | set(self._reads)):
                write, read = site in self._groups, site in self._reads
                # prepend block-output hooks: they run before hooks already on the block, such
                # as those with which transformers captures ``output_hidden_states``, so those
                # see the steered output whenever they were installed.
                hooks.append(at_site(self.layers, site, self._site_callback(site, write, read),
                                     prepend=not hook_is_pre(site)))
            self._hooks = HookSet(hooks).install()
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        self._hooks = None
        self._positions = None
        self._prompt_len = None
        self._carry = None
        self._ctx = None
        self._plan = {}

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()


def tokenize_prompts(
    lm: LoadedModel, texts: Sequence[str], *, rendered: bool
) -> dict[str, torch.Tensor]:
    """Tokenize with left padding (given per call: the tokenizer's own setting is left as it
    is). Chat-rendered text already holds its special tokens."""
    tok = lm.tokenizer
    add_special = not (rendered and lm.info.is_chat)
    enc = tok(list(texts), return_tensors="pt", padding=True, padding_side="left",
              add_special_tokens=add_special)
    return {"input_ids": enc["input_ids"].to(lm.device),
            "attention_mask": enc["attention_mask"].to(lm.device)}


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    steers: Steer | Sequence[Steer] | None = None,
    rows: Sequence[Steer | Sequence[Steer] | None] | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    use_cache: bool = True,
    batch_size: int = 8,
    render: bool = True,
    system: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """Generate completions for ``prompts``, optionally steered.

    Prompts are rendered with the model's chat template (or CAA's plain format for base
    models) unless ``render=False``. Greedy by default. ``rows`` gives one steering entry per
    prompt (per-row steering); ``steers`` applies to all.
    """
    from steerlab.data import Renderer

    if max_new_tokens < 1:
        raise SteeringError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise SteeringError(f"batch_size must be at least 1, got {batch_size}")
    if rows is not None and len(rows) != len(prompts):
        raise SteeringError(f"rows has {len(rows)} entries for {len(prompts)} prompts")
    renderer = Renderer(lm.tokenizer, system=system) if render else None
    texts = [renderer.prompt(p) if renderer else p for p in prompts]
    layers = find_layers(lm.model)
    outputs: list[str] = []
    starts = range(0, len(texts), batch_size)
    iterator: Any = starts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(starts, desc="generating", unit="batch")
    tok = lm.tokenizer
    for start in iterator:
        chunk = texts[start : start + batch_size]
        enc = tokenize_prompts(lm, chunk, rendered=renderer is not None)
        kw: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "use_cache": use_cache,
            "pad_token_id": tok.pad_token_id,
        }
        if do_sample:
            kw["temperature"] = temperature
            torch.manual_seed(seed + start)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        chunk_rows = rows[start : start + batch_size] if rows is not None else None
        with torch.no_grad(), steering(lm, steers, rows=chunk_rows, layers=layers):
            out = lm.model.generate(**enc, **kw)
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        outputs.extend(tok.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs
