"""ODESteer's random feature maps φ of the L2-normalised activations, with their
vector-Jacobian products: the polynomial TensorSketch (the paper's) and random Fourier
features (the ablation). See :mod:`steerlab.methods.ode` for the equations."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Literal, Self

import torch

from steerlab.errors import SteeringError
from steerlab.methods.checks import check_count, check_positive, check_rows

FeatureKind = Literal["poly", "rff"]
FEATURE_KINDS: tuple[str, ...] = ("poly", "rff")

NORM_EPS = 1e-12  # x̂ = x/(‖x‖ + NORM_EPS)
# Rows per chunk are chosen so a chunk's (rows, n_components) buffers hold about this many
# elements, which bounds the memory of a long prefill (4M floats = 16 MB per buffer).
CHUNK_ELEMENTS = 1 << 22
# Degree-2 sketches of at most this many augmented features (d + 1) compute their gradient as
# one (m x m) quadratic form instead of three FFTs (see PolyCountSketch.vjp_unit): at most
# 4 MiB of float32 per barrier, and one small matrix product per row.
QUADRATIC_MAX_FEATURES = 1025


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
        check_rows("the input", x, self.in_features)
        return _rowwise(lambda c: self.transform_unit(normalise(c)[0]), x, self.row_width)

    def vjp(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """∂(wᵀφ(x))/∂x for rows ``x`` (N, d), analytic: (N, d)."""
        check_rows("the input", x, self.in_features)

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
        d = check_count("in_features", in_features)
        n = check_count("n_components", n_components)
        p = check_count("degree", degree)
        gamma = check_positive("gamma", gamma)
        coef0 = check_positive("coef0", coef0, allow_zero=True)
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
        # run-time caches keyed by the classifier weights w (held, so identity is safe)
        self._w_hat: tuple[torch.Tensor, torch.dtype, torch.Tensor] | None = None
        self._quad: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

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

    def quadratic_form(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For degree 2, ``(G, c)`` with ∂(wᵀφ(x̂))/∂x̂ = x̂ G + c exactly (None for other
        degrees, or more than :data:`QUADRATIC_MAX_FEATURES` augmented features).

        With the two CountSketches C₀, C₁ of the augmented row z = (√γ x̂, √c₀), φ is their
        circular convolution, so wᵀφ = Σᵢ wᵢ Σⱼ (C₀z)ⱼ (C₁z)₍ᵢ₋ⱼ₎ = zᵀMz with
        M[a, b] = s₀[a] s₁[b] w[(i₀[a] + i₁[b]) mod n] (one nonzero per sketch column), and
        ∂/∂z = (M + Mᵀ) z. Keeping the first d coordinates and the chain rule through
        z = √γ x̂ gives G = γ S[:d, :d] and c = √(γ c₀) S[d, :d] with S = M + Mᵀ (built in
        float64, cached per w). The same gradient as the FFT route up to float32 round-off,
        at the cost of one (rows, d) x (d, d) product."""
        m = self.in_features + (1 if self.coef0 != 0 else 0)
        if self.degree != 2 or m > QUADRATIC_MAX_FEATURES:
            return None
        q = self._quad
        if q is not None and q[0] is w:
            return q[1], q[2]
        d, n = self.in_features, self.n_components
        i0, i1 = self.index[0].to(w.device), self.index[1].to(w.device)
        s0, s1 = (self.sign[k].to(w.device, torch.float64) for k in (0, 1))
        wd = w.to(torch.float64)
        mat = s0[:, None] * s1[None, :] * wd[(i0[:, None] + i1[None, :]) % n]
        sym = mat + mat.T
        g = (self.gamma * sym[:d, :d]).to(w.dtype).contiguous()
        if self.coef0 != 0:
            c = (math.sqrt(self.gamma * self.coef0) * sym[d, :d]).to(w.dtype)
        else:
            c = torch.zeros(d, dtype=w.dtype, device=w.device)
        self._quad = (w, g, c)
        return g, c

    def _spectrum(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """rfft(w) in ``dtype``, cached per w (the same numbers every call)."""
        c = self._w_hat
        if c is None or c[0] is not w or c[1] is not dtype:
            c = (w, dtype, torch.fft.rfft(w.to(dtype), n=self.n_components))
            self._w_hat = c
        return c[2]

    def vjp_unit(self, xhat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        quad = self.quadratic_form(w) if w.dtype == xhat.dtype else None
        if quad is not None:
            return torch.addmm(quad[1], xhat, quad[0])
        return self.vjp_unit_fft(xhat, w)

    def vjp_unit_fft(self, xhat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """:meth:`vjp_unit` through the sketches' spectra (any degree)."""
        rows, n, p = xhat.shape[0], self.n_components, self.degree
        if p == 1:
            grads = w.to(xhat.dtype).expand(rows, 1, n)
        else:
            w_hat = self._spectrum(w, xhat.dtype)  # (n//2 + 1,)
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
        d = check_count("in_features", in_features)
        n = check_count("n_components", n_components)
        gamma = check_positive("gamma", gamma)
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
