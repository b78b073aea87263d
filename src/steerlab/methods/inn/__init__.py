"""INNSteer: linear steering in the latent space of an invertible network.

"Beyond Linear Activation Steering: Invertible Latent Transformations for Controlling LLM
Behavior" (arXiv 2606.08454). **This is steerlab's reconstruction, not the authors' method as
published: no official code exists** (none is known) and only the paper's abstract was
available to us; the spec (``specs/methods.md`` §b) gives what is certain and a third-party
recipe. Results of this controller are results of steerlab's reconstruction. Which parts are
the paper's and which are ours:

**Certain (the paper's abstract).** A lightweight invertible network φ maps an activation h
to a latent z = φ(h) in which the behaviour classes are amenable to linear control; steering
is a fixed translation there, mapped back exactly:

    z′ = φ(h) + λ·v,    h′ = φ⁻¹(z′)

which is a nonlinear, input-dependent edit of h.

**Architecture (third-party recipe, RealNVP).** φ = c_K ∘ … ∘ c_1 ∘ s with

* s(h) = (h − μ)/σ, per-dimension mean and standard deviation of the training activations,
  fixed (log|det| = −Σ log σ);
* K affine coupling layers (default 4): with a split of the dimensions into a conditioning
  part a and a transformed part b, y_a = x_a and y_b = x_b·exp(tanh(s(x_a))) + t(x_a), where
  (s, t) come from an MLP conditioner (default d_a → 512 → ReLU → 512 → ReLU → 2·d_b), so
  log|det| = Σ tanh(s), and the inverse is x_b = (y_b − t(y_a))·exp(−tanh(s(y_a))), exact.
  ``masks="halves"`` alternates the first and second half of the dimensions as the
  conditioning part (the recipe's parity i mod 2); ``"random"`` draws a fixed, seeded random
  half per layer. The conditioners' last layers start at zero, so φ starts as s.

The coupling layers are zuko's (``GeneralCouplingTransform``, ``ComposedTransform``) with our
tanh-bounded affine univariate transform (zuko's own affine bound is a soft clip, not tanh).

**Training (ours; the paper's loss is unknown).** On positive (y = 1) and negative (y = 0)
activations, minimise with AdamW (lr 1e-3, weight decay 1e-3, batch 64, gradient-norm clip
1.0, linear warm-up over 60 epochs then cosine decay, at most 300 epochs: the recipe's
defaults)

    L = w_nll · mean[(½‖z‖² − log|det J_c(h)|)/d]          (Gaussian NLL per dimension)
      + w_sep · S(z, y)                                       (separability)
      + w_logdet · mean[(log|det J_c(h)|/d)²]                 (volume regulariser)

where J_c is the Jacobian of the coupling layers (the standardisation's is a constant) and S
is either ``"logistic"``: the binary cross-entropy of a linear probe σ(wᵀz + b) trained
jointly with φ, or ``"margin"``: mean hinge max(0, 1 − ±uᵀ(z − m)) on the projections onto
the (detached) unit difference u of the batch's latent class means about their midpoint m.
Weights default to w_nll = 0.1 (ours; ``NLL_WEIGHT``), w_sep = 1 (the recipe's λ_dir) and
w_logdet = 0.5 (the recipe's λ_logdet). A seeded validation split (10 %) drives early
stopping (patience 30 epochs after warm-up; the best epoch's weights are kept). A
non-finite loss stops training with an error and leaves the controller unfitted.

**Direction.** ``direction="mean_diff"`` (the recipe's): v = mean φ(h₊) − mean φ(h₋) over the
training activations; ``"probe"`` (needs ``separation="logistic"``): the probe normal
u = w/‖w‖ scaled to the same class separation, v = u·uᵀ(mean φ(h₊) − mean φ(h₋)).

**Where.** One residual-stream site (``resid_post.L`` by default); default token scope
``"last"`` (as the third-party library). λ may differ per row; λ = 0 returns h bit for bit.

**Modules.** ``flow.py`` (the invertible map φ), ``controller.py`` (training and steering);
every name is importable from here.
"""

from __future__ import annotations

import torch

from steerlab.methods.checks import check_count as _int
from steerlab.methods.checks import splittable_rows as _splittable_rows
from steerlab.methods.inn.controller import (
    DIRECTIONS,
    MONITORS,
    NLL_WEIGHT,
    SEPARATIONS,
    Direction,
    INNSteer,
    Monitor,
    Separation,
    _split,
    linear_probe_accuracy,
)
from steerlab.methods.inn.flow import (
    MASKS,
    STD_FLOOR,
    LatentFlow,
    MaskKind,
    StandardiseTransform,
    TanhAffineTransform,
    coupling_masks,
)


def _check_rows(positive: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The old private row check (now :func:`steerlab.methods.checks.splittable_rows`)."""
    return _splittable_rows(positive, negative, "INNSteer")


__all__ = [
    "DIRECTIONS",
    "MASKS",
    "MONITORS",
    "NLL_WEIGHT",
    "SEPARATIONS",
    "STD_FLOOR",
    "Direction",
    "INNSteer",
    "LatentFlow",
    "MaskKind",
    "Monitor",
    "Separation",
    "StandardiseTransform",
    "TanhAffineTransform",
    "_check_rows",
    "_int",
    "_split",
    "coupling_masks",
    "linear_probe_accuracy",
]
