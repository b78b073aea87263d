"""The sparse autoencoder module (:class:`SparseAutoencoder`) and its activation functions.

For an activation x ∈ ℝᵈ (``d = d_in``) and ``m = d_sae`` features,

    pre(x) = (x − b_dec)·W_enc + b_enc        (x·W_enc + b_enc when apply_b_dec_to_input=False)
    f(x)   = σ(pre(x))                        (the codes, m values, sparse)
    x̂(f)  = f·W_dec + b_dec                   (the reconstruction)

with W_enc (d, m), b_enc (m,), W_dec (m, d), b_dec (d,); a tied SAE has W_dec = W_encᵀ. The
activation σ is one of

* ``relu``: σ(z) = max(z, 0) (Bricken et al. 2023, "Towards Monosemanticity", SAELens's
  ``"standard"``);
* ``jumprelu``: σ(z) = z·H(z − θ) with a per-feature threshold θ = exp(log θ) > 0 and H the
  Heaviside step (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction
  Fidelity with JumpReLU Sparse Autoencoders");
* ``topk``: σ(z) = TopK_k(ReLU(z)), the k largest of ReLU(z) kept per row, the rest zeroed
  (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

σ is exposed as :meth:`SparseAutoencoder.activation` so callers can apply it to arbitrary codes
(SAS steering computes σ(f(a) + λv)). Inputs of any leading shape ``(…, d)`` are computed in
float32. log θ is kept in float64 so that the float32 θ = exp(log θ) survives a save and load
through SAELens's ``threshold`` tensor bit for bit.

JumpReLU's H and the jump of σ have zero derivative in θ almost everywhere; as in the paper,
the backward pass uses straight-through estimators with the rectangle kernel
K(u) = 1[|u| < ½] and bandwidth ε: ∂H(z − θ)/∂θ := −(1/ε)·K((z − θ)/ε) (:class:`_StepFn`,
used by the L0 penalty) and ∂σ(z)/∂θ := −(θ/ε)·K((z − θ)/ε), while ∂σ(z)/∂z = H(z − θ)
(:class:`_JumpReLUFn`).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from steerlab.errors import SteeringError
from steerlab.sae.config import SAEConfig


# -- activation functions ----------------------------------------------------------------------
def topk_relu(z: torch.Tensor, k: int) -> torch.Tensor:
    """TopK_k(ReLU(z)) along the last dimension: the k largest of ReLU(z) kept, the rest 0."""
    values, idx = torch.topk(torch.relu(z), k, dim=-1)
    return torch.zeros_like(z).scatter(-1, idx, values)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_leading(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).sum(0)


class _JumpReLUFn(torch.autograd.Function):
    """σ(z) = z·H(z − θ); backward ∂/∂z = H(z − θ), ∂/∂θ := −(θ/ε)·K((z − θ)/ε) (paper)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor,
                bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return torch.where(z > theta, z, torch.zeros_like(z))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (g,) = grads
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        gz = g * (z > theta).to(g.dtype)
        gt = _sum_leading(-(theta / eps) * _rectangle((z - theta) / eps) * g)
        return gz, gt.to(theta.dtype), None


