"""What differs between SAE architectures in training: one strategy object each
(:data:`STRATEGIES`), and the dead-feature bookkeeping and resampling they share (Bricken et
al.); :func:`steerlab.sae.train.train_sae` (whose docstring states the losses) runs the loop.

* relu: L1 penalty λ₁·mean Σᵢ fᵢ; dead features resampled.
* jumprelu: L0 penalty λ₀·mean Σᵢ H(preᵢ − θᵢ) with straight-through estimators in θ; the
  log-thresholds in their own optimiser group; resampling resets θ.
* topk: the AuxK loss of Gao et al. on the dead features; no resampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch

from steerlab.sae.model import SparseAutoencoder, _StepFn, _unit_rows

__all__ = ["STRATEGIES", "ArchitectureTraining", "Coefficients", "DeadFeatures", "Forward",
           "JumpReLUTraining", "ReLUTraining", "TopKTraining", "resample_dead"]


# -- dead features -----------------------------------------------------------------------------
class DeadFeatures:
    """Tokens since each feature last fired; a feature is dead when that reaches ``window``."""

    def __init__(self, d_sae: int, window: int, device: torch.device) -> None:
        self.window = window
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)

    def mask(self) -> torch.Tensor:
        """Boolean (d_sae,): the dead features."""
        return self.since_fired >= self.window

    @torch.no_grad()
    def update(self, f: torch.Tensor, n_rows: int) -> None:
        """Count ``n_rows`` more tokens; the features non-zero somewhere in ``f`` fired."""
        fired = (f != 0).any(0)
        self.since_fired += n_rows
        self.since_fired[fired] = 0

    def revive(self) -> None:
        """Restart the count of the dead features (after resampling them)."""
        self.since_fired[self.mask()] = 0


# -- one strategy per architecture -------------------------------------------------------------
@dataclass(frozen=True)
class Coefficients:
    """The loss settings of one run, in normalised units (see :func:`train_sae`)."""

    l1: float  # λ₁, relu
    l0: float  # λ₀, jumprelu
    aux: float  # α of AuxK, topk
    aux_k: int  # k_aux of AuxK, topk


@dataclass(frozen=True)
class Forward:
    """One batch's forward pass in normalised units: input, pre-activations, codes and
    reconstruction."""

    x: torch.Tensor
    pre: torch.Tensor
    f: torch.Tensor
    x_hat: torch.Tensor


class ArchitectureTraining:
    """How one SAE architecture trains; subclasses override what differs.

    ``resamples``: whether dead features are resampled (Bricken et al.). The base class gives
    one optimiser group holding every parameter but ``log_threshold``, no loss term and no
    reset beyond the shared weights.
    """

    resamples: ClassVar[bool] = True

    def __init__(self, coefficients: Coefficients) -> None:
        self.coefficients = coefficients

    def param_groups(self, sae: SparseAutoencoder, lr: float,
                     threshold_lr: float) -> list[dict[str, Any]]:
        """Adam parameter groups, each with its peak learning rate under ``"peak"``."""
        return [{"params": [p for n, p in sae.named_parameters() if n != "log_threshold"],
                 "lr": lr, "peak": lr}]

    def penalty(self, sae: SparseAutoencoder, fwd: Forward, warm: float,
                dead: DeadFeatures) -> torch.Tensor | None:
        """The term added to the reconstruction loss (``None``: nothing); ``warm`` is the
        coefficient warm-up factor in (0, 1]."""
        return None

    def reset_features(self, sae: SparseAutoencoder,
                       idx: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """Reset architecture-specific parameters of the resampled features ``idx`` (no
        grad); returns the (parameter, feature dimension) pairs whose Adam moments to clear."""
        return []


class ReLUTraining(ArchitectureTraining):
    """relu: L1 penalty λ₁·mean Σᵢ fᵢ, warmed up; dead features resampled."""

    def penalty(self, sae: SparseAutoencoder, fwd: Forward, warm: float,
                dead: DeadFeatures) -> torch.Tensor | None:
        l1 = self.coefficients.l1
        if l1 > 0:
            return warm * l1 * fwd.f.sum(-1).mean()
        return None


class JumpReLUTraining(ArchitectureTraining):
    """jumprelu: L0 penalty λ₀·mean Σᵢ H(preᵢ − θᵢ) (straight-through in θ), warmed up; the
    log-thresholds in their own optimiser group; resampling resets θ to its initial value."""

    def param_groups(self, sae: SparseAutoencoder, lr: float,
                     threshold_lr: float) -> list[dict[str, Any]]:
        groups = super().param_groups(sae, lr, threshold_lr)
        groups.append({"params": [sae.log_threshold], "lr": threshold_lr,
                       "peak": threshold_lr})
        return groups

    def penalty(self, sae: SparseAutoencoder, fwd: Forward, warm: float,
                dead: DeadFeatures) -> torch.Tensor | None:
        l0 = self.coefficients.l0
        if l0 > 0:
            step_fn = _StepFn.apply(fwd.pre, sae.threshold(), sae.config.jumprelu_bandwidth)
            return warm * l0 * cast(torch.Tensor, step_fn).sum(-1).mean()
        return None

    def reset_features(self, sae: SparseAutoencoder,
                       idx: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        sae.log_threshold[idx] = math.log(sae.config.jumprelu_init_threshold)
        return [(sae.log_threshold, 0)]


class TopKTraining(ArchitectureTraining):
    """topk: AuxK loss α·min(n_dead/k_aux, 1)·L_aux on the dead features (Gao et al.); no
    resampling."""

    resamples: ClassVar[bool] = False

    def penalty(self, sae: SparseAutoencoder, fwd: Forward, warm: float,
                dead: DeadFeatures) -> torch.Tensor | None:
        alpha, k_aux_base = self.coefficients.aux, self.coefficients.aux_k
        if alpha <= 0:
            return None
        is_dead = dead.mask()
        n_dead = int(is_dead.sum())
        if not n_dead:
            return None
        k_aux = min(k_aux_base, n_dead)
        e = (fwd.x - fwd.x_hat).detach()
        vals, idx = fwd.pre.masked_fill(~is_dead, -math.inf).topk(k_aux, dim=-1)
        e_hat = torch.zeros_like(fwd.pre).scatter(-1, idx, vals) @ sae.decoder_weight()
        aux = ((e_hat - e) ** 2).sum() / (e ** 2).sum().clamp_min(1e-12)
        return alpha * min(n_dead / k_aux_base, 1.0) * aux


# The training strategy of each architecture (every name in steerlab.sae.ARCHITECTURES).
STRATEGIES: dict[str, type[ArchitectureTraining]] = {
    "relu": ReLUTraining,
    "jumprelu": JumpReLUTraining,
    "topk": TopKTraining,
}


@torch.no_grad()
def resample_dead(sae: SparseAutoencoder, dead: torch.Tensor, x: torch.Tensor,
              opt: torch.optim.Optimizer, g: torch.Generator,
              strategy: ArchitectureTraining) -> int:
    """Bricken et al.'s resampling of the ``dead`` features from the batch ``x``; the
    architecture's own parameters are reset by ``strategy``."""
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
    touched += strategy.reset_features(sae, idx)
    for p, dim in touched:
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(dim, idx, 0.0)
    return n_dead
