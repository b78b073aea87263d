"""ODESteer and StepODESteer: steering along the gradient flow of a log-density ratio.

Zhao et al., "ODESteer: A Unified ODE-Based Steering Framework for LLM Alignment", ICLR 2026
(arXiv:2602.17560; reference code ZhaoHongjue/odesteer).

**Framing.** Activation addition ã = a + T·v(a) is one Euler step of the ODE da/dt = v(a) on
[0, T]. ODESteer picks v as the normalised gradient of a barrier function h whose super-level
set is the desired region, with h the log-density ratio of positive to negative activations:

    h(a) = log p₊(a)/p₋(a) = wᵀφ(a) + b + log((1 − π)/π)

where (w, b) is a logistic regression (label 1 = positive) fitted on features φ of the
activations and π = N₊/(N₊ + N₋) is the positive fraction (log-odds minus the log prior odds
is the log-density ratio).

**Features φ** (the paper's ``NormedPolyCntSketch``): x̂ = x/(‖x‖ + 1e-12);
z = [√γ·x̂, √c₀] (the constant dropped when c₀ = 0); p = ``degree`` independent CountSketches
C_k[j] = Σ_{i: η_k(i)=j} s_k(i)·z_i with hashes η_k: [d+1] → [n] and signs s_k ∈ {±1};
φ = IFFT(Π_k FFT(C_k)), i.e. the circular convolution C_1 ⊛ … ⊛ C_p (TensorSketch, as
sklearn's ``PolynomialCountSketch``), so E⟨φ(x), φ(y)⟩ = (γ⟨x̂, ŷ⟩ + c₀)^p. Defaults
n = 8000, p = 2, γ = 0.1, c₀ = 1 (the reference yaml). The ablation uses random Fourier
features on x̂ instead: φ = √(2/n)·cos(Wx̂ + β), W ~ N(0, 2γ_rff I), β ~ U[0, 2π), so
E⟨φ(x), φ(y)⟩ = exp(−γ_rff‖x̂ − ŷ‖²) (γ_rff by the median heuristic unless given). Hashes,
signs and RFF weights are drawn from a ``torch.Generator`` seeded with ``seed``.

**Gradient.** ∇h(a) = J_φ(a)ᵀw (the prior term is a constant). For the sketch, the
vector-Jacobian product w.r.t. C_k is a circular cross-correlation,
∂h/∂C_k = IFFT(FFT(w)·conj(Π_{j≠k} FFT(C_j))), gathered back through the hashes and signs,
scaled by √γ, and chained through the normalisation:
∂h/∂x = g/(‖x‖ + ε) − x̂(x̂ᵀg)/‖x‖ ≈ (I − x̂x̂ᵀ)/‖x‖ · g, so ∇h ⊥ a (up to ε). The
reference multiplies this by (1 − π)/π (the gradient of neither h nor the ratio); after the
normalisation below the direction is the same. An autograd version (``torch.func.grad``)
agrees (to float32 rounding); the analytic one is used at run time: it is faster (CPU,
d = 4096, n = 8000: 0.19 vs 0.74 ms for 1 row, 39 vs 70 ms for 512 rows) and needs no
autograd, so it also runs under ``torch.inference_mode``.

**Vector field.** v(a) = ∇h(a)/(‖∇h(a)‖ + 1e-10), a unit vector, so T is a path length in
activation units. Flat barrier: where ∇h(a) = 0 (e.g. w = 0) the formula gives v(a) = 0 and
the activation is left unchanged; this is the documented fallback, not an error.

**Integration.** ODESteer: ã = a(T) with da/dt = v(a), a(0) = a, solved with
``torchdiffeq.odeint`` by ``euler`` (default), ``midpoint`` or ``rk4`` with ``steps`` fixed
steps of T/steps (default 10), in float32. The strength T is per row: the runtime's ``(B,)``
strength is integrated as the rescaled field da/ds = T_row·v(a) on s ∈ [0, 1] with step
1/steps, which equals ``steps`` steps of T/steps. T = 0 returns the activation unchanged bit
for bit; T < 0 flows down the gradient (toward the negative class). StepODESteer (the
one-step ablation): ã = a + T·v(a).

**Where.** One residual-stream site (``resid_post.L``, the block output, as the reference's
hook on ``model.layers[L]``); default token scope ``last`` (the last position of each forward
pass: the last prompt token, then each generated token).

**Preset.** ``ODESteer.from_preset("paper")`` (and ``StepODESteer.from_preset("paper")``)
sets every hyper-parameter to the value the reference's scripts run with, and makes
:func:`steerlab.fitting.fit_odesteer` fit the barrier on all the rows (``test_fraction=0``),
as the reference does; the differences from steerlab's defaults are listed in
:class:`ODESteer`'s docstring and ``docs/odesteer.md``.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch
from torchdiffeq import odeint

from steerlab.errors import DataError, SteeringError
from steerlab.methods.base import (
    Controller,
    Preset,
    StepContext,
    check_positive,
    two_class_rows,
)
from steerlab.scope import parse_scope
from steerlab.sites import Site

FeatureKind = Literal["poly", "rff"]
SolverName = Literal["euler", "midpoint", "rk4"]
GradMethod = Literal["analytic", "autograd"]
SOLVERS: tuple[str, ...] = ("euler", "midpoint", "rk4")
FEATURE_KINDS: tuple[str, ...] = ("poly", "rff")

NORM_EPS = 1e-12  # x̂ = x/(‖x‖ + NORM_EPS)
FIELD_EPS = 1e-10  # v = ∇h/(‖∇h‖ + FIELD_EPS)
# Rows per chunk are chosen so a chunk's (rows, n_components) buffers hold about this many
# elements, which bounds the memory of a long prefill (4M floats = 16 MB per buffer).
CHUNK_ELEMENTS = 1 << 22


# The reference code: github.com/ZhaoHongjue/odesteer at 08cbc11 (file:line below).
REFERENCE = "ZhaoHongjue/odesteer@08cbc11"
_SKETCH_SOURCE = (
    "n_components 8000, degree 2, gamma 0.1, coef0 1.0, lin_clf_type lr: {yaml}; "
    "LogisticRegression(max_iter=1000), sklearn's C=1: "
    "src/odesteer/utils/kernels/_kernel_clf.py:88; layer_idx 13 (Llama-3.1-8B-Base; "
    "Falcon-7B 14, Mistral-7B 15, Qwen2.5-7B 13: data/toxicity.sh:19-22): confs/detox.yaml:9, "
    "confs/truthfulqa.yaml:9, confs/ultrafeedback.yaml:9; seed 42 (seed_everything before the "
    "unseeded torch.randint hashes): confs/detox.yaml:11, scripts/toxicity/detox_generate.py:21, "
    "src/odesteer/utils/kernels/_poly_cnt_sketch.py:40-49; block output, last position of each "
    "forward pass: src/odesteer/lm/_huggingface_lm.py:91,258,336; barrier fitted on all the "
    "training activations: scripts/toxicity/detox_generate.py:46-47, "
    "scripts/ultrafeedback/ultrafeedback_generate.py:50-51, "
    "scripts/truthfulqa/truthfulqa_generate.py:62-63"
)
PAPER_ODESTEER = Preset(
    hyperparameters={"layer": 13, "site": "resid_post", "n_components": 8000, "degree": 2,
                     "gamma": 0.1, "coef0": 1.0, "features": "poly", "solver": "euler",
                     "steps": 10, "seed": 42, "C": 1.0, "scope": "last"},
    fit={"test_fraction": 0.0},
    source=f"{REFERENCE}: solver euler, steps 10: confs/steer/ODESteer.yaml:3-4; "
           + _SKETCH_SOURCE.format(yaml="confs/steer/ODESteer.yaml:5-9"),
)
PAPER_STEP_ODESTEER = Preset(
    hyperparameters={"layer": 13, "site": "resid_post", "n_components": 8000, "degree": 2,
                     "gamma": 0.1, "coef0": 1.0, "features": "poly", "seed": 42, "C": 1.0,
                     "scope": "last"},
    fit={"test_fraction": 0.0},
    source=f"{REFERENCE}: " + _SKETCH_SOURCE.format(yaml="confs/steer/StepODESteer.yaml:3-7"),
)


# -- helpers -----------------------------------------------------------------------------------
def normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂ = x/(‖x‖ + 1e-12) and ‖x‖ (keepdim), row-wise."""
    r = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / (r + NORM_EPS), r


