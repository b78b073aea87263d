"""INNSteer's invertible map φ: a fixed standardisation followed by tanh-bounded affine
coupling layers (zuko), with a direct inference path. See :mod:`steerlab.methods.inn`."""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import nn
from torch.distributions import constraints
from zuko.flows.coupling import GeneralCouplingTransform
from zuko.transforms import ComposedTransform, Transform

from steerlab.errors import SteeringError

MaskKind = Literal["halves", "random"]
MASKS: tuple[str, ...] = ("halves", "random")
STD_FLOOR = 1e-6  # σ = max(std, STD_FLOOR · mean std): constant dimensions stay invertible


# -- the invertible map ------------------------------------------------------------------------
class TanhAffineTransform(Transform):
    """y = x·exp(tanh(s)) + t, element-wise: the coupling layers' univariate map."""

    domain = constraints.real
    codomain = constraints.real
    bijective = True
    sign = +1

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.shift = shift
        self.log_scale = torch.tanh(scale)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.log_scale.exp() + self.shift

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.shift) * torch.exp(-self.log_scale)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.log_scale.expand(x.shape)


class StandardiseTransform(Transform):
    """z = (h − μ)/σ over the last dimension; log|det| = −Σ log σ (one value per row)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.mean = mean
        self.std = std

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.std + self.mean

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (-self.std.log().sum()).expand(x.shape[:-1])


def coupling_masks(features: int, n_layers: int, kind: MaskKind, seed: int) -> list[torch.Tensor]:
    """Boolean masks (True = conditioning part) of ``n_layers`` coupling layers."""
    if kind not in MASKS:
        raise SteeringError(f"unknown masks {kind!r}; use halves or random")
    half = features // 2
    if kind == "halves":
        first = torch.arange(features) < half
        return [(first if i % 2 == 0 else ~first).clone() for i in range(n_layers)]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        m = torch.zeros(features, dtype=torch.bool)
        m[torch.randperm(features, generator=g)[:half]] = True
        out.append(m)
    return out


class LatentFlow(nn.Module):
    """φ = couplings ∘ standardisation (see the module docstring); float32, batched over rows.

    Args:
        features: width d of the activations (at least 2).
        n_layers: number of affine coupling layers.
        hidden: width of the conditioners' hidden layers; ``hidden_layers`` of them.
        masks: ``"halves"`` or ``"random"``; ``seed`` seeds the random masks and the
            conditioners' initial weights (the global RNG is left untouched).
    """

    def __init__(self, features: int, n_layers: int = 4, hidden: int = 512,
                 hidden_layers: int = 2, masks: MaskKind = "halves", seed: int = 0) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        if features < 2:
            raise SteeringError(
                f"INNSteer needs activations of width at least 2 to split them into coupling "
                f"halves, got {features}"
            )
        self.features = int(features)
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers = []
            for mask in coupling_masks(features, n_layers, masks, seed):
                layer = GeneralCouplingTransform(
                    features, mask=mask, univariate=TanhAffineTransform,
                    hidden_features=(hidden,) * hidden_layers, activation=nn.ReLU)
                last = layer.hyper[-1]  # zuko.nn.Linear
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
                layers.append(layer)
        self.couplings = nn.ModuleList(layers)

    def set_standardisation(self, x: torch.Tensor) -> None:
        """Fix μ and σ from training rows (N, d)."""
        mean = x.mean(0)
        std = x.std(0)
        floor = STD_FLOOR * float(std.mean().clamp_min(1e-12))
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(floor))

    def coupling_transform(self) -> ComposedTransform:
        return ComposedTransform(*[c() for c in self.couplings])

    def transform(self) -> ComposedTransform:
        """φ as one zuko transform (``.inv`` for φ⁻¹, ``.call_and_ladj`` for log|det J|)."""
        return ComposedTransform(StandardiseTransform(self.mean, self.std),
                                 *[c() for c in self.couplings])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.transform()(h)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return self.transform().inv(z)

    def forward_and_logdet(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z = φ(h) and log|det ∂φ/∂h| per row."""
        z, ladj = self.transform().call_and_ladj(h)
        return z, ladj

    # A direct path for inference: the same arithmetic as the zuko transforms, without
    # building transform objects and index copies per call (for d = 576 at batch 1 it halves
    # the cost, which the conditioners' matrix products then dominate).
    # ``test_fast_path_equals_zuko`` checks both paths agree.
    def _splits(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Per coupling: conditioning and transformed indices, and a slice code: k > 0 when
        the conditioning part is the first k dimensions, −k when the transformed part is the
        first k (conditioning part last), 0 when the mask is not two contiguous halves."""
        cached = getattr(self, "_split_cache", None)
        if cached is None or cached[0] != self.mean.device:
            splits: list[tuple[torch.Tensor, torch.Tensor, int]] = []
            for c in self.couplings:
                m = cast(torch.Tensor, c.mask)
                ia, ib = m.nonzero().reshape(-1), (~m).nonzero().reshape(-1)
                k, n = int(m.sum()), m.numel()
                code = k if bool(m[:k].all()) else (-(n - k) if bool(m[n - k:].all()) else 0)
                splits.append((ia, ib, code))
            cached = (self.mean.device, splits)
            self._split_cache = cached
        return cached[1]

    def _couple(self, i: int, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        ia, ib, code = self._splits()[i]
        if code > 0:
            x_a, x_b = x[..., :code], x[..., code:]
        elif code < 0:
            x_b, x_a = x[..., :-code], x[..., -code:]
        else:
            x_a, x_b = x[..., ia], x[..., ib]
        hyper = cast(nn.Module, self.couplings[i].hyper)
        p = hyper(x_a).unflatten(-1, (-1, 2))
        t, s = p[..., 0], torch.tanh(p[..., 1])
        y_b = (x_b - t) * torch.exp(-s) if inverse else x_b * s.exp() + t
        if code > 0:
            return torch.cat([x_a, y_b], dim=-1)
        if code < 0:
            return torch.cat([y_b, x_a], dim=-1)
        y = x.clone()
        y[..., ib] = y_b
        return y

    def fast_forward(self, h: torch.Tensor) -> torch.Tensor:
        """φ(h) by the direct path (inference)."""
        x = (h - self.mean) / self.std
        for i in range(len(self.couplings)):
            x = self._couple(i, x, inverse=False)
        return x

    def fast_inverse(self, z: torch.Tensor) -> torch.Tensor:
        """φ⁻¹(z) by the direct path (inference)."""
        y = z
        for i in reversed(range(len(self.couplings))):
            y = self._couple(i, y, inverse=True)
        return y * self.std + self.mean