class _StepFn(torch.autograd.Function):
    """H(z − θ); backward ∂/∂θ := −(1/ε)·K((z − θ)/ε), nothing to z (paper)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor,
                bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (g,) = grads
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        gt = _sum_leading(-(1.0 / eps) * _rectangle((z - theta) / eps) * g)
        return None, gt.to(theta.dtype), None


# -- the model ---------------------------------------------------------------------------------
class SparseAutoencoder(nn.Module):
    """A ReLU, JumpReLU or TopK sparse autoencoder (see the module docstring).

    Parameters: ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in; absent
    when tied, where ``W_dec`` reads as ``W_enc.T``), ``b_dec`` (d_in,), and for JumpReLU
    ``log_threshold`` (d_sae,, float64). A new SAE has random unit decoder rows drawn from its
    own generator (``seed``), W_enc = W_decᵀ, zero biases and θ = ``jumprelu_init_threshold``;
    the global RNG is not touched. ``seed=None`` gives zero weights instead (cheap, for
    loading).
    """

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    b_dec: nn.Parameter

    def __init__(self, config: SAEConfig, *, seed: int | None = 0) -> None:
        super().__init__()
        if not isinstance(config, SAEConfig):
            raise SteeringError(f"SparseAutoencoder needs an SAEConfig, got {type(config)}")
        self.config = config
        self.train_report: dict[str, Any] | None = None
        d, m = config.d_in, config.d_sae
        if seed is None:
            rows = torch.zeros(m, d)
        else:
            rows = _unit_rows(torch.randn(m, d, generator=torch.Generator().manual_seed(seed)))
        self.W_enc = nn.Parameter(rows.T.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(m))
        if not config.tied:
            self.W_dec = nn.Parameter(rows.clone())
        self.b_dec = nn.Parameter(torch.zeros(d))
        if config.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(
                torch.full((m,), math.log(config.jumprelu_init_threshold), dtype=torch.float64))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "W_dec" and self.config.tied:
                return self.W_enc.T
            raise

    def extra_repr(self) -> str:
        c = self.config
        extra = f", k={c.k}" if c.k is not None else ""
        tied = ", tied" if c.tied else ""
        where = f", site={c.site}" if c.site else ""
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{extra}{tied}{where}"

    # -- pieces --------------------------------------------------------------------------------
    def decoder_weight(self) -> torch.Tensor:
        """W_dec (d_sae, d_in): the parameter, or W_encᵀ when tied."""
        if self.config.tied:
            return self.W_enc.T
        return cast(torch.Tensor, self.W_dec)

    def threshold(self) -> torch.Tensor:
        """θ = exp(log θ) (d_sae,), float32; JumpReLU SAEs only."""
        if self.config.architecture != "jumprelu":
            raise SteeringError(f"a {self.config.architecture} SAE has no threshold")
        return self._theta64().to(torch.float32)

    def _theta64(self) -> torch.Tensor:
        return torch.exp(cast(torch.Tensor, self.log_threshold))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`SteeringError` unless ``x`` is a tensor of shape (…, d_in)."""
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            got = "a 0-d tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise SteeringError(f"the SAE reads tensors of shape (..., d_in = "
                                f"{self.config.d_in}), got {got}")
        if x.shape[-1] != self.config.d_in:
            raise SteeringError(f"the SAE reads width d_in = {self.config.d_in} but the input "
                                f"has width {x.shape[-1]} (shape {tuple(x.shape)})")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(x − b_dec)·W_enc + b_enc (x·W_enc + b_enc when apply_b_dec_to_input is False)."""
        self.check_input(x)
        x = x.to(torch.float32)
        if self.config.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """σ applied to pre-activations or any codes (…, d_sae): ReLU, the JumpReLU gate
        z·H(z − θ), or TopK_k(ReLU(z)). Differentiable in θ (straight-through) when training."""
        if pre.shape[-1] != self.config.d_sae:
            raise SteeringError(f"the SAE has d_sae = {self.config.d_sae} features but the "
                                f"codes have width {pre.shape[-1]}")
        pre = pre.to(torch.float32)
        arch = self.config.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch == "topk":
            return topk_relu(pre, cast(int, self.config.k))
        theta = self.threshold()
        if torch.is_grad_enabled() and self.log_threshold.requires_grad:
            return cast(torch.Tensor,
                        _JumpReLUFn.apply(pre, theta, self.config.jumprelu_bandwidth))
        return torch.where(pre > theta, pre, torch.zeros_like(pre))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes f(x) = σ(pre(x)), shape (…, d_sae), float32."""
        return self.activation(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction f·W_dec + b_dec, shape (…, d_in), float32."""
        if not isinstance(f, torch.Tensor) or f.ndim == 0 or f.shape[-1] != self.config.d_sae:
            width = f.shape[-1] if isinstance(f, torch.Tensor) and f.ndim else None
            raise SteeringError(f"the SAE decodes codes of width d_sae = {self.config.d_sae}, "
                                f"got width {width}")
        return f.to(torch.float32) @ self.decoder_weight() + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction x̂(f(x))."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder_(self) -> SparseAutoencoder:
        """Rescale the decoder rows to unit norm (the encoder columns when tied); in place."""
        if self.config.tied:
            self.W_enc.div_(torch.linalg.vector_norm(self.W_enc, dim=0, keepdim=True)
                            .clamp_min(1e-12))
        else:
            W = cast(torch.Tensor, self.W_dec)
            W.div_(torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(1e-12))
        return self

    @torch.no_grad()
    def _rescale_input_(self, factor: float) -> None:
        """Make the SAE read activations scaled by ``1/factor`` relative to now, with codes
        scaled by ``1/factor``: b_enc, b_dec and θ divided by ``factor``."""
        self.b_enc.div_(factor)
        self.b_dec.div_(factor)
        if self.config.architecture == "jumprelu":
            self.log_threshold.sub_(math.log(factor))


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-12)


__all__ = ["SparseAutoencoder", "topk_relu"]
