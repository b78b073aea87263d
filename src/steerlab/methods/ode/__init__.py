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

**Modules.** ``features.py`` (the feature maps φ), ``barrier.py`` (h and the integration),
``controller.py`` (the controllers and presets); every name is importable from here.
"""

from __future__ import annotations

from torchdiffeq import odeint

from steerlab.methods.checks import check_count as _count
from steerlab.methods.checks import check_positive as _positive
from steerlab.methods.checks import check_rows as _check_rows
from steerlab.methods.checks import check_times as _check_strength
from steerlab.methods.ode.barrier import (
    FIELD_EPS,
    SOLVERS,
    Barrier,
    GradMethod,
    SolverName,
    integrate,
)
from steerlab.methods.ode.controller import (
    _SKETCH_SOURCE,
    PAPER_ODESTEER,
    PAPER_STEP_ODESTEER,
    REFERENCE,
    ODESteer,
    StepODESteer,
    _ODEBase,
    barrier_along_path,
)
from steerlab.methods.ode.features import (
    CHUNK_ELEMENTS,
    FEATURE_KINDS,
    FEATURE_MAPS,
    NORM_EPS,
    FeatureKind,
    FeatureMap,
    PolyCountSketch,
    RandomFourierFeatures,
    _chunks,
    _rowwise,
    median_gamma,
    normalise,
    through_normalisation,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "FEATURE_KINDS",
    "FEATURE_MAPS",
    "FIELD_EPS",
    "NORM_EPS",
    "PAPER_ODESTEER",
    "PAPER_STEP_ODESTEER",
    "REFERENCE",
    "SOLVERS",
    "_SKETCH_SOURCE",
    "Barrier",
    "FeatureKind",
    "FeatureMap",
    "GradMethod",
    "ODESteer",
    "PolyCountSketch",
    "RandomFourierFeatures",
    "SolverName",
    "StepODESteer",
    "_ODEBase",
    "_check_rows",
    "_check_strength",
    "_chunks",
    "_count",
    "_positive",
    "_rowwise",
    "barrier_along_path",
    "integrate",
    "median_gamma",
    "normalise",
    "odeint",
    "through_normalisation",
]
