"""SAE quality on a model: the language-model loss with the reconstruction spliced in."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from steerlab.errors import DataError
from steerlab.models import LoadedModel
from steerlab.sae import SparseAutoencoder
from steerlab.sites import Site


def spliced_loss(lm: LoadedModel, sae: SparseAutoencoder, site: Site | str,
                 texts: Sequence[str], *, max_length: int = 128,
                 progress: bool = False) -> dict[str, Any]:
    """Next-token cross-entropy on ``texts`` with and without the SAE's reconstruction
    replacing the activation at ``site`` on every token but the first (which SAEs are not
    trained on). One text per forward pass (no padding), token-weighted means.

    Returns ``{"loss": clean, "loss_spliced": spliced, "increase": spliced - clean,
    "n_tokens": ...}``.
    """
    from steerlab.methods.sas import SAEReconstruction
    from steerlab.runtime import Steer, steering

    if not texts:
        raise DataError("give at least one text")
    s = Site.parse(site) if isinstance(site, str) else site
    recon = SAEReconstruction(sae, s)
    totals = {"clean": 0.0, "spliced": 0.0}
    n_tokens = 0
    iterator: Any = texts
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(texts, desc="spliced loss", unit="text", leave=False)
    for text in iterator:
        ids = lm.tokenizer(text, return_tensors="pt", truncation=True,
                           max_length=max_length)["input_ids"].to(lm.device)
        if ids.shape[1] < 2:
            continue
        n = ids.shape[1] - 1
        with torch.no_grad():
            clean = float(lm.model(input_ids=ids, labels=ids, use_cache=False).loss)
            with steering(lm, Steer(recon, 1.0, "from:1")):
                spliced = float(lm.model(input_ids=ids, labels=ids, use_cache=False).loss)
        totals["clean"] += clean * n
        totals["spliced"] += spliced * n
        n_tokens += n
    if n_tokens == 0:
        raise DataError("the texts have no tokens to predict")
    clean_mean = totals["clean"] / n_tokens
    spliced_mean = totals["spliced"] / n_tokens
    if not (math.isfinite(clean_mean) and math.isfinite(spliced_mean)):
        raise DataError("the loss is not finite")
    return {"loss": round(clean_mean, 5), "loss_spliced": round(spliced_mean, 5),
            "increase": round(spliced_mean - clean_mean, 5), "n_tokens": n_tokens}
