"""One way to put hooks on a model and take them off again.

Modelled on steering-vectors' ``record_activations``: a context manager registers a set of
PyTorch hooks on entry and removes every handle on exit, also when the body, or a hook inside
the forward pass, raises, or when registering one of the hooks fails halfway.

A :class:`Hook` says where a callback goes (a module, its input or its output, first or
last among the module's hooks); :class:`HookSet` installs a list of them::

    with HookSet(at_sites(layers, {Site("resid_post", 3): read})):
        model(**batch)

Two kinds of callback:

* **tensor callbacks** (:func:`on_input`, :func:`on_output`, :func:`at_site`,
  :func:`at_sites`) get the hidden states, the block's first argument (or its
  ``hidden_states`` keyword) or its output (a tensor, or the first element of a tuple or
  list), and return a replacement tensor to write it, or ``None`` (or the very tensor they
  got) to leave the module's input or output untouched. They serve reads and writes alike;
* **raw callbacks** (:func:`pre_hook`, :func:`post_hook`) are plain PyTorch hooks, for those
  that need the whole call: a forward pre-hook ``fn(module, args, kwargs)`` (registered
  ``with_kwargs=True``) returning ``None`` or new ``(args, kwargs)``, a forward hook
  ``fn(module, args, output)`` returning ``None`` or a new output.

The wrappers do what a hand-written hook would do and nothing more: no per-call lookups
or allocations, one Python call of the callback per forward pass of the module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from steerlab.errors import SteerlabError
from steerlab.sites import (
    LayerMap,
    Site,
    get_input,
    get_output,
    hook_is_pre,
    set_input,
    set_output,
)

TensorHook = Callable[[torch.Tensor], torch.Tensor | None]
"""Gets the hidden states; returns their replacement, or None to leave them as they are."""
PreHookFn = Callable[
    [nn.Module, tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]] | None
]
"""A forward pre-hook with keyword arguments: ``fn(module, args, kwargs)``."""
PostHookFn = Callable[[nn.Module, tuple[Any, ...], Any], Any]
"""A forward hook: ``fn(module, args, output)``, returning None or the new output."""


@dataclass(frozen=True)
class Hook:
    """One raw PyTorch hook and where it goes.

    Attributes:
        module: the module hooked.
        fn: a :data:`PreHookFn` when ``pre`` is true, else a :data:`PostHookFn`.
        pre: a forward pre-hook (with kwargs) rather than a forward hook.
        prepend: run before the hooks already on the module rather than after them.
    """

    module: nn.Module
    fn: Callable[..., Any]
    pre: bool
    prepend: bool = False

    def register(self) -> RemovableHandle:
        """Register the hook on its module; the handle removes it."""
        if self.pre:
            return self.module.register_forward_pre_hook(
                self.fn, with_kwargs=True, prepend=self.prepend
            )
        return self.module.register_forward_hook(self.fn, prepend=self.prepend)


def pre_hook(module: nn.Module, fn: PreHookFn, *, prepend: bool = False) -> Hook:
    """A raw forward pre-hook with keyword arguments on ``module``."""
    return Hook(module, fn, pre=True, prepend=prepend)


def post_hook(module: nn.Module, fn: PostHookFn, *, prepend: bool = False) -> Hook:
    """A raw forward hook on ``module``."""
    return Hook(module, fn, pre=False, prepend=prepend)


def on_input(module: nn.Module, fn: TensorHook, *, prepend: bool = False) -> Hook:
    """``fn`` on the hidden states ``module`` is called with (its first positional argument,
    else its ``hidden_states`` keyword); a tensor it returns replaces them."""

    def hook(
        mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        h = get_input(args, kwargs)
        new = fn(h)
        if new is None or new is h:
            return None
        return set_input(args, kwargs, new)

    return Hook(module, hook, pre=True, prepend=prepend)


def on_output(module: nn.Module, fn: TensorHook, *, prepend: bool = False) -> Hook:
    """``fn`` on the hidden states ``module`` returns (its output, or the first element of a
    tuple or list output); a tensor it returns replaces them, the other elements are kept."""

    def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        h = get_output(output)
        new = fn(h)
        if new is None or new is h:
            return None
        return set_output(output, new)

    return Hook(module, hook, pre=False, prepend=prepend)


def at_site(
    layers: LayerMap, site: Site | str, fn: TensorHook, *, prepend: bool = False
) -> Hook:
    """``fn`` on the tensor at ``site``: the input of the site's module for ``resid_pre``
    and ``heads`` sites, its output for ``resid_post`` (see :mod:`steerlab.sites`)."""
    resolved = layers.resolve(site)
    module = layers.module(resolved)
    if hook_is_pre(resolved):
        return on_input(module, fn, prepend=prepend)
    return on_output(module, fn, prepend=prepend)


def at_sites(
    layers: LayerMap, callbacks: Mapping[Site, TensorHook] | Mapping[str, TensorHook],
    *, prepend: bool = False,
) -> list[Hook]:
    """One :func:`at_site` hook per entry of ``callbacks``, in its order."""
    return [at_site(layers, site, fn, prepend=prepend) for site, fn in callbacks.items()]


class HookSet:
    """Hooks installed together and removed together.

    As a context manager it installs them on entry and removes them on exit, whatever ends
    the block. :meth:`install` and :meth:`remove` do the same for hooks that live longer
    than one block (a serving worker's). If registering one hook fails, the ones already
    registered are removed before the error propagates. A set can be installed again after
    it was removed, never twice at once.
    """

    def __init__(self, hooks: Iterable[Hook]) -> None:
        self.hooks: tuple[Hook, ...] = tuple(hooks)
        self._handles: list[RemovableHandle] | None = None  # None: not installed

    @property
    def installed(self) -> bool:
        """Whether the hooks are on their modules now."""
        return self._handles is not None

    def install(self) -> HookSet:
        """Register every hook, in order; returns the set."""
        if self._handles is not None:
            raise SteerlabError("these hooks are already installed")
        self._handles = []
        try:
            for hook in self.hooks:
                self._handles.append(hook.register())
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this set registered (nothing when none is installed)."""
        handles, self._handles = self._handles or [], None
        for handle in handles:
            handle.remove()

    def __enter__(self) -> HookSet:
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()