def through_normalisation(xhat: torch.Tensor, r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of x ↦ x/(‖x‖ + ε): g/(‖x‖ + ε) − x̂(x̂ᵀg)/‖x‖.

    This is the exact derivative (autograd gives the same); up to ε it is
    (I − x̂x̂ᵀ)g/‖x‖, orthogonal to x. A zero row (x̂ = 0) gets g/ε, as autograd does.
    """
    proj = (xhat * g).sum(dim=-1, keepdim=True)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    return g / (r + NORM_EPS) - xhat * (proj / safe_r)


def _chunks(n_rows: int, width: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    return [slice(i, min(i + step, n_rows)) for i in range(0, max(n_rows, 1), step)]


def _rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             width: int) -> torch.Tensor:
    parts = _chunks(x.shape[0], width)
    if len(parts) == 1:
        return fn(x)
    return torch.cat([fn(x[s]) for s in parts], dim=0)


_positive = check_positive


def _count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise SteeringError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_strength(T: torch.Tensor) -> None:
    if not bool(torch.isfinite(T).all()):
        raise SteeringError(
            f"the ODESteer strength T (integration time) must be finite, got "
            f"{T.flatten()[:8].tolist()}"
        )


def _check_rows(name: str, x: torch.Tensor, width: int | None) -> None:
    if x.ndim != 2:
        raise SteeringError(f"{name} must be a (rows, width) tensor, got {tuple(x.shape)}")
    if width is not None and x.shape[1] != width:
        raise SteeringError(
            f"{name} has width {x.shape[1]} but the barrier was fitted on width {width}"
        )


# -- feature maps ------------------------------------------------------------------------------
class FeatureMap(ABC):
    """A random feature map φ of the L2-normalised input, with its vector-Jacobian product.

    Subclasses implement :meth:`transform_unit` (φ of unit rows x̂) and :meth:`vjp_unit`
    (∂(wᵀφ)/∂x̂); normalisation and its derivative are shared. Rows are batched.
    """

    kind: ClassVar[str]
    in_features: int
    n_components: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x) for rows ``x`` (N, d) → (N, n_components), in x's dtype (use float32)."""
        _check_rows("the input", x, self.in_features)
        return _rowwise(lambda c: self.transform_unit(normalise(c)[0]), x, self.row_width)

    def vjp(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """∂(wᵀφ(x))/∂x for rows ``x`` (N, d), analytic: (N, d)."""
        _check_rows("the input", x, self.in_features)

        def one(c: torch.Tensor) -> torch.Tensor:
            xhat, r = normalise(c)
            return through_normalisation(xhat, r, self.vjp_unit(xhat, w))

        return _rowwise(one, x, self.row_width)

    @property
    def row_width(self) -> int:
        """Elements per row of the largest intermediate buffer (for chunking)."""
        return self.n_components

    @abstractmethod
    def transform_unit(self, xhat: torch.Tensor) -> torch.Tensor:
        """φ of already-normalised rows (N, d) → (N, n_components)."""

    @abstractmethod
    def vjp_unit(self, xhat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """∂(wᵀφ(x̂))/∂x̂ for rows (N, d) and w (n_components,) → (N, d)."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the map exactly, as tensors."""

    @classmethod
    @abstractmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> Self:
        """Rebuild a map saved by :meth:`state_dict`."""

    @abstractmethod
    def to(self, device: torch.device | str) -> Self:
        """A copy of the map on ``device``."""


class PolyCountSketch(FeatureMap):
    """TensorSketch of the polynomial kernel (γ⟨x̂, ŷ⟩ + c₀)^degree on normalised rows.

    Built like sklearn's ``PolynomialCountSketch`` (same ``index``/``sign`` layout as its
    ``indexHash_``/``bitHash_``), with the hashes drawn from a ``torch.Generator(seed)``.
    """

    kind = "poly"

    index: torch.Tensor  # (degree, m) int64 buckets, m = d + 1 (d when coef0 == 0)
    sign: torch.Tensor  # (degree, m) float32 ±1
    gamma: float
    coef0: float
    degree: int

    def __init__(self, in_features: int, n_components: int = 8000, degree: int = 2,
                 gamma: float = 0.1, coef0: float = 1.0, *, seed: int = 0) -> None:
        d = _count("in_features", in_features)
        n = _count("n_components", n_components)
        p = _count("degree", degree)
        gamma = _positive("gamma", gamma)
        coef0 = _positive("coef0", coef0, allow_zero=True)
        m = d + (1 if coef0 != 0 else 0)
        g = torch.Generator().manual_seed(int(seed))
        index = torch.randint(0, n, (p, m), generator=g)
        sign = torch.randint(0, 2, (p, m), generator=g).to(torch.float32) * 2 - 1
        self._assign(index, sign, n_components=n, gamma=gamma, coef0=coef0)

    def _assign(self, index: torch.Tensor, sign: torch.Tensor, *, n_components: int,
                gamma: float, coef0: float) -> None:
        if index.ndim != 2 or index.shape != sign.shape:
            raise SteeringError(
                f"sketch index {tuple(index.shape)} and sign {tuple(sign.shape)} must be equal "
                f"(degree, features) shapes"
            )
        self.index = index.to(torch.int64)
        self.sign = sign.to(torch.float32)
        self.n_components = int(n_components)
        self.gamma = float(gamma)
        self.coef0 = float(coef0)
        self.degree = int(index.shape[0])
        self.in_features = int(index.shape[1]) - (1 if self.coef0 != 0 else 0)
        # Flattened bucket ids into a (degree * n) buffer: one index_add / gather for all k.
        offsets = torch.arange(self.degree, device=self.index.device)[:, None] * self.n_components
        self._flat = (self.index + offsets).reshape(-1)

    @property
    def row_width(self) -> int:
        return self.degree * self.n_components

    def _augment(self, xhat: torch.Tensor) -> torch.Tensor:
        z = xhat * math.sqrt(self.gamma)
        if self.coef0 != 0:
            const = torch.full_like(xhat[:, :1], math.sqrt(self.coef0))
            z = torch.cat([z, const], dim=1)
        return z

    def count_sketches(self, z: torch.Tensor) -> torch.Tensor:
        """The ``degree`` CountSketches of augmented rows z (N, m) → (N, degree, n)."""
        rows = z.shape[0]
        src = (z[:, None, :] * self.sign.to(z.dtype)).reshape(rows, -1)
        buf = z.new_zeros(rows, self.degree * self.n_components)
        # Out-of-place index_add, so that autograd (the reference gradient) can see it.
        out = buf.index_add(1, self._flat, src)
        return out.reshape(rows, self.degree, self.n_components)

    def transform_unit(self, xhat: torch.Tensor) -> torch.Tensor:
        spectra = torch.fft.rfft(self.count_sketches(self._augment(xhat)), dim=-1)
        return torch.fft.irfft(spectra.prod(dim=1), n=self.n_components, dim=-1)

    def vjp_unit(self, xhat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rows, n, p = xhat.shape[0], self.n_components, self.degree
        w_hat = torch.fft.rfft(w.to(xhat.dtype), n=n)  # (n//2 + 1,)
        if p == 1:
            grads = w.to(xhat.dtype).expand(rows, 1, n)
        else:
            spectra = torch.fft.rfft(self.count_sketches(self._augment(xhat)), dim=-1)
            others = []
            for k in range(p):
                rest = [spectra[:, j] for j in range(p) if j != k]
                prod = rest[0]
                for s in rest[1:]:
                    prod = prod * s
                others.append(prod)
            # d(wᵀ(C_1 ⊛ … ⊛ C_p))/dC_k = w ⋆ (⊛_{j≠k} C_j): a circular cross-correlation.
            grads = torch.fft.irfft(w_hat * torch.stack(others, dim=1).conj(), n=n, dim=-1)
        gathered = grads.reshape(rows, p * n)[:, self._flat].reshape(rows, p, -1)
        gz = (gathered * self.sign.to(xhat.dtype)).sum(dim=1)
        return gz[:, : self.in_features] * math.sqrt(self.gamma)

    def state_dict(self) -> dict[str, torch.Tensor]:
        params = torch.tensor([self.n_components, self.gamma, self.coef0], dtype=torch.float64)
        return {"index": self.index.contiguous(), "sign": self.sign.contiguous(),
                "params": params}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> Self:
        n, gamma, coef0 = (float(v) for v in tensors["params"].tolist())
        out = cls.__new__(cls)
        out._assign(tensors["index"], tensors["sign"], n_components=int(n), gamma=gamma,
                    coef0=coef0)
        return out

    def to(self, device: torch.device | str) -> Self:
        out = type(self).__new__(type(self))
        out._assign(self.index.to(device), self.sign.to(device), n_components=self.n_components,
                    gamma=self.gamma, coef0=self.coef0)
        return out


class RandomFourierFeatures(FeatureMap):
    """Random Fourier features of the RBF kernel exp(−γ‖x̂ − ŷ‖²) on normalised rows."""

    kind = "rff"

    weight: torch.Tensor  # (n, d), rows ~ N(0, 2γ I)
    bias: torch.Tensor  # (n,), U[0, 2π)

    def __init__(self, in_features: int, n_components: int = 8000, gamma: float = 1.0, *,
                 seed: int = 0) -> None:
        d = _count("in_features", in_features)
        n = _count("n_components", n_components)
        gamma = _positive("gamma", gamma)
        g = torch.Generator().manual_seed(int(seed))
        weight = torch.randn(n, d, generator=g) * math.sqrt(2.0 * gamma)
        bias = torch.rand(n, generator=g) * (2.0 * math.pi)
        self._assign(weight, bias)
        self.gamma = gamma

    def _assign(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise SteeringError(
                f"RFF weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not match"
            )
        self.weight = weight.to(torch.float32)
        self.bias = bias.to(torch.float32)
        self.n_components = int(weight.shape[0])
        self.in_features = int(weight.shape[1])
        self.gamma = float("nan")  # only known when drawn; the weights carry the scale

    def transform_unit(self, xhat: torch.Tensor) -> torch.Tensor:
        proj = xhat @ self.weight.to(xhat.dtype).T + self.bias.to(xhat.dtype)
        return torch.cos(proj) * math.sqrt(2.0 / self.n_components)

    def vjp_unit(self, xhat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(xhat.dtype)
        proj = xhat @ weight.T + self.bias.to(xhat.dtype)
        return -(torch.sin(proj) * w.to(xhat.dtype)) @ weight * math.sqrt(2.0 / self.n_components)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> Self:
        out = cls.__new__(cls)
        out._assign(tensors["weight"], tensors["bias"])
        return out

    def to(self, device: torch.device | str) -> Self:
        out = type(self).__new__(type(self))
        out._assign(self.weight.to(device), self.bias.to(device))
        out.gamma = self.gamma
        return out


FEATURE_MAPS: dict[str, type[FeatureMap]] = {"poly": PolyCountSketch, "rff": RandomFourierFeatures}


def median_gamma(x: torch.Tensor, *, max_rows: int = 1000, seed: int = 0) -> float:
    """RBF γ = 1/(2σ²) with σ the median pairwise distance of the normalised rows of ``x``."""
    if x.shape[0] > max_rows:
        g = torch.Generator().manual_seed(int(seed))
        x = x[torch.randperm(x.shape[0], generator=g)[:max_rows]]
    xhat = normalise(x.to(torch.float64))[0]
    dist = torch.cdist(xhat, xhat)
    iu = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    pairs = dist[iu[0], iu[1]]
    sigma = float(pairs.median()) if pairs.numel() else 0.0
    return 1.0 if sigma <= 0 else 1.0 / (2.0 * sigma * sigma)


# -- the barrier: a log-density-ratio estimator ------------------------------------------------
class Barrier:
    """h(a) = wᵀφ(a) + b + log((1 − π)/π): a probabilistic linear classifier on φ(a).

    ``fit`` labels positives 1 and negatives 0 and fits ``LogisticRegression(C, max_iter=1000)``
    unless another sklearn-like classifier with ``coef_`` and ``intercept_`` is given.
    """

    def __init__(self, features: FeatureMap) -> None:
        self.features = features
        self.w = torch.empty(0)
        self.b = torch.empty(0)
        self.prior = torch.empty(0)

    @property
    def is_fitted(self) -> bool:
        return self.w.numel() > 0

    @property
    def in_features(self) -> int:
        return self.features.in_features

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise SteeringError("this Barrier is not fitted: call fit() or load its state")

    def fit(self, positive: torch.Tensor, negative: torch.Tensor, *, classifier: Any = None,
            C: float = 1.0) -> Barrier:
        """Fit on positive (N₊, d) and negative (N₋, d) activations."""
        pos, neg = two_class_rows(positive, negative, "ODESteer", width=self.in_features)
        x = torch.cat([pos, neg], dim=0)
        phi = self.features(x).numpy()
        y = np.concatenate([np.ones(pos.shape[0]), np.zeros(neg.shape[0])]).astype(np.int64)
        if classifier is None:
            from sklearn.linear_model import LogisticRegression

            classifier = LogisticRegression(C=_positive("C", C), max_iter=1000)
        classifier.fit(phi, y)
        classes = getattr(classifier, "classes_", None)
        if classes is not None and [float(c) for c in classes] != [0.0, 1.0]:
            raise DataError(f"the classifier learned classes {list(classes)}, expected [0, 1]")
        coef = np.asarray(classifier.coef_, dtype=np.float64).reshape(-1)
        if coef.shape[0] != self.features.n_components:
            raise DataError(
                f"the classifier's coef_ has {coef.shape[0]} weights for "
                f"{self.features.n_components} features (a binary linear classifier is needed)"
            )
        intercept = np.asarray(getattr(classifier, "intercept_", 0.0), dtype=np.float64)
        pi = pos.shape[0] / x.shape[0]
        self.set_parameters(torch.from_numpy(coef), float(intercept.reshape(-1)[0]),
                            math.log((1.0 - pi) / pi))
        return self

    def set_parameters(self, w: torch.Tensor, b: float, prior: float) -> None:
        """Set the classifier weights ``w`` (n_components,), bias and log prior odds ratio."""
        w = w.detach().to(torch.float32).reshape(-1).cpu()
        if w.shape[0] != self.features.n_components:
            raise SteeringError(
                f"w has {w.shape[0]} weights for {self.features.n_components} features"
            )
        for name, t in (("w", w), ("b", torch.tensor(b)), ("prior", torch.tensor(prior))):
            if not bool(torch.isfinite(t).all()):
                raise DataError(f"the fitted barrier's {name} has NaN or inf values")
        self.w = w
        self.b = torch.tensor([b], dtype=torch.float32)
        self.prior = torch.tensor([prior], dtype=torch.float32)

    def _logit(self, a: torch.Tensor) -> torch.Tensor:
        # no validation: also traced by torch.func.grad
        w, b = self.w.to(a.device, a.dtype), self.b.to(a.device, a.dtype)
        return _rowwise(lambda c: self.features.transform_unit(normalise(c)[0]) @ w + b, a,
                        self.features.row_width)

    def logit(self, a: torch.Tensor) -> torch.Tensor:
        """The classifier's log-odds wᵀφ(a) + b, rows (N, d) → (N,)."""
        self._check_fitted()
        _check_rows("the activation", a, self.in_features)
        return self._logit(a)

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """h(a) = log p₊(a)/p₋(a), rows (N, d) → (N,)."""
        return self.logit(a) + self.prior.to(a.device, a.dtype)

    def grad(self, a: torch.Tensor, *, method: GradMethod = "analytic") -> torch.Tensor:
        """∇h(a) for rows (N, d) → (N, d): analytic (the VJP above) or by autograd."""
        self._check_fitted()
        _check_rows("the activation", a, self.in_features)
        if method == "analytic":
            return self.features.vjp(a, self.w.to(a.device, a.dtype))
        if method == "autograd":
            return torch.func.grad(lambda x: self._logit(x).sum())(a)
        raise SteeringError(f"unknown gradient method {method!r}; use analytic or autograd")

    def velocity(self, a: torch.Tensor) -> torch.Tensor:
        """v(a) = ∇h/(‖∇h‖ + 1e-10); zero where the barrier is flat (∇h = 0)."""
        g = self.grad(a)
        return g / (torch.linalg.vector_norm(g, dim=-1, keepdim=True) + FIELD_EPS)

    def score(self, positive: torch.Tensor, negative: torch.Tensor) -> float:
        """Accuracy of the classifier (log-odds > 0 means positive) on labelled rows."""
        self._check_fitted()
        pos = positive.detach().to(self.w.device, torch.float32)
        neg = negative.detach().to(self.w.device, torch.float32)
        hits = int((self.logit(pos) > 0).sum()) + int((self.logit(neg) <= 0).sum())
        total = pos.shape[0] + neg.shape[0]
        if total == 0:
            raise DataError("score needs at least one labelled activation")
        return hits / total

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        out = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        out.update({"barrier.w": self.w.contiguous(), "barrier.b": self.b.contiguous(),
                    "barrier.prior": self.prior.contiguous()})
        return out

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], kind: str) -> Barrier:
        if kind not in FEATURE_MAPS:
            raise SteeringError(f"unknown feature map {kind!r}; use {' or '.join(FEATURE_MAPS)}")
        sub = {k[len("features."):]: v for k, v in tensors.items() if k.startswith("features.")}
        out = cls(FEATURE_MAPS[kind].from_state(sub))
        out.set_parameters(tensors["barrier.w"], float(tensors["barrier.b"].reshape(-1)[0]),
                           float(tensors["barrier.prior"].reshape(-1)[0]))
        return out

    def to(self, device: torch.device | str) -> Barrier:
        out = Barrier(self.features.to(device))
        out.w, out.b, out.prior = self.w.to(device), self.b.to(device), self.prior.to(device)
        return out


# -- integration -------------------------------------------------------------------------------
def integrate(velocity: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor,
              T: torch.Tensor, *, solver: str = "euler", steps: int = 10,
              path: bool = False) -> torch.Tensor:
    """Solve da/dt = v(a) from 0 to T_row for every row of ``a`` (N, d) with ``torchdiffeq``.

    Integrates the rescaled field da/ds = T_row·v(a) over s ∈ [0, 1] in ``steps`` fixed steps
    of 1/steps (= steps of T/steps in t). Returns a(T) (N, d), or with ``path=True`` the
    whole path (steps + 1, N, d). No special case for T = 0 here (see the controllers).
    """
    if solver not in SOLVERS:
        raise SteeringError(f"unknown solver {solver!r}; use {', '.join(SOLVERS)}")
    steps = _count("steps", steps)
    _check_strength(T)
    scale = T.to(a.device, a.dtype).reshape(-1, 1)
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=a.dtype, device=a.device)

    def field(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scale * velocity(y)

    if path:
        return odeint(field, a, grid, method=solver)
    ends = grid[[0, -1]]
    sol = odeint(field, a, ends, method=solver,
                 options={"grid_constructor": lambda f, y0, t: grid})
    return sol[-1]


# -- controllers -------------------------------------------------------------------------------
class _ODEBase(Controller):
    """Shared estimator and state of ODESteer and StepODESteer (see the module docstring)."""

    def __init__(
        self,
        layer: int = 13,
        *,
        site: Literal["resid_post", "resid_pre"] = "resid_post",
        n_components: int = 8000,
        degree: int = 2,
        gamma: float = 0.1,
        coef0: float = 1.0,
        features: FeatureKind = "poly",
        rff_gamma: float | None = None,
        solver: SolverName = "euler",
        steps: int = 10,
        seed: int = 0,
        C: float = 1.0,
        scope: str = "last",
    ) -> None:
        super().__init__()
        if site not in ("resid_post", "resid_pre"):
            raise SteeringError(f"{self.method} steers resid_post or resid_pre, not {site!r}")
        if features not in FEATURE_KINDS:
            raise SteeringError(f"unknown features {features!r}; use poly or rff")
        if solver not in SOLVERS:
            raise SteeringError(f"unknown solver {solver!r}; use {', '.join(SOLVERS)}")
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
            raise SteeringError(f"layer must be an integer, got {layer!r}")
        self.layer = int(layer)
        self.site = site
        self.n_components = _count("n_components", n_components)
        self.degree = _count("degree", degree)
        self.gamma = _positive("gamma", gamma)
        self.coef0 = _positive("coef0", coef0, allow_zero=True)
        self.features: FeatureKind = features
        self.rff_gamma = None if rff_gamma is None else _positive("rff_gamma", rff_gamma)
        self.solver: SolverName = solver
        self.steps = _count("steps", steps)
        self.seed = int(seed)
        self.C = _positive("C", C)
        self.scope = scope
        self.default_scope = parse_scope(scope)
        self.barrier: Barrier | None = None
        self._on_device: dict[torch.device, Barrier] = {}

    # -- estimator -----------------------------------------------------------------------------
    def make_features(self, in_features: int, data: torch.Tensor | None = None) -> FeatureMap:
        """The (unfitted, random) feature map for activations of width ``in_features``."""
        if self.features == "poly":
            return PolyCountSketch(in_features, self.n_components, self.degree, self.gamma,
                                   self.coef0, seed=self.seed)
        gamma = self.rff_gamma
        if gamma is None:
            gamma = median_gamma(data, seed=self.seed) if data is not None else 1.0
        return RandomFourierFeatures(in_features, self.n_components, gamma, seed=self.seed)

    def fit(self, positive: torch.Tensor, negative: torch.Tensor, *,
            classifier: Any = None) -> Self:
        """Fit the barrier on positive (N₊, d) and negative (N₋, d) activations at the site."""
        start = time.perf_counter()
        pos, neg = two_class_rows(positive, negative, "ODESteer")
        fmap = self.make_features(pos.shape[1], torch.cat([pos, neg]))
        barrier = Barrier(fmap).fit(pos, neg, classifier=classifier, C=self.C)
        self._set_barrier(barrier, self.fit_sites())
        self.fit_info.update(
            fit_seconds=round(time.perf_counter() - start, 3),
            train_accuracy=round(barrier.score(pos, neg), 4),
            n_positive=int(pos.shape[0]),
            n_negative=int(neg.shape[0]),
            log_prior_ratio=round(float(barrier.prior[0]), 6),
            classifier=type(classifier).__name__ if classifier is not None
            else "LogisticRegression",
        )
        if isinstance(fmap, RandomFourierFeatures):
            self.fit_info["rff_gamma"] = fmap.gamma
        return self

    def fit_sites(self) -> list[Site]:
        """The one site whose activations :meth:`fit` expects (and :meth:`steer` steers)."""
        return [Site(self.site, self.layer)]

    def _set_barrier(self, barrier: Barrier, sites: list[Site]) -> None:
        self.barrier = barrier
        self.sites = list(sites)
        self._on_device = {}

    def _barrier(self, device: torch.device) -> Barrier:
        self.check_fitted()
        assert self.barrier is not None
        b = self._on_device.get(device)
        if b is None:
            b = self.barrier if device == torch.device("cpu") else self.barrier.to(device)
            self._on_device[device] = b
        return b

    @property
    def hidden_size(self) -> int:
        self.check_fitted()
        assert self.barrier is not None
        return self.barrier.in_features

    def score(self, positive: torch.Tensor, negative: torch.Tensor) -> float:
        """Classifier accuracy on (held-out) positive and negative activations."""
        return self._barrier(torch.device("cpu")).score(positive, negative)

    barrier_accuracy = score

    # -- run time ------------------------------------------------------------------------------
    @abstractmethod
    def transport(self, barrier: Barrier, a: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """Move float32 rows ``a`` (N, d) for times ``T`` (N,)."""

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        self.check_fitted()
        d = self.hidden_size
        if h.shape[-1] != d:
            raise SteeringError(
                f"{self.method} at {site} was fitted on width {d} but the activation has "
                f"{h.shape[-1]}"
            )
        T = strength.to(device=h.device, dtype=torch.float32).reshape(-1)
        _check_strength(T)
        if T.shape[0] != h.shape[0]:
            raise SteeringError(f"strength has {T.shape[0]} rows for a batch of {h.shape[0]}")
        if not bool((T != 0).any()):
            return h
        rows = h.reshape(-1, d)
        T_rows = T.reshape(-1, *([1] * (h.ndim - 2))).expand(h.shape[:-1]).reshape(-1)
        moved = self.transport(self._barrier(h.device), rows.to(torch.float32), T_rows)
        out = torch.where((T_rows == 0)[:, None], rows, moved.to(h.dtype))
        return out.reshape(h.shape)

    def velocity(self, a: torch.Tensor) -> torch.Tensor:
        """The unit vector field v(a) for rows (N, d), in float32."""
        return self._barrier(a.device).velocity(a.to(torch.float32))

    # -- artifacts -----------------------------------------------------------------------------
    def hyperparameters(self) -> dict[str, Any]:
        return {"layer": self.layer, "site": self.site, "n_components": self.n_components,
                "degree": self.degree, "gamma": self.gamma, "coef0": self.coef0,
                "features": self.features, "rff_gamma": self.rff_gamma, "solver": self.solver,
                "steps": self.steps, "seed": self.seed, "C": self.C, "scope": self.scope}

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.check_fitted()
        assert self.barrier is not None
        return self.barrier.state_dict()

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        if len(sites) != 1:
            raise SteeringError(f"{self.method} steers one site, got {[str(s) for s in sites]}")
        barrier = Barrier.from_state(tensors, self.features)
        fmap = barrier.features
        if fmap.n_components != self.n_components:
            raise SteeringError(
                f"saved feature map has {fmap.n_components} components, the hyper-parameters "
                f"say {self.n_components}"
            )
        if isinstance(fmap, PolyCountSketch) and (
            fmap.degree != self.degree
            or not math.isclose(fmap.gamma, self.gamma)
            or not math.isclose(fmap.coef0, self.coef0)
        ):
            raise SteeringError(
                "the saved sketch's degree/gamma/coef0 differ from the hyper-parameters"
            )
        self._set_barrier(barrier, list(sites))


class ODESteer(_ODEBase):
    """ODESteer: integrate da/dt = v(a) over [0, T] (see the module docstring).

    Args:
        layer: block whose output (``site="resid_post"``) or input (``"resid_pre"``) is steered.
        n_components, degree, gamma, coef0: the polynomial sketch (reference: 8000, 2, 0.1, 1).
        features: ``"poly"`` (the paper's) or ``"rff"`` (the ablation; RBF bandwidth
            ``rff_gamma``, by default the median heuristic on the training activations).
        solver: ``"euler"`` (default), ``"midpoint"`` or ``"rk4"``; ``steps`` fixed steps.
        seed: seed of the random features.
        C: inverse L2 regularisation of the logistic regression.
        scope: default token scope (``"last"``, as the reference).

    **The reference's values** (``ZhaoHongjue/odesteer`` at ``08cbc11``; files under
    ``src/odesteer/`` are named from there), which ``ODESteer.from_preset("paper")`` sets
    (``PAPER_ODESTEER``):

    * ``solver="euler"``, ``steps=10`` (``confs/steer/ODESteer.yaml:3-4``; the class defaults
      of ``steer/_ode_steer.py:20-21`` agree); ``n_components=8000``, ``degree=2``,
      ``gamma=0.1``, ``coef0=1.0``, logistic regression (``confs/steer/ODESteer.yaml:5-9``;
      the classifier's own defaults 100, 2, 1.0, 0.1 in ``utils/kernels/_kernel_clf.py:124-134``
      are not what the scripts run); ``LogisticRegression(max_iter=1000)`` with sklearn's
      ``C=1`` (``_kernel_clf.py:88``); x̂ = x/(‖x‖ + 1e-12)
      (``utils/kernels/_poly_cnt_sketch.py:345,356-357``); v = ∇h/(‖∇h‖ + 1e-10)
      (``steer/_ode_steer.py:47``).
    * ``layer=13``, the conf's Llama-3.1-8B-Base (``confs/detox.yaml:9``, also
      ``truthfulqa.yaml:9``, ``ultrafeedback.yaml:9``); the data scripts use 14 for Falcon-7B,
      15 for Mistral-7B, 13 for Qwen2.5-7B (``data/toxicity.sh:19-22``): pass ``layer=`` to
      ``from_preset`` for those. The block output (``hidden_states[L + 1]`` for the data,
      ``lm/_huggingface_lm.py:245``; a forward hook on ``model.layers[L]``, ``:258,336``), the
      last position of each forward pass (``:91``) and the last token of each text (``:247``).
    * ``seed=42`` (``confs/detox.yaml:11``, ``seed_everything`` in
      ``scripts/toxicity/detox_generate.py:21``): the reference draws the sketch hashes from
      the global torch RNG (``_poly_cnt_sketch.py:40-49``); steerlab's ``seed=42`` draws the same
      hashes as a global RNG freshly seeded with 42 (checked), but whether anything in the
      reference consumes that RNG between seeding and the fit (model loading) is not checked.
    * fit options ``{"test_fraction": 0.0}``: the reference fits the barrier on all of its
      training activations (``scripts/toxicity/detox_generate.py:46-47``,
      ``ultrafeedback/ultrafeedback_generate.py:50-51``; TruthfulQA on the other half of a
      2-fold split, ``truthfulqa/truthfulqa_generate.py:62-63``).

    **Where steerlab's defaults differ** (steerlab's defaults are kept):

    * ``fit_odesteer`` holds out ``test_fraction=0.2`` for a held-out accuracy by default (the
      preset: 0); without a controller it uses block ``num_layers // 2`` (the reference's
      fallback, unused by its scripts, is ``num_layers // 2 - 1``, ``_huggingface_lm.py:242``).
    * ``seed=0`` by default (the preset: 42, see above).
    * The strength T is not a hyper-parameter but the run-time strength (``Steer(c, T)``), so no
      preset carries it: the reference's yaml default is T = 1.0
      (``confs/steer/ODESteer.yaml:10``), its README runs ODESteer with T = 5.0
      (``README.md:62,113``).
    * T < 0: the reference's ``odeint`` with ``step_size=T/steps`` raises for T < 0
      (``_ode_steer.py:37-42``); steerlab flows down the gradient.
    * The step grid: the reference lets torchdiffeq build it from ``step_size=T/steps``, which
      for some T (e.g. 0.3, 2.4, 4.8; not 1 or 5) rounds to an 11th step of length at most
      1.2e-7·T; steerlab always takes exactly ``steps`` steps.
    * Magnitudes of ∇h (no effect on v): the reference's batched VJP omits the √γ factor
      (``_poly_cnt_sketch.py:334``, its single-row one has it, ``:278``) and multiplies by
      (1 − π)/π (``_kernel_clf.py:62``); the normalisation's VJP divides the projection term by
      ‖x‖ + ε, steerlab by ‖x‖ (``_poly_cnt_sketch.py:419-424``), a 1e-12 relative difference.
    * The RFF ablation (``features="rff"``, the reference's ``RFFODESteer``, for which it ships
      no config): the reference applies RFF to the raw activations, not to x̂
      (``utils/kernels/_rff.py:38-39``), with W ~ N(0, σ⁻²I), σ = median/√2 of the raw pairwise
      distances (``_rff.py:28-31,88-94``), i.e. γ = 1/median²; steerlab uses x̂ and
      γ = 1/(2·median²) of the normalised distances. RFF on raw activations cannot be expressed
      in steerlab (``rff_gamma`` sets only the bandwidth).
    """

    method = "odesteer"
    presets: ClassVar[dict[str, Preset]] = {"paper": PAPER_ODESTEER}

    def transport(self, barrier: Barrier, a: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        return integrate(barrier.velocity, a, T, solver=self.solver, steps=self.steps)


class StepODESteer(_ODEBase):
    """StepODESteer, the one-step ablation: ã = a + T·v(a). ``solver``/``steps`` are unused.

    ``StepODESteer.from_preset("paper")`` (``PAPER_STEP_ODESTEER``) sets the reference's values
    (``confs/steer/StepODESteer.yaml:3-7``: the same sketch and classifier as ODESteer's; T = 1.0
    at ``:8``; ``steer/_step_ode_steer.py:23-25``), as :class:`ODESteer`'s preset without
    ``solver``/``steps``, and fits on all rows; the differences listed for :class:`ODESteer`
    apply here too (T < 0 works in the reference's one step as in steerlab's).
    """

    method = "step_odesteer"
    presets: ClassVar[dict[str, Preset]] = {"paper": PAPER_STEP_ODESTEER}

    def transport(self, barrier: Barrier, a: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        return a + T.to(a.dtype)[:, None] * barrier.velocity(a)


def barrier_along_path(controller: ODESteer | StepODESteer, a: torch.Tensor, T: float,
                       steps: int | None = None) -> torch.Tensor:
    """h at each point of the steering path of rows ``a`` (N, d): (N, steps + 1).

    For :class:`ODESteer`, the ``controller.solver`` path with ``steps`` steps (default
    ``controller.steps``) from a(0) = a to a(T); for :class:`StepODESteer`, ``steps + 1``
    evenly spaced points on its single straight step a + s·T·v(a), s ∈ [0, 1].
    """
    controller.check_fitted()
    steps = _count("steps", controller.steps if steps is None else steps)
    barrier = controller._barrier(a.device)
    _check_rows("the activation", a, barrier.in_features)
    x = a.detach().to(torch.float32)
    times = torch.full((x.shape[0],), float(T), dtype=torch.float32, device=x.device)
    _check_strength(times)
    if isinstance(controller, StepODESteer):
        v = barrier.velocity(x)
        fractions = torch.linspace(0.0, 1.0, steps + 1, device=x.device)
        path = torch.stack([x + (s * times)[:, None] * v for s in fractions])
    else:
        path = integrate(barrier.velocity, x, times, solver=controller.solver, steps=steps,
                         path=True)
    return torch.stack([barrier(p) for p in path], dim=1)
