"""Validators shared by the steering methods: hyper-parameters, fit data and run-time inputs.

Every check a method makes on its arguments lives here, so the same mistake gets the same
message from every method. Hyper-parameter and run-time mistakes raise
:class:`~steerlab.errors.SteeringError`; bad fit data raises :class:`~steerlab.errors.DataError`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from steerlab.errors import DataError, SteeringError
from steerlab.sites import Site

# The token recipes of the fit helpers (which token of each example is read).
RECIPES: tuple[str, ...] = ("ab", "last", "mean")
# The residual-stream site kinds the block-level methods steer.
RESIDUAL_KINDS: tuple[str, ...] = ("resid_post", "resid_pre")


# -- numbers -----------------------------------------------------------------------------------
def check_number(name: str, value: Any) -> float:
    """A finite real number."""
    try:
        f = float(value)
    except (TypeError, ValueError) as exc:
        raise SteeringError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(f):
        raise SteeringError(f"{name} must be a finite number, got {value!r}")
    return f


def check_strength(value: float) -> float:
    """A steering strength must be a finite real number."""
    return check_number("strength", value)


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """A hyper-parameter that must be a finite, positive (or non-negative) number."""
    try:
        f = float(value)
    except (TypeError, ValueError) as exc:
        raise SteeringError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(f) or f < 0 or (f == 0 and not allow_zero):
        need = "non-negative" if allow_zero else "positive"
        raise SteeringError(f"{name} must be a finite, {need} number, got {value!r}")
    return f


def check_count(name: str, value: int, minimum: int = 1) -> int:
    """An integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise SteeringError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_int(name: str, value: int) -> int:
    """A positive integer (not a bool), e.g. an iteration limit."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise SteeringError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_tau(tau: float) -> float:
    """SAS's frequency threshold τ ∈ [0, 1]."""
    try:
        t = float(tau)
    except (TypeError, ValueError) as exc:
        raise SteeringError(f"tau must be a number in [0, 1], got {tau!r}") from exc
    if not math.isfinite(t) or not 0.0 <= t <= 1.0:
        raise SteeringError(f"tau is a frequency threshold and must be in [0, 1], got {tau!r}")
    return t


# -- choices -----------------------------------------------------------------------------------
def layers_arg(layers: int | Sequence[int]) -> list[int]:
    """One block index or several, as a non-empty list of ints."""
    if isinstance(layers, bool):
        raise SteeringError(f"layers must be an int or a list of ints, got {layers!r}")
    out = [int(layers)] if isinstance(layers, int) else [int(x) for x in layers]
    if not out:
        raise SteeringError("give at least one layer")
    return out


def check_recipe(recipe: str, method: str | None = None,
                 allowed: Sequence[str] = RECIPES) -> None:
    """``recipe`` is one of ``allowed`` (the message names ``method`` when given)."""
    if recipe not in allowed:
        who = f"{method} " if method else ""
        raise SteeringError(f"unknown {who}recipe {recipe!r}; use ab, last or mean")


def check_site_kind(site: str, subject: str, allowed: Sequence[str] = RESIDUAL_KINDS) -> None:
    """``site`` is one of ``allowed``; the message reads ``"<subject> <allowed>, not <site>"``
    (``subject`` e.g. ``"CAA steers"``)."""
    if site not in allowed:
        raise SteeringError(f"{subject} {' or '.join(allowed)}, not {site!r}")


# -- fit data ----------------------------------------------------------------------------------
def check_finite(name: str, t: torch.Tensor) -> None:
    """Every value of ``t`` is finite."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise SteeringError(
            f"{name} has {bad} non-finite values (NaN or inf); check the model's dtype (use "
            f"float32) and the data that produced them"
        )


def two_class_rows(positive: torch.Tensor, negative: torch.Tensor, method: str, *,
                   width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate positive (N₊, d) and negative (N₋, d) activations for a two-class estimator:
    (N, d) tensors, at least 2 rows each, finite, equal widths (``width`` if given), not
    identical. Returns them detached, float32, on the CPU."""
    out = []
    for name, x in (("positive", positive), ("negative", negative)):
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"the {name} activations must be an (N, d) tensor, got {shape}")
        if x.shape[0] < 2:
            raise DataError(
                f"{method} needs at least 2 {name} activations (one-class or empty data), "
                f"got {x.shape[0]}"
            )
        x = x.detach().to(torch.float32).cpu()
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise DataError(f"the {name} activations have {bad} non-finite values (NaN or inf)")
        out.append(x)
    pos, neg = out
    if pos.shape[1] != neg.shape[1]:
        raise DataError(f"positive width {pos.shape[1]} != negative width {neg.shape[1]}")
    if width is not None and pos.shape[1] != width:
        raise DataError(f"activations have width {pos.shape[1]}, the estimator expects {width}")
    if pos.shape == neg.shape and torch.equal(pos, neg):
        raise DataError("the positive and negative activations are identical: one class only")
    return pos, neg


