"""SAE quality on activations (:func:`evaluate_sae`): FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over the
evaluation data, mean L0 = mean number of non-zero codes per row, dead fraction = fraction of
features that fire on no evaluation row."""

from __future__ import annotations

from typing import Any

import torch

from steerlab.errors import DataError, SteeringError
from steerlab.sae.model import SparseAutoencoder
from steerlab.sae.sources import Activations, _chunks, _Moments, _reader

_EVAL_ROWS = 4096  # rows per block when evaluating


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


__all__ = ["evaluate_sae"]
