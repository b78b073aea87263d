"""The shape and kind of a sparse autoencoder (:class:`SAEConfig`), and the mapping between
steerlab sites and TransformerLens hook names (``resid_post.12`` <-> ``blocks.12.hook_resid_post``).

Architectures: ``relu`` (SAELens's ``"standard"``), ``jumprelu`` and ``topk``; their activation
functions are in :mod:`steerlab.sae.model`, how each trains in :mod:`steerlab.sae.train`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, cast

from steerlab.errors import SteeringError

Architecture = Literal["relu", "jumprelu", "topk"]
ARCHITECTURES: tuple[str, ...] = ("relu", "jumprelu", "topk")

_HOOK_RE = re.compile(r"^blocks\.(?P<layer>\d+)\.hook_(?P<kind>resid_pre|resid_post)$")
_SITE_RE = re.compile(r"^(?P<kind>resid_pre|resid_post)\.(?P<layer>\d+)$")


def site_for_hook_name(hook_name: str) -> str:
    """steerlab site of a TransformerLens residual hook (``blocks.12.hook_resid_post`` ->
    ``resid_post.12``); ``""`` for any other hook."""
    m = _HOOK_RE.match(hook_name)
    return f"{m.group('kind')}.{int(m.group('layer'))}" if m else ""


def hook_name_for_site(site: str) -> str:
    """TransformerLens hook of a residual site (``resid_post.12`` ->
    ``blocks.12.hook_resid_post``); ``""`` for any other site."""
    m = _SITE_RE.match(site)
    return f"blocks.{int(m.group('layer'))}.hook_{m.group('kind')}" if m else ""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SAEConfig:
    """Shape and kind of a sparse autoencoder.

    ``site`` and ``hook_name`` name the same place in two vocabularies; for residual sites a
    missing one is filled from the other (``resid_post.12`` <-> ``blocks.12.hook_resid_post``).
    ``jumprelu_init_threshold`` and ``jumprelu_bandwidth`` are training settings, in the
    normalised units of :func:`train_sae`.
    """

    d_in: int
    d_sae: int
    architecture: Architecture
    k: int | None = None
    tied: bool = False
    hook_name: str = ""
    site: str = ""
    model_name: str = ""
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    apply_b_dec_to_input: bool = True

    def __post_init__(self) -> None:  # noqa: C901
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise SteeringError(f"SAE {name} must be a positive integer, got {value!r}")
        if self.architecture not in ARCHITECTURES:
            raise SteeringError(f"unknown SAE architecture {self.architecture!r}; use one of "
                                f"{', '.join(ARCHITECTURES)}")
        if self.architecture == "topk":
            if not _is_int(self.k) or not 1 <= cast(int, self.k) <= self.d_sae:
                raise SteeringError(f"a topk SAE needs an integer k in [1, d_sae = "
                                    f"{self.d_sae}], got k={self.k!r}")
        elif self.k is not None:
            raise SteeringError(f"k is for topk SAEs only; a {self.architecture} SAE takes "
                                f"k=None, got k={self.k!r}")
        for name in ("tied", "apply_b_dec_to_input"):
            if not isinstance(getattr(self, name), bool):
                raise SteeringError(f"SAE {name} must be True or False, "
                                    f"got {getattr(self, name)!r}")
        for name in ("hook_name", "site", "model_name"):
            if not isinstance(getattr(self, name), str):
                raise SteeringError(f"SAE {name} must be a string, got {getattr(self, name)!r}")
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value <= 0):
                raise SteeringError(f"{name} must be a finite, positive number, got {value!r}")
            setattr(self, name, float(value))
        if self.site and not _SITE_RE.match(self.site) and not re.match(r"^heads\.\d+$",
                                                                        self.site):
            raise SteeringError(f"cannot parse the SAE site {self.site!r}: write KIND.LAYER "
                                f"with KIND resid_pre, resid_post or heads, e.g. 'resid_post.12'")
        from_hook = site_for_hook_name(self.hook_name)
        if self.site and from_hook and from_hook != self.site:
            raise SteeringError(f"the SAE's site {self.site!r} and hook_name "
                                f"{self.hook_name!r} (= {from_hook}) disagree")
        if not self.site:
            self.site = from_hook
        if not self.hook_name:
            self.hook_name = hook_name_for_site(self.site)


__all__ = ["ARCHITECTURES", "Architecture", "SAEConfig", "hook_name_for_site",
           "site_for_hook_name"]
