"""Engine side of the plugin: per-step plans and the hooks that apply controllers.

vLLM runs one flattened batch per step: ``N`` tokens of many requests, each request a
contiguous run (``query_start_loc``), in the order of the runner's ``req_ids`` (which the
runner reorders after scheduling). After the runner prepared its inputs, :meth:`begin_step`
builds a :class:`StepPlan` from that order, the step's ``positions`` and each request's prompt
length: for every (controller, scope) group, which flattened tokens it steers, their
absolute positions, their request's prompt length, strength and carried state. Each token
thus knows its request, its position and its prompt length, so the scopes select exactly the
tokens steerlab's runtime selects, whatever the chunking (chunked prefill), the batch
(continuous batching) or recomputation (preemption). The plan is cleared after the step, so
warm-up and profiling runs never see one.

The hooks sit on the decoder blocks (``resid_pre.L``: forward pre-hook; ``resid_post.L``:
forward hook) and on the attention output projection (``heads.L``: its input). vLLM keeps the
residual stream split in two, ``(hidden, residual)``, whose sum is steerlab's
``resid_pre``/``resid_post``: a steered token gets ``(h', 0)`` and every other token keeps
both original tensors (``torch.where``), so unsteered tokens stay bit-identical to plain vLLM.

At a site, a group's selected tokens are gathered as a padded ``(rows, T, d)`` batch, one row
per request (padding has position -1 and is marked not steered in ``StepContext.steered``),
and ``Controller.steer`` is called with the same contract as in the runtime; the result is
scattered back to the selected tokens only.

Cost per step (issue 17's throughput target): the plan is built once per forward pass with a
few tensor operations per group on the CPU (a request's parsed steering is cached) and moved
to the model's device once; each group's :class:`StepContext` is built once per pass and
shared by its sites. At a site only the group's tokens are touched: ``hidden + residual`` is
summed on the gathered rows (the same arithmetic as summing everything, then gathering),
reads (A-LQR's block inputs) are gathered only for the groups that read them, and the write
is an ``index_copy_`` of the steered rows (and an ``index_fill_`` of their residual with 0),
into a block's outputs themselves at ``resid_post`` (they only flow on to the next block) and
into copies elsewhere. So a controller computes on its own tokens, never on the whole batch,
and a step without a steered token runs no steering code at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from steerlab.errors import SteeringError, SteerlabError
from steerlab.hooks import Hook, HookSet, post_hook, pre_hook
from steerlab.methods.base import Controller, StepContext
from steerlab.models import ModelInfo
from steerlab.scope import TokenScope
from steerlab.serve.registry import ControllerRegistry
from steerlab.sites import Site
from steerlab.vllm_plugin import spec as spec_mod

log = logging.getLogger("steerlab.vllm")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo")


@dataclass
class _GroupPlan:
    """One (controller, scope) group of one forward pass: its selected tokens as a padded
    ``(R, T)`` batch (one row per request), on the model's device."""

    controller: Controller
    shape: tuple[int, int]  # (R, T)
    gather: torch.Tensor  # (R*T,) flattened token index of each slot; padding: the row's last
    flat: torch.Tensor  # (n,) the selected flattened token indices (the tokens written)
    keep: torch.Tensor | None  # (n,) the slots of ``flat`` in ``gather``; None: every slot
    strengths: torch.Tensor  # (R,) float32
    ctx: StepContext  # positions (-1 on padding), prompt lengths, steered, reads, carry
    own: Mapping[Site, Site]  # resolved write site -> the controller's own name for it
    read_names: Mapping[Site, tuple[Site, ...]]  # resolved read site -> its names in ctx.reads
    applied: set[Site] = field(default_factory=set)


@dataclass
class StepPlan:
    """The groups of one forward pass, by the (resolved) sites they write and read."""

    num_tokens: int
    writes: dict[Site, list[_GroupPlan]]
    readers: dict[Site, list[_GroupPlan]]
    all_groups: list[_GroupPlan]


@dataclass
class _StepTokens:
    """Per forward pass, per flattened token (CPU): its request and prompt length."""

    positions: torch.Tensor  # (N, 1) absolute positions
    request: torch.Tensor  # (N,) index of the token's request in the step's order
    prompt_len: torch.Tensor  # (n_requests,)
    token_prompt_len: torch.Tensor  # (N,) the prompt length of the token's request


