"""Diagnostics for model-based steering (A-LQR, spec §6): pure functions on tensors.

* :mod:`~steerlab.diagnostics.linearity` — Taylor residuals of a block around an operating
  point; subspace alignment of Jacobians and its random baseline.
* :mod:`~steerlab.diagnostics.tracking` — the a-posteriori tracking-error bound.
* :mod:`~steerlab.diagnostics.plots` — PNG + JSON + markdown figures (needs matplotlib, imported
  on first use).

Errors are :class:`DiagnosticsError` (a :class:`~steerlab.errors.SteerlabError`).
"""

from __future__ import annotations

from steerlab.diagnostics.linearity import (
    DiagnosticsError,
    alignment_matrix,
    alignment_score,
    default_rank,
    linearity_residuals,
    random_baseline,
)
from steerlab.diagnostics.plots import (
    plot_alignment,
    plot_linearity,
    plot_setpoint,
    plot_tracking_bound,
)
from steerlab.diagnostics.tracking import (
    TrackingBound,
    closed_loop,
    induced_norm,
    lyapunov_weights,
    p_norm,
    tracking_bound,
    transition,
    transition_norms,
)

__all__ = [
    "DiagnosticsError",
    "TrackingBound",
    "alignment_matrix",
    "alignment_score",
    "closed_loop",
    "default_rank",
    "induced_norm",
    "linearity_residuals",
    "lyapunov_weights",
    "p_norm",
    "plot_alignment",
    "plot_linearity",
    "plot_setpoint",
    "plot_tracking_bound",
    "random_baseline",
    "tracking_bound",
    "transition",
    "transition_norms",
]
