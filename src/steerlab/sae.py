"""Sparse autoencoders (SAEs) on residual-stream activations: trained here, or loaded from
SAELens's on-disk format.

**Model.** For an activation x ∈ ℝᵈ (``d = d_in``) and ``m = d_sae`` features,

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

**Training** (:func:`train_sae`; ours where not attributed). Activations are scaled by a
constant c so that the centred data have unit mean squared norm, E‖c(x − x̄)‖² = 1 (the
JumpReLU paper normalises to unit mean squared norm; centring makes the scale independent of
the residual stream's mean). In those units the reconstruction loss of a batch,
L_rec = mean‖x − x̂‖², is about its fraction of variance unexplained, and all coefficients and
the JumpReLU threshold/bandwidth are read in those units. After training c is folded back
(b_enc, b_dec and θ divided by c, the codes scale with the input), so the returned SAE reads raw
activations and its decoder rows keep unit norm. Initialisation (standard): W_dec rows random
unit vectors, W_enc = W_decᵀ, b_enc = 0, b_dec = the data mean (the mean, not the geometric
median: it streams), log θ = log ``jumprelu_init_threshold``. Adam (β = 0.9, 0.999), learning
rate warmed up linearly over the first 5 % of steps and decayed linearly to 0 over the last
20 %; the decoder rows are renormalised to unit norm after every step (Bricken et al.). The
log-thresholds get 10 × the learning rate: Adam moves log θ by about the learning rate per step,
so at a rate of 1e-3 θ could grow only e-fold per thousand steps, while our CPU-sized runs take
hundreds to a few thousand steps (the paper's take hundreds of thousands). Losses:

* relu: L = L_rec + λ₁·mean Σᵢ fᵢ (L1; the decoder has unit-norm rows, so this is Anthropic's
  Σᵢ fᵢ‖W_dec,ᵢ‖); λ₁ warmed up linearly over the first 5 % of steps.
* jumprelu: L = L_rec + λ₀·mean Σᵢ H(preᵢ − θᵢ) (L0). H and the jump of σ have zero derivative
  in θ almost everywhere; as in the paper, the backward pass uses straight-through estimators
  with the rectangle kernel K(u) = 1[|u| < ½] and bandwidth ε:
  ∂H(z − θ)/∂θ := −(1/ε)·K((z − θ)/ε) and ∂σ(z)/∂θ := −(θ/ε)·K((z − θ)/ε), while
  ∂σ(z)/∂z = H(z − θ). λ₀ warmed up as λ₁.
* topk: L = L_rec + α·L_aux with the AuxK loss of Gao et al.: e = x − x̂ (detached), ê the
  decoding (no bias) of the k_aux largest pre-activations among the dead features only, and
  L_aux = Σ‖e − ê‖²/Σ‖e‖² over the batch, scaled by min(n_dead/k_aux, 1) as SAELens does;
  α = 1/32 and k_aux = d/2 (Gao et al.'s choices).

Dead features: a feature is dead when it has not fired (a non-zero code) on the last
``dead_tokens`` training tokens. TopK SAEs get the AuxK loss on them. ReLU and JumpReLU SAEs
are *resampled* (Bricken et al.): every ``dead_tokens`` tokens, until 70 % of training, each
dead feature gets a decoder row equal to a normalised centred input (x − b_dec)/‖x − b_dec‖ drawn
from the current batch with probability ∝ its squared reconstruction error, an encoder column
equal to that direction times 0.2 × the mean norm of the live encoder columns, b_enc = 0,
θ = its initial value, and fresh Adam moments.

**Quality** (:func:`evaluate_sae`, :class:`TrainReport`): FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over the
evaluation data, mean L0 = mean number of non-zero codes per row, dead fraction = fraction of
features that fire on no evaluation row.

**SAELens format** (:func:`save_saelens`, :func:`load_saelens`). A folder with ``cfg.json`` and
``sae_weights.safetensors`` (tensors ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and, for
JumpReLU, ``threshold``), read from SAELens 6.18 (``sae_lens/saes/sae.py`` ``save_model``,
``sae_lens/loading/pretrained_sae_loaders.py``, ``topk_sae.py``, ``jumprelu_sae.py``). We write
the format ourselves rather than depend on ``sae-lens``: its dependency tree (TransformerLens
and more) is heavy and its training loop is tied to TransformerLens hooks, while we need only
the format. Published SAELens SAEs (ReLU "standard", JumpReLU such as Gemma Scope, TopK) load
where a user has their files; pre-6.0 configs (``hook_point``, TopK as ``activation_fn: topk``
with ``activation_fn_kwargs: {k}``, boolean ``normalize_activations``) are read too. Weights
are safetensors only, never pickle.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from steerlab.errors import ArtifactError, DataError, SteeringError
from steerlab.io import atomic_write

Architecture = Literal["relu", "jumprelu", "topk"]
ARCHITECTURES: tuple[str, ...] = ("relu", "jumprelu", "topk")
# SAELens architecture names -> ours (and back).
SAELENS_ARCHITECTURES: dict[str, str] = {"standard": "relu", "jumprelu": "jumprelu",
                                         "topk": "topk"}
TO_SAELENS: dict[str, str] = {v: k for k, v in SAELENS_ARCHITECTURES.items()}
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
STEERLAB_FORMAT_VERSION = 1

# An activation source: one (N, d) tensor, a re-iterable of such chunks (a list, or
# steerlab.corpus.ActivationShards), or a callable returning a fresh iterable of chunks.
Activations = torch.Tensor | Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]

_HOOK_RE = re.compile(r"^blocks\.(?P<layer>\d+)\.hook_(?P<kind>resid_pre|resid_post)$")
_SITE_RE = re.compile(r"^(?P<kind>resid_pre|resid_post)\.(?P<layer>\d+)$")
_STAT_ROWS = 65536  # rows per float64 block in the statistics pass
_EVAL_ROWS = 4096  # rows per block when evaluating
_TINY64 = torch.finfo(torch.float64).tiny  # exp(log(tiny)) rounds to 0.0 in float32
THRESHOLD_LR_FACTOR = 10.0  # default JumpReLU log-threshold learning rate = this × lr


# -- configuration -----------------------------------------------------------------------------
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

    def __post_init__(self) -> None:
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


# -- activations -------------------------------------------------------------------------------
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


# -- activation sources ------------------------------------------------------------------------
def _reader(activations: Activations, name: str) -> Callable[[], Iterator[torch.Tensor]]:
    """A function giving a fresh iterator over the raw chunks of ``activations``."""
    if isinstance(activations, torch.Tensor):
        tensor = activations
        return lambda: iter((tensor,))
    if callable(activations):
        fn = activations

        def call() -> Iterator[torch.Tensor]:
            got = fn()
            if isinstance(got, torch.Tensor):
                return iter((got,))
            try:
                return iter(got)
            except TypeError as exc:
                raise DataError(f"the {name} callable must return an iterable of tensors, "
                                f"got {type(got).__name__}") from exc
        return call
    try:
        first = iter(activations)
    except TypeError as exc:
        raise DataError(f"{name} must be an (N, d) tensor, an iterable of (n, d) chunks or a "
                        f"callable returning one, got {type(activations).__name__}") from exc
    if first is activations:
        raise DataError(f"{name} is a one-shot iterator, but it is read several times; pass "
                        f"a list of chunks or a callable returning a fresh iterator")
    src = activations
    return lambda: iter(src)


def _chunks(read: Callable[[], Iterator[torch.Tensor]], d_in: int,
            name: str) -> Iterator[torch.Tensor]:
    """Validated (n, d_in) chunks, empty ones skipped."""
    for i, chunk in enumerate(read()):
        where = f"{name} chunk {i}"
        if not isinstance(chunk, torch.Tensor):
            raise DataError(f"{where} is a {type(chunk).__name__}, not a tensor")
        if chunk.ndim < 2:
            raise DataError(f"{where} must have shape (N, {d_in}), got {tuple(chunk.shape)}")
        if chunk.shape[-1] != d_in:
            raise DataError(f"{where} has width {chunk.shape[-1]} but the SAE reads d_in = "
                            f"{d_in}")
        if not chunk.is_floating_point():
            raise DataError(f"{where} must be a floating-point tensor, got {chunk.dtype}")
        rows = chunk.reshape(-1, d_in)
        if rows.shape[0] == 0:
            continue
        for s in range(0, rows.shape[0], _STAT_ROWS):
            if not bool(torch.isfinite(rows[s:s + _STAT_ROWS]).all()):
                raise DataError(f"{where} has non-finite values (NaN or inf)")
        yield rows


@dataclass
class _Moments:
    """Streaming count, mean and centred sum of squares (Chan et al.'s pairwise update)."""

    n: int = 0
    mean: torch.Tensor | None = None  # float64 (d,)
    m2: float = 0.0  # Σ‖x − mean‖²

    def add(self, x: torch.Tensor) -> None:
        for s in range(0, x.shape[0], _STAT_ROWS):
            b = x[s:s + _STAT_ROWS].to(torch.float64)
            nb = b.shape[0]
            mb = b.mean(0)
            m2b = float(((b - mb) ** 2).sum())
            if self.mean is None:
                self.n, self.mean, self.m2 = nb, mb, m2b
                continue
            n = self.n + nb
            delta = mb - self.mean.to(mb.device)
            self.m2 += m2b + float((delta ** 2).sum()) * self.n * nb / n
            self.mean = self.mean.to(mb.device) + delta * (nb / n)
            self.n = n


# -- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, activations: Activations) -> dict[str, Any]:
    """FVU, mean L0 and dead fraction of ``sae`` on ``activations`` (same input types as
    :func:`train_sae`; streamed chunk by chunk).

    Returns ``{"fvu", "mean_l0", "dead_fraction", "n_tokens"}`` with
    FVU = Σ‖x − x̂‖²/Σ‖x − x̄‖², mean L0 = mean count of non-zero codes per row and dead
    fraction = share of features non-zero on no row.
    """
    if not isinstance(sae, SparseAutoencoder):
        raise SteeringError(f"evaluate_sae needs a SparseAutoencoder, got {type(sae)}")
    read = _reader(activations, "activations")
    device = sae.b_dec.device
    moments = _Moments()
    sse = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.config.d_sae, dtype=torch.bool, device=device)
    for chunk in _chunks(read, sae.config.d_in, "activations"):
        moments.add(chunk)
        for s in range(0, chunk.shape[0], _EVAL_ROWS):
            x = chunk[s:s + _EVAL_ROWS].to(device=device, dtype=torch.float32)
            f = sae.encode(x)
            x_hat = sae.decode(f)
            sse += float(((x_hat - x).to(torch.float64) ** 2).sum())
            nz = f != 0
            l0 += float(nz.sum())
            fired |= nz.any(0)
    if moments.n == 0:
        raise DataError("the activations are empty")
    if moments.m2 <= 0:
        raise DataError("the activations have zero variance; FVU is undefined")
    return {"fvu": sse / moments.m2, "mean_l0": l0 / moments.n,
            "dead_fraction": float((~fired).sum()) / sae.config.d_sae, "n_tokens": moments.n}


