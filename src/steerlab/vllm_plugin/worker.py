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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
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
    controller: Controller
    scope: TokenScope
    idx: torch.Tensor  # (R, T) flattened token index, padding clamped to a real index
    valid: torch.Tensor  # (R, T) bool, False on padding
    flat: torch.Tensor  # (n,) the selected flattened token indices (valid entries of idx)
    positions: torch.Tensor  # (R, T), -1 on padding
    prompt_len: torch.Tensor  # (R,)
    strengths: torch.Tensor  # (R,) float32
    carry: list[dict[Any, Any]]
    scratch: dict[Any, Any] = field(default_factory=dict)
    applied: set[Site] = field(default_factory=set)


@dataclass
class StepPlan:
    num_tokens: int
    groups: dict[Site, list[_GroupPlan]]
    all_groups: list[_GroupPlan]
    reads: dict[Site, torch.Tensor] = field(default_factory=dict)  # name -> (N, d)


class _Reads(Mapping[Site, torch.Tensor]):
    """A forward pass's reads gathered like the steered tensor, lazily."""

    def __init__(self, reads: dict[Site, torch.Tensor], idx: torch.Tensor) -> None:
        self._reads, self._idx = reads, idx

    def __getitem__(self, key: Site) -> torch.Tensor:
        return self._reads[key][self._idx]

    def __iter__(self) -> Iterator[Site]:
        return iter(self._reads)

    def __len__(self) -> int:
        return len(self._reads)


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
        self._validate(n_heads, head_dim, dtype, device)
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
        (``query_start_loc``); ``positions`` the step's flattened absolute positions."""
        self.plan = None
        rows: dict[tuple[int, TokenScope], list[tuple[int, float]]] = {}
        controllers: dict[int, Controller] = {}
        for i, rid in enumerate(req_ids):
            for controller, strength, scope in self.entries(rid, extra_args[i]):
                key = (id(controller), scope)
                controllers[id(controller)] = controller
                lst = rows.setdefault(key, [])
                if lst and lst[-1][0] == i:
                    lst[-1] = (i, lst[-1][1] + strength)  # the same controller twice adds up
                else:
                    lst.append((i, strength))
        if not rows:
            return
        pos = positions.reshape(-1) if positions.dim() == 1 else positions[0].reshape(-1)
        pos = pos.to("cpu", torch.long)
        n_tokens = int(pos.shape[0])
        groups: dict[Site, list[_GroupPlan]] = {}
        all_groups: list[_GroupPlan] = []
        for (cid, scope), members in rows.items():
            controller = controllers[cid]
            sel_rows: list[tuple[int, float, torch.Tensor]] = []
            for i, strength in members:
                if strength == 0:
                    continue  # strength 0 is the unsteered model, for every method
                a, b = int(starts[i]), int(starts[i + 1])
                if b <= a:
                    continue
                p = pos[a:b]
                pl = torch.tensor([int(prompt_lens[i])], dtype=torch.long)
                m = scope.mask(p[None, :], pl)[0]
                if bool(m.any()):
                    sel_rows.append((i, strength, torch.arange(a, b)[m]))
            if not sel_rows:
                continue
            t_max = max(len(x[2]) for x in sel_rows)
            r_n = len(sel_rows)
            idx = torch.zeros(r_n, t_max, dtype=torch.long)
            valid = torch.zeros(r_n, t_max, dtype=torch.bool)
            for r, (_, _, toks) in enumerate(sel_rows):
                idx[r, : len(toks)] = toks
                idx[r, len(toks):] = toks[-1]
                valid[r, : len(toks)] = True
            positions_sel = torch.where(valid, pos[idx], torch.full_like(idx, -1))
            g = _GroupPlan(
                controller=controller, scope=scope, idx=idx, valid=valid, flat=idx[valid],
                positions=positions_sel,
                prompt_len=torch.tensor([int(prompt_lens[i]) for i, _, _ in sel_rows]),
                strengths=torch.tensor([s for _, s, _ in sel_rows], dtype=torch.float32),
                carry=[self.carry.setdefault(req_ids[i], {}) for i, _, _ in sel_rows])
            all_groups.append(g)
            for site in controller.sites:
                groups.setdefault(self.resolve(site), []).append(g)
        if all_groups:
            self.plan = StepPlan(num_tokens=n_tokens, groups=groups, all_groups=all_groups)

    def end_step(self) -> None:
        """Clear the plan; fail if a planned group was not applied at one of its local sites
        (hooks that did not run, e.g. under compilation): a steered request must never come
        back unsteered without a word."""
        plan, self.plan = self.plan, None
        if plan is None:
            return
        for g in plan.all_groups:
            expected = {self.resolve(s) for s in g.controller.sites}
            expected = {s for s in expected if s.layer in self.local_layers}
            missing = expected - g.applied
            if missing:
                raise SteeringError(
                    f"steering hooks did not run at {sorted(str(s) for s in missing)} for "
                    f"{g.controller.method}: the model is not running eagerly (start vLLM "
                    f"with enforce_eager=True / --enforce-eager)")

    # -- application ---------------------------------------------------------------------------
    def _apply(self, site: Site, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steer the flattened ``h`` (N, d) at ``site``; returns it and the (N,) mask of the
        tokens written (None: nothing written)."""
        plan = self.plan
        if plan is None:
            return h, None
        written: torch.Tensor | None = None
        for g in plan.groups.get(site, []):
            if h.shape[0] < plan.num_tokens:
                raise SteeringError(f"steering at {site}: {h.shape[0]} tokens, the step "
                                    f"planned {plan.num_tokens}")
            own = next(s for s in g.controller.sites if self.resolve(s) == site)
            dev = h.device
            idx = g.idx.to(dev)
            ctx = StepContext(positions=g.positions.to(dev), prompt_len=g.prompt_len.to(dev),
                              reads=_Reads(plan.reads, idx),  # type: ignore[arg-type]
                              scratch=g.scratch, carry=g.carry, steered=g.valid.to(dev))
            h_sel = h[idx]
            new = g.controller.steer(own, h_sel, g.strengths.to(dev), ctx)
            if new.shape != h_sel.shape:
                raise SteeringError(f"{g.controller.method} returned shape {tuple(new.shape)} "
                                    f"at {site}, expected {tuple(h_sel.shape)}")
            h = h.clone()
            flat = g.flat.to(dev)
            h[flat] = new[g.valid.to(dev)].to(h.dtype)
            if written is None:
                written = torch.zeros(h.shape[0], dtype=torch.bool, device=dev)
            written[flat] = True
            g.applied.add(site)
        return h, written

    def _store_read(self, site: Site, h: torch.Tensor) -> None:
        plan = self.plan
        if plan is None:
            return
        plan.reads[site] = h
        for sc in self.registry.controllers.values():
            for s in sc.controller.read_sites:
                if self.resolve(s) == site:
                    plan.reads[s] = h

    def _split_write(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                     site: Site, read: bool, write: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if self.plan is None:
            return None
        total = hidden if residual is None else hidden + residual
        if read:
            self._store_read(site, total)
        if not write:
            return None
        new, written = self._apply(site, total)
        if written is None:
            return None
        m = written[:, None]
        hidden2 = torch.where(m, new.to(hidden.dtype), hidden)
        residual2 = None if residual is None else torch.where(m, torch.zeros_like(residual),
                                                              residual)
        return hidden2, residual2

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
            out = self._split_write(hidden, residual, site, read, write)
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
                self._store_read(site, x)
            if not write:
                return None
            new, written = self._apply(site, x)
            if written is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            kwargs["input_"] = new
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