def splittable_rows(positive: torch.Tensor, negative: torch.Tensor,
                    method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`two_class_rows` for a flow whose coupling layers split the width in two (≥ 2)."""
    pos, neg = two_class_rows(positive, negative, method)
    if pos.shape[1] < 2:
        raise DataError(
            f"{method} needs activations of width at least 2 (coupling layers split the "
            f"dimensions in two), got {pos.shape[1]}"
        )
    return pos, neg


def paired_sites(positive: dict[Site, torch.Tensor], negative: dict[Site, torch.Tensor],
                 method: str) -> list[Site]:
    """The sites of a fit: both dicts must name the same, non-empty set of sites."""
    if not isinstance(positive, dict) or not isinstance(negative, dict):
        raise DataError(
            f"{method}.fit takes dicts {{Site: (N, d) tensor}} of positive and negative "
            f"activations, got {type(positive).__name__} and {type(negative).__name__}"
        )
    if not positive:
        raise DataError(f"{method}.fit got no sites (empty activation dicts)")
    if set(positive) != set(negative):
        raise DataError(
            f"positive and negative activations name different sites: "
            f"{sorted(map(str, positive))} vs {sorted(map(str, negative))}"
        )
    for s in positive:
        if not isinstance(s, Site):
            raise DataError(f"activation dict keys must be Site objects, got {s!r}")
    return sorted(positive)


def covered_sites(positive: dict[Site, torch.Tensor], negative: dict[Site, torch.Tensor],
                  name: str) -> list[Site]:
    """The positive sites, sorted: at least one, each with negative activations too."""
    if not positive:
        raise DataError(f"{name} got no activations (an empty dict of sites)")
    missing = sorted(str(s) for s in positive if s not in negative)
    if missing:
        raise DataError(f"no negative activations at {', '.join(missing)}")
    return sorted(positive)


def heads_sites(positive: dict[Site, torch.Tensor],
                negative: dict[Site, torch.Tensor]) -> list[Site]:
    """ITI's sites: one or more ``heads.L``, the same for both classes."""
    if not positive:
        raise DataError("ITI needs activations at one or more heads sites")
    sites = sorted(positive)
    for s in sites:
        if s.kind != "heads":
            raise DataError(f"ITI reads attention heads (heads.L sites), not {s}")
    if set(negative) != set(positive):
        raise DataError(
            f"positive sites {[str(s) for s in sites]} != negative sites "
            f"{[str(s) for s in sorted(negative)]}"
        )
    return sites


def question_groups(groups: Any, n_pos: int, n_neg: int) -> tuple[list[Hashable],
                                                                 list[Hashable]]:
    """``groups`` as (positive ids, negative ids) of N₊ and N₋ hashable question ids."""
    if not isinstance(groups, (tuple, list)) or len(groups) != 2:
        raise DataError("groups must be a pair (positive question ids, negative question ids)")
    out = []
    for name, ids, n in (("positive", groups[0], n_pos), ("negative", groups[1], n_neg)):
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence | np.ndarray):
            raise DataError(f"the {name} question ids must be a sequence, got "
                            f"{type(ids).__name__}")
        ids = list(ids.tolist() if isinstance(ids, np.ndarray) else ids)
        if len(ids) != n:
            raise DataError(f"{len(ids)} {name} question ids for {n} {name} rows")
        for g in ids:
            if g is None or not isinstance(g, Hashable):
                raise DataError(f"a {name} question id is {g!r}: ids must be hashable values "
                                f"(e.g. the question text)")
        out.append(ids)
    return out[0], out[1]


def check_sae_site(sae_site: str, site: Site) -> None:
    """An SAE trained at ``sae_site`` (empty: unknown) can steer ``site``."""
    if sae_site and sae_site != str(site):
        raise SteeringError(
            f"the SAE was trained at {sae_site} but this SAS steers {site}; "
            f"pass layer={Site.parse(sae_site).layer}"
        )


# -- run time ----------------------------------------------------------------------------------
def check_width(what: str, expected: int, h: torch.Tensor) -> None:
    """The activation's last dimension is ``expected``; the message reads
    ``"<what> <expected> but the activation has <width>"``."""
    if h.shape[-1] != expected:
        raise SteeringError(f"{what} {expected} but the activation has {h.shape[-1]}")


def check_rows(name: str, x: torch.Tensor, width: int | None) -> None:
    """``x`` is (rows, width) (``width`` checked when given) for a fitted barrier."""
    if x.ndim != 2:
        raise SteeringError(f"{name} must be a (rows, width) tensor, got {tuple(x.shape)}")
    if width is not None and x.shape[1] != width:
        raise SteeringError(
            f"{name} has width {x.shape[1]} but the barrier was fitted on width {width}"
        )


def check_strength_rows(strength: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The (batch,) strengths as a (batch, 1, …, 1) tensor of h's dtype and device."""
    lam = strength.to(device=h.device, dtype=h.dtype).reshape(-1)
    if lam.shape[0] != h.shape[0]:
        raise SteeringError(
            f"got {lam.shape[0]} strengths for a batch of {h.shape[0]} rows"
        )
    return lam.reshape(-1, *([1] * (h.ndim - 1)))


def check_finite_strengths(lam: torch.Tensor) -> None:
    """Run-time strengths (a tensor) are finite."""
    if not bool(torch.isfinite(lam).all()):
        raise SteeringError(f"strength must be finite, got {lam.tolist()}")


def check_batch_strengths(lam: torch.Tensor, h: torch.Tensor) -> None:
    """One strength per row of the batch ``h``."""
    if lam.shape[0] != h.shape[0]:
        raise SteeringError(f"strength has {lam.shape[0]} rows for a batch of {h.shape[0]}")


def check_times(T: torch.Tensor) -> None:
    """ODESteer's integration times (its strengths) are finite."""
    if not bool(torch.isfinite(T).all()):
        raise SteeringError(
            f"the ODESteer strength T (integration time) must be finite, got "
            f"{T.flatten()[:8].tolist()}"
        )
