"""What an SAS vector pushes: its top SAE features and the corpus snippets that fire them."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerlab.activations import token_activations
from steerlab.errors import DataError
from steerlab.models import LoadedModel
from steerlab.sae.model import SparseAutoencoder
from steerlab.sites import Site


@dataclass
class FeatureReport:
    """One feature: its id, its value in the SAS vector, and its top-activating snippets."""

    feature: int
    value: float
    snippets: list[tuple[float, str]] = field(default_factory=list)  # (activation, text)

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "value": self.value,
                "snippets": [{"activation": a, "text": t} for a, t in self.snippets]}


def top_activating(lm: LoadedModel, sae: SparseAutoencoder, site: Site | str,
                   features: Sequence[int], texts: Sequence[str], *, n_snippets: int = 3,
                   window: int = 8, progress: bool = False) -> dict[int, list[tuple[float, str]]]:
    """For each feature id, the ``n_snippets`` tokens of ``texts`` where it fires most, as
    (activation, snippet): up to ``window`` tokens of left context and the token in «»."""
    if not texts:
        raise DataError("give a corpus with at least one text")
    ids_t = torch.tensor(list(features), dtype=torch.long)
    if ids_t.numel() and (int(ids_t.min()) < 0 or int(ids_t.max()) >= sae.config.d_sae):
        raise DataError(f"feature ids must be in [0, {sae.config.d_sae})")
    heaps: dict[int, list[tuple[float, int, str]]] = {int(f): [] for f in features}
    counter = 0
    iterator: Any = texts
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(texts, desc="feature activations", unit="text", leave=False)
    tok = lm.tokenizer
    for text in iterator:
        try:
            h = token_activations(lm, text, site)
        except DataError:
            continue
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            codes = sae.encode(h)[:, ids_t]  # (n_tokens, n_features)
        codes[0] = 0  # the first token is not what SAEs are trained on
        top_vals, top_pos = codes.max(dim=0)
        for j, f in enumerate(features):
            a = float(top_vals[j])
            if a <= 0:
                continue
            i = int(top_pos[j])
            left = tok.decode(ids[max(1, i - window):i])
            snippet = f"{left}«{tok.decode(ids[i:i + 1])}»".replace("\n", " ")
            counter += 1
            heap = heaps[int(f)]
            item = (a, counter, snippet)
            if len(heap) < n_snippets:
                heapq.heappush(heap, item)
            elif a > heap[0][0]:
                heapq.heapreplace(heap, item)
    return {f: [(round(a, 4), s) for a, _, s in sorted(h, reverse=True)]
            for f, h in heaps.items()}