def find_blocks(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The decoder blocks: the ``nn.ModuleList`` of ``num_layers`` children (the longest
    such list if several), as steerlab's own layer discovery does."""
    best: nn.ModuleList | None = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == num_layers and \
                (best is None or len(mod) > len(best)):
            best = mod
    if best is None:
        raise SteeringError(f"found no list of {num_layers} decoder blocks in "
                            f"{type(model).__name__}")
    return best


def find_attn_out(block: nn.Module) -> nn.Module | None:
    for a in _ATTN_NAMES:
        attn = getattr(block, a, None)
        if attn is None:
            continue
        for o in _OUT_NAMES:
            mod = getattr(attn, o, None)
            if isinstance(mod, nn.Module):
                return mod
    return None


def _is_missing(block: nn.Module) -> bool:
    # pipeline parallelism: blocks of other stages are placeholders (PPMissingLayer)
    return type(block).__name__ == "PPMissingLayer"


class WorkerSteering:
    """The steering state of one model runner (one per worker process)."""

    def __init__(self, model: nn.Module, info: ModelInfo, registry: ControllerRegistry, *,
                 n_heads: int | None, head_dim: int | None, tp_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                 ) -> None:
        self.info = info
        self.registry = registry
        self.num_layers = info.num_layers
        self.blocks = find_blocks(model, self.num_layers)
        self.plan: StepPlan | None = None
        self.carry: dict[str, dict[Any, Any]] = {}
        self._entries: dict[str, list[tuple[Controller, float, TokenScope]]] = {}
        self._hooks = HookSet([])
        self.local_layers = {i for i, b in enumerate(self.blocks) if not _is_missing(b)}
        self.tp_size = tp_size
        self.device = torch.device(device)
        self._validate(n_heads, head_dim, dtype, device)
        self._own: dict[int, dict[Site, Site]] = {}
        self._read_names: dict[int, dict[Site, tuple[Site, ...]]] = {}
        self._expected: dict[int, frozenset[Site]] = {}
        self._index_sites()
        self._install()

    # -- start-up ------------------------------------------------------------------------------
    def resolve(self, site: Site) -> Site:
        layer = site.layer + self.num_layers if site.layer < 0 else site.layer
        return Site(site.kind, layer)

    def _validate(self, n_heads: int | None, head_dim: int | None, dtype: torch.dtype,
                  device: torch.device | str) -> None:
        from steerlab import artifacts

        def width(site: Site) -> int | None:
            if site.kind == "heads":
                return n_heads * head_dim if n_heads and head_dim else None
            return self.info.hidden_size

        seen: set[int] = set()
        for name in self.registry.names:
            sc = self.registry.controllers[name]
            if id(sc.controller) in seen:
                continue
            seen.add(id(sc.controller))
            artifacts.check_controller(sc.controller, num_layers=self.num_layers, width=width,
                                       dtype=dtype, device=device,
                                       source=f"controller {name!r} ({sc.path})")
            for site in sc.controller.sites:
                if site.kind == "heads" and self.tp_size > 1:
                    raise SteeringError(
                        f"controller {name!r} steers {site} (attention heads), which tensor "
                        f"parallelism splits across ranks; serve it with "
                        f"tensor_parallel_size=1 (see docs/vllm.md)")
                r = self.resolve(site)
                if r.kind == "heads" and find_attn_out(self.blocks[r.layer]) is None and \
                        r.layer in self.local_layers:
                    raise SteeringError(f"controller {name!r}: no attention output projection "
                                        f"found in block {r.layer}")

    def _sites(self) -> tuple[set[Site], set[Site]]:
        writes: set[Site] = set()
        reads: set[Site] = set()
        for sc in self.registry.controllers.values():
            writes |= {self.resolve(s) for s in sc.controller.sites}
            reads |= {self.resolve(s) for s in sc.controller.read_sites}
        return writes, reads

    def _index_sites(self) -> None:
        """Per controller, once: its resolved write sites (and its own name for each), the
        names it reads each resolved read site by, and the local sites it must have run at
        by the end of a step."""
        for sc in self.registry.controllers.values():
            c = sc.controller
            if id(c) in self._own:
                continue
            self._own[id(c)] = {self.resolve(s): s for s in c.sites}
            names: dict[Site, set[Site]] = {}
            for s in c.read_sites:
                r = self.resolve(s)
                names.setdefault(r, {r}).add(s)
            self._read_names[id(c)] = {r: tuple(sorted(v)) for r, v in names.items()}
            self._expected[id(c)] = frozenset(
                r for r in self._own[id(c)] if r.layer in self.local_layers)

    def _install(self) -> None:
        # raw hooks: vLLM's blocks take and return the residual stream split in two
        writes, reads = self._sites()
        hooks: list[Hook] = []
        for site in sorted(writes | reads):
            if site.layer not in self.local_layers:
                continue
            block = self.blocks[site.layer]
            w, r = site in writes, site in reads
            if site.kind == "resid_pre":
                hooks.append(pre_hook(block, self._block_pre_hook(site, w, r)))
            elif site.kind == "resid_post":
                hooks.append(post_hook(block, self._block_post_hook(site, w, r), prepend=True))
            else:
                out = find_attn_out(block)
                assert out is not None
                hooks.append(pre_hook(out, self._heads_hook(site, w, r)))
        self._hooks = HookSet(hooks).install()

    def remove(self) -> None:
        self._hooks.remove()

    # -- per step ------------------------------------------------------------------------------
    def entries(self, req_id: str, extra_args: Mapping[str, Any] | None
                ) -> list[tuple[Controller, float, TokenScope]]:
        """A request's resolved steering (parsed once per request)."""
        got = self._entries.get(req_id)
        if got is not None:
            return got
        raw = extra_args.get(spec_mod.KEY) if extra_args else None
        out: list[tuple[Controller, float, TokenScope]] = []
        if raw is not None:
            for e in spec_mod.canonical(raw, self.registry):
                out.append((self.registry.get(e.controller).controller, e.strength, e.scope))
        self._entries[req_id] = out
        return out

    def finish(self, req_ids: Sequence[str]) -> None:
        for r in req_ids:
            self._entries.pop(r, None)
            self.carry.pop(r, None)

    def begin_step(self, req_ids: Sequence[str], starts: Sequence[int],
                   prompt_lens: Sequence[int], extra_args: Sequence[Mapping[str, Any] | None],
                   positions: torch.Tensor) -> None:
        """Build the plan of one forward pass. ``starts`` has ``len(req_ids) + 1`` entries
        (``query_start_loc``); ``positions`` the step's flattened absolute positions.

        Per request only a dictionary walk (its parsed steering is cached); the tokens of
        each (controller, scope) group are then selected with a few tensor operations on
        the CPU (the scope's mask over the step's tokens), whatever the number of tokens,
        and moved to the model's device once for the whole step."""
        self.plan = None
        members = self._members(req_ids, extra_args)
        if not members:
            return
        pos = positions.reshape(-1) if positions.dim() == 1 else positions[0].reshape(-1)
        n_tok = int(starts[-1])
        st = torch.as_tensor(starts, dtype=torch.long)
        request = torch.repeat_interleave(torch.arange(len(req_ids)), st[1:] - st[:-1])
        pl = torch.as_tensor(prompt_lens, dtype=torch.long)
        tokens = _StepTokens(positions=pos[:n_tok].to("cpu", torch.long)[:, None],
                             request=request, prompt_len=pl, token_prompt_len=pl[request])
        writes: dict[Site, list[_GroupPlan]] = {}
        readers: dict[Site, list[_GroupPlan]] = {}
        all_groups: list[_GroupPlan] = []
        for (_, scope), (controller, rows) in members.items():
            g = self._group(controller, scope, rows, tokens, req_ids)
            if g is None:
                continue
            all_groups.append(g)
            for site in g.own:
                writes.setdefault(site, []).append(g)
            for site in g.read_names:
                readers.setdefault(site, []).append(g)
        if all_groups:
            self.plan = StepPlan(num_tokens=n_tok, writes=writes, readers=readers,
                                 all_groups=all_groups)

    def _members(self, req_ids: Sequence[str], extra_args: Sequence[Mapping[str, Any] | None]
                 ) -> dict[tuple[int, TokenScope], tuple[Controller, dict[int, float]]]:
        """(id(controller), scope) -> (controller, {request index: strength}); the same
        controller and scope twice on a request adds up, and strength 0 is the unsteered
        model for every method (such a row is not steered at all)."""
        members: dict[tuple[int, TokenScope], tuple[Controller, dict[int, float]]] = {}
        for i, rid in enumerate(req_ids):
            for controller, strength, scope in self.entries(rid, extra_args[i]):
                rows = members.setdefault((id(controller), scope), (controller, {}))[1]
                rows[i] = rows.get(i, 0.0) + strength
        for key, (controller, rows) in list(members.items()):
            kept = {i: s for i, s in rows.items() if s != 0}
            if kept:
                members[key] = (controller, kept)
            else:
                del members[key]
        return members

    def _group(self, controller: Controller, scope: TokenScope, rows: dict[int, float],
               tokens: _StepTokens, req_ids: Sequence[str]) -> _GroupPlan | None:
        """The plan of one group: its requests' tokens selected by the scope, laid out as
        ``(R, T)`` slots (one row per request, padded on the right with the row's last
        token, position -1), or None when it selects no token of this step."""
        n_req = int(tokens.prompt_len.shape[0])
        strength = torch.zeros(n_req, dtype=torch.float32)
        member = torch.zeros(n_req, dtype=torch.bool)
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        strength[idx] = torch.as_tensor(list(rows.values()), dtype=torch.float32)
        member[idx] = True
        mask = scope.mask(tokens.positions, tokens.token_prompt_len)[:, 0]
        sel = (mask & member[tokens.request]).nonzero()[:, 0]
        n_sel = int(sel.shape[0])
        if n_sel == 0:
            return None
        row_of = tokens.request[sel]
        reqs, counts = torch.unique_consecutive(row_of, return_counts=True)
        r_n, t_max = int(reqs.shape[0]), int(counts.max())
        if t_max == 1:  # one token per request (decode, scope last): no padding
            gather, keep = sel, None
            valid = torch.ones(r_n, 1, dtype=torch.bool)
            pos_sel = tokens.positions[sel]
        else:
            first = torch.cumsum(counts, 0) - counts
            row_id = torch.repeat_interleave(torch.arange(r_n), counts)
            slot = row_id * t_max + torch.arange(n_sel) - first[row_id]
            grid = sel[first + counts - 1].repeat_interleave(t_max)  # padding: last token
            grid[slot] = sel
            valid = torch.zeros(r_n * t_max, dtype=torch.bool)
            valid[slot] = True
            gather = grid
            keep = None if n_sel == r_n * t_max else slot
            valid = valid.view(r_n, t_max)
            pos_sel = torch.where(valid, tokens.positions[grid, 0].view(r_n, t_max),
                                  torch.full((r_n, t_max), -1, dtype=torch.long))
        dev = self.device
        ctx = StepContext(
            positions=pos_sel.to(dev), prompt_len=tokens.prompt_len[reqs].to(dev), reads={},
            scratch={}, carry=[self.carry.setdefault(req_ids[i], {}) for i in reqs.tolist()],
            steered=valid.to(dev))
        return _GroupPlan(
            controller=controller, shape=(r_n, t_max), gather=gather.to(dev),
            flat=sel.to(dev), keep=None if keep is None else keep.to(dev),
            strengths=strength[reqs].to(dev), ctx=ctx, own=self._own[id(controller)],
            read_names=self._read_names[id(controller)])

    def end_step(self) -> None:
        """Clear the plan; fail if a planned group was not applied at one of its local sites
        (hooks that did not run, e.g. under compilation): a steered request must never come
        back unsteered without a word."""
        plan, self.plan = self.plan, None
        if plan is None:
            return
        for g in plan.all_groups:
            missing = self._expected[id(g.controller)] - g.applied
            if missing:
                raise SteeringError(
                    f"steering hooks did not run at {sorted(str(s) for s in missing)} for "
                    f"{g.controller.method}: the model is not running eagerly (start vLLM "
                    f"with enforce_eager=True / --enforce-eager)")

    # -- application ---------------------------------------------------------------------------
    @staticmethod
    def _gather(g: _GroupPlan, hidden: torch.Tensor, residual: torch.Tensor | None
                ) -> torch.Tensor:
        """The group's slots of ``hidden + residual`` (summed on the gathered rows only,
        which is the same arithmetic), shaped ``(R, T, d)``."""
        x = hidden.index_select(0, g.gather)
        if residual is not None:
            x = x + residual.index_select(0, g.gather)
        return x.view(*g.shape, x.shape[-1])

    def _read(self, site: Site, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Store the read at ``site`` for the groups whose controller reads it (gathered
        like the tensor the controller steers, only on the group's tokens)."""
        plan = self.plan
        if plan is None:
            return
        for g in plan.readers.get(site, ()):
            x = self._gather(g, hidden, residual)
            for name in g.read_names[site]:
                g.ctx.reads[name] = x

    def _write(self, site: Site, hidden: torch.Tensor, residual: torch.Tensor | None,
               inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Steer the groups planned at ``site`` (in turn: a later group sees the earlier
        ones' writes). A steered token gets ``(h', 0)``; every other token keeps both
        original values. ``inplace`` writes into ``hidden`` and ``residual`` themselves (a
        block's outputs, which only flow on to the next block) instead of copies. Returns
        None when nothing is written."""
        plan = self.plan
        groups = plan.writes.get(site) if plan is not None else None
        if not groups:
            return None
        assert plan is not None
        if hidden.shape[0] < plan.num_tokens:
            raise SteeringError(f"steering at {site}: {hidden.shape[0]} tokens, the step "
                                f"planned {plan.num_tokens}")
        out_h: torch.Tensor | None = None
        out_r: torch.Tensor | None = None
        for g in groups:
            x = self._gather(g, hidden if out_h is None else out_h,
                             residual if out_r is None else out_r)
            new = g.controller.steer(g.own[site], x, g.strengths, g.ctx)
            if new.shape != x.shape:
                raise SteeringError(f"{g.controller.method} returned shape {tuple(new.shape)} "
                                    f"at {site}, expected {tuple(x.shape)}")
            vals = new.reshape(-1, new.shape[-1])
            if g.keep is not None:
                vals = vals.index_select(0, g.keep)
            if out_h is None:
                out_h = hidden if inplace else hidden.clone()
                out_r = residual if inplace or residual is None else residual.clone()
            out_h.index_copy_(0, g.flat, vals.to(hidden.dtype))
            if out_r is not None:
                out_r.index_fill_(0, g.flat, 0)
            g.applied.add(site)
        assert out_h is not None
        return out_h, out_r

    def _split_write(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                     site: Site, read: bool, write: bool, inplace: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if self.plan is None:
            return None
        if read:
            self._read(site, hidden, residual)
        return self._write(site, hidden, residual, inplace) if write else None

    def _block_pre_hook(self, site: Site, write: bool, read: bool) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self.plan is None:
                return None
            args_l = list(args)
            if len(args_l) >= 2:
                hidden = args_l[1]
                residual = args_l[2] if len(args_l) >= 3 else kwargs.get("residual")
            else:
                hidden = kwargs["hidden_states"]
                residual = kwargs.get("residual")
            out = self._split_write(hidden, residual, site, read, write)
            if out is None:
                return None
            h2, r2 = out
            if len(args_l) >= 2:
                args_l[1] = h2
                if len(args_l) >= 3:
                    args_l[2] = r2
                elif "residual" in kwargs:
                    kwargs["residual"] = r2
            else:
                kwargs["hidden_states"] = h2
                if "residual" in kwargs:
                    kwargs["residual"] = r2
            return tuple(args_l), kwargs

        return hook

    def _block_post_hook(self, site: Site, write: bool, read: bool) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if self.plan is None:
                return None
            if isinstance(output, tuple) and len(output) == 2:
                hidden, residual = output
            else:
                hidden, residual = output, None
            out = self._split_write(hidden, residual, site, read, write,
                                    inplace=residual is not hidden)
            if out is None:
                return None
            return out if residual is not None or isinstance(output, tuple) else out[0]

        return hook

    def _heads_hook(self, site: Site, write: bool, read: bool) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self.plan is None:
                return None
            x = args[0] if args else kwargs["input_"]
            if read:
                self._read(site, x, None)
            out = self._write(site, x, None) if write else None
            if out is None:
                return None
            if args:
                return (out[0], *args[1:]), kwargs
            kwargs["input_"] = out[0]
            return args, kwargs

        return hook


def build(model: nn.Module, hf_config: Any, model_name: str, registry: ControllerRegistry,
          *, tp_size: int, dtype: torch.dtype, device: Any) -> WorkerSteering:
    from steerlab.vllm_plugin.controllers import model_info_from_folder

    info = model_info_from_folder(model_name, hf_config)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    n_heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (
        text.hidden_size // n_heads if n_heads else None)
    try:
        return WorkerSteering(model, info, registry, n_heads=n_heads, head_dim=head_dim,
                              tp_size=tp_size, dtype=dtype, device=device)
    except SteerlabError:
        raise
    except Exception as exc:  # a clear start-up error rather than a stack deep in vLLM
        raise SteeringError(f"steerlab could not attach to {type(model).__name__}: "
                            f"{type(exc).__name__}: {exc}") from exc