# -- training ----------------------------------------------------------------------------------
@dataclass
class TrainReport:
    """How training went. ``fvu``, ``mean_l0`` and ``dead_fraction`` are measured on the
    evaluation data (``eval_on``: ``"eval"`` when ``eval_activations`` was given, else
    ``"train"``); ``history`` holds the mean training loss of each epoch and ``recon_history``
    its reconstruction part (normalised units, about the training FVU). ``steps`` counts
    optimiser steps, ``n_resampled`` resampled features (relu, jumprelu) and ``input_scale`` is
    the factor c of the normalisation E‖c(x − x̄)‖² = 1 (already folded into the SAE)."""

    fvu: float
    mean_l0: float
    dead_fraction: float
    train_seconds: float
    tokens_seen: int
    history: list[float] = field(default_factory=list)
    recon_history: list[float] = field(default_factory=list)
    steps: int = 0
    eval_on: str = "train"
    n_resampled: int = 0
    input_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if not _is_int(value) or cast(int, value) < minimum:
        raise SteeringError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return cast(int, value)


def _check_number(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SteeringError(f"{name} must be a number, got {value!r}")
    f = float(value)
    if not math.isfinite(f) or f < 0 or (f == 0 and not allow_zero):
        need = "non-negative" if allow_zero else "positive"
        raise SteeringError(f"{name} must be a finite, {need} number, got {value!r}")
    return f


def _batches(read: Callable[[], Iterator[torch.Tensor]], d_in: int, batch_size: int,
             g: torch.Generator, name: str) -> Iterator[torch.Tensor]:
    """One epoch of shuffled batches: rows permuted within each chunk, a partial batch at the
    end of a chunk completed from the next one, the last partial batch of the epoch kept."""
    carry: torch.Tensor | None = None
    for chunk in _chunks(read, d_in, name):
        n = chunk.shape[0]
        perm = torch.randperm(n, generator=g).to(chunk.device)
        pos = 0
        if carry is not None:
            need = batch_size - carry.shape[0]
            carry = torch.cat([carry, chunk[perm[:need]].to(carry.device)])
            pos = min(need, n)
            if carry.shape[0] < batch_size:
                continue
            yield carry
            carry = None
        while n - pos >= batch_size:
            yield chunk[perm[pos:pos + batch_size]]
            pos += batch_size
        if pos < n:
            carry = chunk[perm[pos:]]
    if carry is not None:
        yield carry


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5 % of steps, linear decay to 0 over the last 20 %."""
    warm = max(1, total // 20)
    decay = max(1, total // 5)
    f = min(1.0, (step + 1) / warm)
    return max(0.0, min(f, (total - step) / decay))


@torch.no_grad()
def _resample(sae: SparseAutoencoder, dead: torch.Tensor, x: torch.Tensor,
              opt: torch.optim.Optimizer, g: torch.Generator) -> int:
    """Bricken et al.'s resampling of the ``dead`` features from the batch ``x``."""
    idx = torch.nonzero(dead).reshape(-1)
    n_dead = int(idx.numel())
    if n_dead == 0:
        return 0
    err = ((sae(x) - x) ** 2).sum(-1).to(torch.float64).cpu()
    if not bool((err > 0).any()):
        return 0
    pick = torch.multinomial(err, n_dead, replacement=n_dead > x.shape[0], generator=g)
    centred = x[pick.to(x.device)] - sae.b_dec
    dirs = _unit_rows(centred)  # (n_dead, d)
    alive = ~dead
    col_norms = torch.linalg.vector_norm(sae.W_enc, dim=0)
    scale = 0.2 * float(col_norms[alive].mean()) if bool(alive.any()) else 0.2
    if sae.config.tied:
        sae.W_enc[:, idx] = dirs.T
    else:
        cast(torch.Tensor, sae.W_dec)[idx] = dirs
        sae.W_enc[:, idx] = dirs.T * scale
    sae.b_enc[idx] = 0.0
    # fresh Adam moments for the touched rows/columns
    touched: list[tuple[torch.Tensor, int]] = [(sae.W_enc, 1), (sae.b_enc, 0)]
    if not sae.config.tied:
        touched.append((cast(torch.Tensor, sae.W_dec), 0))
    if sae.config.architecture == "jumprelu":
        sae.log_threshold[idx] = math.log(sae.config.jumprelu_init_threshold)
        touched.append((sae.log_threshold, 0))
    for p, dim in touched:
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(dim, idx, 0.0)
    return n_dead


def train_sae(
    activations: Activations,
    config: SAEConfig,
    *,
    epochs: int = 3,
    batch_size: int = 1024,
    lr: float = 3e-3,
    threshold_lr: float | None = None,
    l1_coefficient: float = 0.05,
    l0_coefficient: float = 2e-3,
    aux_coefficient: float = 1 / 32,
    aux_k: int | None = None,
    resample: bool = True,
    dead_tokens: int | None = None,
    eval_activations: Activations | None = None,
    init: SparseAutoencoder | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> tuple[SparseAutoencoder, TrainReport]:
    """Train a sparse autoencoder on ``activations`` (losses in the module docstring).

    The defaults target a small model's residual stream (d_in ≈ 576, d_sae = 4–8 × d_in) and
    100k–500k tokens on a CPU: 3 epochs of 1024-row batches give hundreds to ~1500 steps (one
    step at d_in = 576, d_sae = 4608 took ≈ 1 s on one busy core, so 200k tokens at 8× take
    ~10 min there; 4× or two free cores roughly halve that), hence the higher-than-usual
    learning rate 3e-3 (on synthetic data 3e-3–4e-3 beat 1e-3 for all three architectures at
    this step count). λ₁ = 0.05 and λ₀ = 2e-3 are in normalised units, where the mean token
    variance is 1: λ₁ shrinks a code of typical size 1/√L0 by λ₁/2, and λ₀ keeps a feature on
    a token only if it lowers that token's squared error by more than 0.2 % of the mean token
    variance.

    Args:
        activations: an ``(N, d_in)`` float tensor, or a source of ``(n, d_in)`` chunks that
            can be read several times (one statistics pass, one pass per epoch, one
            evaluation pass): a list of tensors, a re-iterable object such as
            :class:`steerlab.corpus.ActivationShards` (one shard in memory at a time), or a
            callable returning a fresh iterable. One-shot iterators are refused. Rows are
            shuffled within each chunk each epoch (chunk order is kept, so shuffle shards that
            are ordered by topic); a tensor is one chunk, so ``x`` and ``[x]`` train alike,
            bit for bit.
        config: the SAE's shape and architecture.
        epochs: passes over the data.
        batch_size: rows per optimiser step.
        lr: Adam learning rate (peak of the schedule).
        threshold_lr: learning rate of the JumpReLU log-thresholds; default 10 × ``lr``.
        l1_coefficient: λ₁ of the L1 penalty (relu).
        l0_coefficient: λ₀ of the L0 penalty (jumprelu).
        aux_coefficient: α of the AuxK loss (topk); 0 turns it off.
        aux_k: k_aux of the AuxK loss (topk); default d_in // 2.
        resample: resample dead features (relu, jumprelu).
        dead_tokens: a feature is dead when it has not fired on this many of the most recent
            training tokens; default min(100 000, half an epoch), at least one batch.
        eval_activations: data for the report's FVU, L0 and dead fraction (default: the
            training data).
        init: start from this SAE's weights (its config must equal ``config``); it is not
            modified.
        device: where to train; chunks are moved there a batch at a time.
        seed: seeds a private ``torch.Generator`` (initialisation, shuffling, resampling);
            the global RNG is not touched. Same seed, data and thread count: same SAE, bit
            for bit.
        progress: show a tqdm bar.

    Returns:
        the trained SAE (on ``device``, reading raw activations) and its :class:`TrainReport`.

    Raises:
        DataError: empty, malformed, non-finite or constant activations.
        SteeringError: bad settings, or a non-finite loss (training diverged; nothing is
            returned).
    """
    if not isinstance(config, SAEConfig):
        raise SteeringError(f"config must be an SAEConfig, got {type(config).__name__}")
    epochs = _check_count("epochs", epochs)
    batch_size = _check_count("batch_size", batch_size)
    lr = _check_number("lr", lr, allow_zero=False)
    lr_theta = (_check_number("threshold_lr", threshold_lr, allow_zero=False)
                if threshold_lr is not None else THRESHOLD_LR_FACTOR * lr)
    l1 = _check_number("l1_coefficient", l1_coefficient, allow_zero=True)
    l0 = _check_number("l0_coefficient", l0_coefficient, allow_zero=True)
    alpha = _check_number("aux_coefficient", aux_coefficient, allow_zero=True)
    if aux_k is not None:
        aux_k = _check_count("aux_k", aux_k)
    if dead_tokens is not None:
        dead_tokens = _check_count("dead_tokens", dead_tokens)
    if not _is_int(seed):
        raise SteeringError(f"seed must be an integer, got {seed!r}")
    if init is not None:
        if not isinstance(init, SparseAutoencoder):
            raise SteeringError(f"init must be a SparseAutoencoder, got {type(init)}")
        if init.config != config:
            raise SteeringError("init's config differs from config; pass init.config")
    dev = torch.device(device)
    start = time.perf_counter()
    read = _reader(activations, "activations")
    d = config.d_in

    # statistics pass: count, mean, scale c with E‖c(x − x̄)‖² = 1
    moments = _Moments()
    for chunk in _chunks(read, d, "activations"):
        moments.add(chunk)
    if moments.n == 0 or moments.mean is None:
        raise DataError("the activations are empty")
    if moments.m2 <= 0:
        raise DataError("the activations have zero variance; there is nothing to encode")
    n_rows = moments.n
    c = math.sqrt(n_rows / moments.m2)
    mean = moments.mean.to(torch.float32).cpu()

    # initialise in normalised units
    g = torch.Generator().manual_seed(seed)
    if init is not None:
        sae = copy.deepcopy(init).cpu()
        sae._rescale_input_(1.0 / c)
    else:
        sae = SparseAutoencoder(config, seed=None)
        with torch.no_grad():
            rows = _unit_rows(torch.randn(config.d_sae, d, generator=g))
            sae.W_enc.copy_(rows.T)
            if not config.tied:
                cast(torch.Tensor, sae.W_dec).copy_(rows)
            sae.b_enc.zero_()
            sae.b_dec.copy_(mean * c)
            if not config.apply_b_dec_to_input:
                sae.b_enc.copy_(-(mean * c) @ sae.W_enc)
    sae.normalize_decoder_()
    sae = sae.to(dev).train()
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in sae.named_parameters() if n != "log_threshold"], "lr": lr,
         "peak": lr}]
    if config.architecture == "jumprelu":
        groups.append({"params": [sae.log_threshold], "lr": lr_theta, "peak": lr_theta})
    opt = torch.optim.Adam(groups, betas=(0.9, 0.999))

    steps_per_epoch = math.ceil(n_rows / batch_size)
    total = epochs * steps_per_epoch
    total_tokens = epochs * n_rows
    window = dead_tokens if dead_tokens is not None else min(100_000, n_rows // 2)
    window = max(window, min(batch_size, n_rows))
    arch = config.architecture
    k_aux_base = aux_k if aux_k is not None else max(1, d // 2)
    since_fired = torch.zeros(config.d_sae, dtype=torch.int64, device=dev)
    next_check = window
    resample_until = int(0.7 * total_tokens)
    n_resampled = 0
    tokens = 0
    step = 0
    history: list[float] = []
    recon_history: list[float] = []

    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=f"SAE {arch} {d}->{config.d_sae}", unit="step", leave=False,
               disable=not progress)
    try:
        for epoch in range(epochs):
            loss_sum = recon_sum = 0.0
            rows_sum = 0
            for batch in _batches(read, d, batch_size, g, "activations"):
                x = batch.to(device=dev, dtype=torch.float32) * c
                for group in opt.param_groups:
                    group["lr"] = group["peak"] * _lr_factor(step, total)
                warm = min(1.0, (step + 1) / max(1, total // 20))
                pre = sae.pre_acts(x)
                f = sae.activation(pre)
                x_hat = sae.decode(f)
                recon = ((x_hat - x) ** 2).sum(-1).mean()
                loss = recon
                if arch == "relu" and l1 > 0:
                    loss = loss + warm * l1 * f.sum(-1).mean()
                elif arch == "jumprelu" and l0 > 0:
                    step_fn = _StepFn.apply(pre, sae.threshold(), config.jumprelu_bandwidth)
                    loss = loss + warm * l0 * cast(torch.Tensor, step_fn).sum(-1).mean()
                elif arch == "topk" and alpha > 0:
                    dead = since_fired >= window
                    n_dead = int(dead.sum())
                    if n_dead:
                        k_aux = min(k_aux_base, n_dead)
                        e = (x - x_hat).detach()
                        vals, idx = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1)
                        e_hat = torch.zeros_like(pre).scatter(-1, idx, vals) @ \
                            sae.decoder_weight()
                        aux = ((e_hat - e) ** 2).sum() / (e ** 2).sum().clamp_min(1e-12)
                        loss = loss + alpha * min(n_dead / k_aux_base, 1.0) * aux
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise SteeringError(
                        f"SAE training diverged at step {step + 1} of {total} (epoch "
                        f"{epoch + 1}): the loss is {value}; lower lr (now {lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sae.normalize_decoder_()
                n_b = x.shape[0]
                with torch.no_grad():
                    fired = (f != 0).any(0)
                    since_fired += n_b
                    since_fired[fired] = 0
                tokens += n_b
                step += 1
                loss_sum += value * n_b
                recon_sum += float(recon.detach()) * n_b
                rows_sum += n_b
                if arch != "topk" and resample and tokens >= next_check:
                    next_check = tokens + window
                    if tokens <= resample_until:
                        n_resampled += _resample(sae, since_fired >= window, x, opt, g)
                        since_fired[since_fired >= window] = 0
                bar.update(1)
                if step % 10 == 0 or step == total:
                    l0_now = float((f != 0).sum(-1).float().mean())
                    dead_now = float((since_fired >= window).float().mean())
                    bar.set_postfix(loss=f"{value:.4f}", l0=f"{l0_now:.1f}",
                                    dead=f"{dead_now:.2f}")
            history.append(loss_sum / max(rows_sum, 1))
            recon_history.append(recon_sum / max(rows_sum, 1))
    finally:
        bar.close()

    if not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
        raise SteeringError(f"SAE training diverged: non-finite weights after {step} steps; "
                            f"lower lr (now {lr:g})")
    # back to raw units
    sae.eval()
    sae._rescale_input_(c)
    train_seconds = time.perf_counter() - start
    ev = evaluate_sae(sae, eval_activations if eval_activations is not None else activations)
    report = TrainReport(
        fvu=float(ev["fvu"]), mean_l0=float(ev["mean_l0"]),
        dead_fraction=float(ev["dead_fraction"]), train_seconds=round(train_seconds, 3),
        tokens_seen=tokens, history=history, recon_history=recon_history, steps=step,
        eval_on="eval" if eval_activations is not None else "train",
        n_resampled=n_resampled, input_scale=c)
    sae.train_report = report.to_dict()
    return sae, report


# -- SAELens format ----------------------------------------------------------------------------
def _finite_json(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


def saelens_config(sae: SparseAutoencoder) -> dict[str, Any]:
    """The ``cfg.json`` contents for ``sae`` (SAELens ≥ 6 layout plus a ``steerlab`` object).

    ``hook_name`` and ``model_name`` are written both inside ``metadata`` (where SAELens ≥ 6
    reads them) and at the top level (where older readers do; SAELens ≥ 6 drops unknown
    top-level keys). No ``sae_lens_version`` is claimed.
    """
    c = sae.config
    cfg: dict[str, Any] = {
        "architecture": TO_SAELENS[c.architecture],
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if c.architecture == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["metadata"] = {"model_name": c.model_name, "hook_name": c.hook_name}
    cfg["hook_name"] = c.hook_name
    cfg["model_name"] = c.model_name
    cfg["steerlab"] = {
        "format_version": STEERLAB_FORMAT_VERSION,
        "architecture": c.architecture,
        "site": c.site,
        "tied": c.tied,
        "jumprelu_init_threshold": c.jumprelu_init_threshold,
        "jumprelu_bandwidth": c.jumprelu_bandwidth,
        "train_report": _finite_json(sae.train_report),
    }
    return cfg


def saelens_tensors(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The ``sae_weights.safetensors`` tensors: float32, CPU, W_dec materialised when tied."""
    out = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.decoder_weight(),
           "b_dec": sae.b_dec}
    if sae.config.architecture == "jumprelu":
        out["threshold"] = sae.threshold()
    return {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
            for k, v in out.items()}


def save_saelens(sae: SparseAutoencoder, folder: str | os.PathLike[str]) -> Path:
    """Write ``sae`` as a SAELens folder (``cfg.json``, ``sae_weights.safetensors``).

    A new folder is written beside the target and renamed into place; into an existing folder
    each file is replaced atomically (weights first), and other files there are left alone.
    Returns the folder.
    """
    if not isinstance(sae, SparseAutoencoder):
        raise SteeringError(f"save_saelens needs a SparseAutoencoder, got {type(sae)}")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a folder")
    tensors = saelens_tensors(sae)
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise ArtifactError(f"refusing to save an SAE with non-finite weights to {path}")
    text = json.dumps(saelens_config(sae), indent=2, allow_nan=False) + "\n"

    def write_weights(p: str) -> None:
        save_file(tensors, p, metadata={"format": "pt"})

    def write_cfg(p: str) -> None:
        Path(p).write_text(text, encoding="utf-8")

    if path.is_dir():
        atomic_write(path / WEIGHTS_FILENAME, write_weights)
        atomic_write(path / CFG_FILENAME, write_cfg)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write_weights(str(tmp / WEIGHTS_FILENAME))
        write_cfg(str(tmp / CFG_FILENAME))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _cfg_get(cfg: dict[str, Any], key: str) -> Any:
    """A key at the top level, else in ``metadata`` (SAELens ≥ 6 keeps LM details there)."""
    if cfg.get(key) is not None:
        return cfg[key]
    meta = cfg.get("metadata")
    return meta.get(key) if isinstance(meta, dict) else None


def _architecture(cfg: dict[str, Any], where: Path) -> tuple[str, int | None]:
    """Our architecture and k from a SAELens config (any version)."""
    name = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ArtifactError(f"{where}: activation_fn_kwargs must be an object, got {kwargs!r}")
    if name == "standard" and act == "topk":
        name = "topk"  # SAELens < 6 stored TopK SAEs this way
    if name not in SAELENS_ARCHITECTURES:
        supported = ", ".join(f"{k!r} ({v})" for k, v in SAELENS_ARCHITECTURES.items())
        raise ArtifactError(f"{where}: SAELens architecture {name!r} is not supported; "
                            f"steerlab loads {supported}")
    if name == "standard" and act not in (None, "relu"):
        raise ArtifactError(f"{where}: a standard SAE with activation_fn {act!r} is not "
                            f"supported (only relu)")
    arch = SAELENS_ARCHITECTURES[name]
    if arch != "topk":
        return arch, None
    k_top, k_kw = cfg.get("k"), kwargs.get("k")
    if k_top is not None and k_kw is not None and k_top != k_kw:
        raise ArtifactError(f"{where}: k = {k_top} but activation_fn_kwargs.k = {k_kw}")
    k = k_top if k_top is not None else k_kw
    if not _is_int(k):
        raise ArtifactError(f"{where}: a topk SAE needs an integer k (top level or in "
                            f"activation_fn_kwargs), got {k!r}")
    return arch, cast(int, k)


def _read_cfg(cfg_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot parse {cfg_path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def load_saelens(folder: str | os.PathLike[str], *,
                 device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load a SAELens SAE folder (``cfg.json`` + ``sae_weights.safetensors``).

    Supported: SAELens architectures ``"standard"`` (ReLU), ``"jumprelu"`` and ``"topk"``
    (``k`` at the top level or in ``activation_fn_kwargs``), with ``normalize_activations``
    ``"none"``. A TopK SAE with ``rescale_acts_by_decoder_norm`` has the decoder norms folded
    into the encoder (W_enc columns and b_enc times ‖W_dec,ᵢ‖, W_dec rows normalised), which
    computes the same codes and reconstruction. JumpReLU thresholds ≤ 0 become 0 (SAELens
    computes ReLU(z)·H(z − θ), the same thing). Weights are cast to float32.

    Raises:
        ArtifactError: a missing folder or file, an unparsable or incomplete ``cfg.json``, an
            unsupported architecture or activation normalisation, missing, unknown, misshapen
            or non-finite tensors; the message names the path and the problem.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ArtifactError(f"SAE folder {path} does not exist" if not path.exists()
                            else f"{path} is not a folder (a SAELens SAE is a folder with "
                                 f"{CFG_FILENAME} and {WEIGHTS_FILENAME})")
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise ArtifactError(f"{p} is missing: a SAELens SAE folder holds {CFG_FILENAME} "
                                f"and {WEIGHTS_FILENAME}")
    cfg = _read_cfg(cfg_path)
    for key in ("d_in", "d_sae"):
        if key not in cfg:
            raise ArtifactError(f"{cfg_path}: missing key {key!r}")
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise ArtifactError(f"{cfg_path}: {key} must be a positive integer, "
                                f"got {cfg[key]!r}")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    arch, k = _architecture(cfg, cfg_path)
    norm = cfg.get("normalize_activations", "none")
    if norm is False or norm is None:
        norm = "none"
    if norm != "none":
        raise ArtifactError(
            f"{cfg_path}: normalize_activations is {norm!r}; that SAE rescales its input at "
            f"run time by a factor kept outside its weights, which steerlab does not "
            f"reproduce (it applies SAEs to raw activations). Fold the scaling into the "
            f"weights (SAELens: fold_activation_norm_scaling_factor) and save with "
            f"normalize_activations='none'")
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in (None, "none"):
        raise ArtifactError(f"{cfg_path}: reshape_activations={reshape!r} (per-head hook_z "
                            f"SAEs) is not supported; steerlab loads residual-stream SAEs")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ArtifactError(f"{cfg_path}: apply_b_dec_to_input must be true or false, "
                            f"got {apply_b_dec!r}")
    extra = cfg.get("steerlab") or {}
    if not isinstance(extra, dict):
        raise ArtifactError(f"{cfg_path}: the 'steerlab' entry must be an object")
    if extra.get("architecture", arch) != arch:
        raise ArtifactError(f"{cfg_path}: architecture {cfg.get('architecture')!r} but "
                            f"steerlab.architecture {extra['architecture']!r}")
    hook = _cfg_get(cfg, "hook_name") or _cfg_get(cfg, "hook_point") or ""
    model_name = _cfg_get(cfg, "model_name") or ""
    try:
        kwargs: dict[str, Any] = {}
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth"):
            if extra.get(name) is not None:
                kwargs[name] = extra[name]
        config = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=cast(Architecture, arch), k=k,
                           tied=extra.get("tied", False), hook_name=str(hook),
                           site=extra.get("site") or "", model_name=str(model_name),
                           apply_b_dec_to_input=apply_b_dec, **kwargs)
    except SteeringError as exc:
        raise ArtifactError(f"{cfg_path}: {exc}") from exc

    try:
        raw = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"cannot read {weights_path}: {exc}") from exc
    tensors = _check_weights(raw, cfg, config, weights_path)
    sae = SparseAutoencoder(config, seed=None)
    with torch.no_grad():
        sae.W_enc.copy_(tensors["W_enc"])
        sae.b_enc.copy_(tensors["b_enc"])
        sae.b_dec.copy_(tensors["b_dec"])
        if config.tied:
            if not torch.equal(tensors["W_dec"], tensors["W_enc"].T):
                raise ArtifactError(f"{weights_path}: the cfg says tied but W_dec is not "
                                    f"W_enc transposed")
        else:
            cast(torch.Tensor, sae.W_dec).copy_(tensors["W_dec"])
        if arch == "jumprelu":
            theta = tensors["threshold"].to(torch.float64).clamp_min(_TINY64)
            sae.log_threshold.copy_(torch.log(theta))
    if isinstance(extra.get("train_report"), dict):
        sae.train_report = extra["train_report"]
    return sae.to(device).eval()


def _check_weights(raw: dict[str, torch.Tensor], cfg: dict[str, Any], config: SAEConfig,
                   where: Path) -> dict[str, torch.Tensor]:
    """Validated float32 tensors W_enc, b_enc, W_dec, b_dec (+ threshold), folded as needed."""
    d, m = config.d_in, config.d_sae
    raw = dict(raw)
    if "scaling_factor" in raw:  # SAELens < 6 "finetuning scaling factor"
        sf = raw.pop("scaling_factor")
        if not torch.equal(sf.to(torch.float32), torch.ones_like(sf, dtype=torch.float32)):
            raise ArtifactError(f"{where}: a finetuning scaling_factor other than 1 is not "
                                f"supported")
    if config.architecture == "jumprelu" and "threshold" not in raw and "log_threshold" in raw:
        raw["threshold"] = torch.exp(raw.pop("log_threshold").to(torch.float64))
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d),
                                          "b_dec": (d,)}
    if config.architecture == "jumprelu":
        shapes["threshold"] = (m,)
    missing = [k for k in shapes if k not in raw]
    if missing:
        raise ArtifactError(f"{where}: missing tensor(s) {', '.join(missing)} (a "
                            f"{config.architecture} SAE needs {', '.join(shapes)})")
    unknown = sorted(set(raw) - set(shapes))
    if unknown:
        raise ArtifactError(f"{where}: unexpected tensor(s) {', '.join(unknown)} for a "
                            f"{config.architecture} SAE (expected {', '.join(shapes)})")
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        t = raw[key]
        if tuple(t.shape) != shape:
            raise ArtifactError(f"{where}: {key} has shape {tuple(t.shape)} but cfg.json "
                                f"(d_in = {d}, d_sae = {m}) needs {shape}")
        if not t.is_floating_point():
            raise ArtifactError(f"{where}: {key} must be floating point, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{where}: {key} has non-finite values (NaN or inf)")
        out[key] = t if key == "threshold" else t.to(torch.float32)
    if config.architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm") is True:
        norms = torch.linalg.vector_norm(out["W_dec"], dim=1)
        if not bool((norms > 0).all()):
            raise ArtifactError(f"{where}: rescale_acts_by_decoder_norm with a zero "
                                f"decoder row")
        out["W_enc"] = out["W_enc"] * norms
        out["b_enc"] = out["b_enc"] * norms
        out["W_dec"] = out["W_dec"] / norms[:, None]
    return out


__all__ = [
    "ARCHITECTURES",
    "Activations",
    "SAEConfig",
    "SparseAutoencoder",
    "TrainReport",
    "evaluate_sae",
    "hook_name_for_site",
    "load_saelens",
    "saelens_config",
    "saelens_tensors",
    "save_saelens",
    "site_for_hook_name",
    "topk_relu",
    "train_sae",
]
