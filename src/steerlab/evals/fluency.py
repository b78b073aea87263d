"""Fluency and diversity of generated text.

* :func:`dist_n`: Dist-n (Li et al., NAACL 2016), computed as the A-LQR and ODESteer
  evaluations do: *corpus-level*, the number of distinct n-grams over all texts divided by
  the number of n-grams over all texts, on lowercased whitespace tokens (``text.lower()
  .split()``). n-grams never cross from one text into the next. Higher is more diverse.
* :func:`repetition_rate`: how much each text repeats itself: for each text with at least
  one n-gram (n = 4 by default), ``1 - distinct n-grams / n-grams`` of that text; the rate is
  the mean over those texts. 0 means no 4-gram occurs twice within any text; a degenerate
  loop ("the cat the cat the cat ...") approaches 1. Same tokens as Dist-n.
* :func:`degenerate_fraction`: the share of texts that are degenerate (:func:`is_degenerate`):
  empty after ``strip``, or a 4-gram repetition rate (:func:`repetition_rate` of that text
  alone) above :data:`DEGENERATE_REPETITION` (0.5).
* :func:`generation_fluency`: everything the generation tasks report about their texts:
  perplexity under the (unsteered) model (:func:`~steerlab.evals.metrics.
  conditional_perplexity`), Dist-1/2/3 and the repetition rate.

Texts with fewer tokens than n contribute no n-grams. When no text has any, Dist-n and the
repetition rate are 0.0 (nothing distinct, nothing repeated), so the numbers stay finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from steerlab.data import Renderer
from steerlab.errors import DataError
from steerlab.evals.metrics import conditional_perplexity
from steerlab.models import LoadedModel

__all__ = ["DEGENERATE_REPETITION", "degenerate_fraction", "dist_n", "generation_fluency",
           "is_degenerate", "ngrams", "repetition_rate", "tokens"]

DEGENERATE_REPETITION = 0.5
"""A text whose own 4-gram repetition rate exceeds this is degenerate (a loop)."""


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise DataError("give a list of texts, not a single string")
    if not texts:
        raise DataError("give at least one text")


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"n must be a positive integer, got {n!r}")


def tokens(text: str) -> list[str]:
    """Lowercased whitespace tokens, as Dist-n is computed on."""
    return text.lower().split()


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The n-grams of one text's tokens, in order."""
    _check_n(n)
    toks = tokens(text)
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]


def dist_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level Dist-n: distinct n-grams over all texts / n-grams over all texts."""
    _check_texts(texts)
    _check_n(n)
    grams = [g for t in texts for g in ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    """Mean over texts (with at least one n-gram) of ``1 - distinct / total`` n-grams."""
    _check_texts(texts)
    _check_n(n)
    rates = []
    for t in texts:
        grams = ngrams(t, n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def is_degenerate(text: str, threshold: float = DEGENERATE_REPETITION) -> bool:
    """Whether ``text`` is empty (after ``strip``) or repeats itself: its own 4-gram
    repetition rate is above ``threshold``."""
    return not text.strip() or repetition_rate([text]) > threshold


def degenerate_fraction(texts: Sequence[str],
                        threshold: float = DEGENERATE_REPETITION) -> float:
    """Share of ``texts`` that are degenerate (:func:`is_degenerate`)."""
    _check_texts(texts)
    return sum(is_degenerate(t, threshold) for t in texts) / len(texts)


def generation_fluency(
    lm: LoadedModel,
    prompts: Sequence[str],
    texts: Sequence[str],
    *,
    renderer: Renderer | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """``ppl``, ``dist1``, ``dist2``, ``dist3`` and ``repetition`` of generated ``texts``.

    ``ppl`` is the perplexity of the texts given their (rendered) prompts under ``lm`` as it
    is when called: call it outside any steering so it is the unsteered model's. It is NaN
    when every text is empty (no token to score).
    """
    _check_texts(texts)
    if len(prompts) != len(texts):
        raise DataError(f"give one prompt per text: {len(prompts)} prompts, {len(texts)} texts")
    try:
        ppl = conditional_perplexity(lm, prompts, texts, renderer=renderer,
                                     batch_size=batch_size)
    except DataError:  # every text is empty: no token to score
        ppl = math.nan
    return {
        "ppl": ppl,
        "dist1": dist_n(texts, 1),
        "dist2": dist_n(texts, 2),
        "dist3": dist_n(texts, 3),
        "repetition": repetition_rate(texts),
    }
