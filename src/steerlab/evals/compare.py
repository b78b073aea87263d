"""Behaviour vs fluency of several steering configurations on one generation task.

The benchmarks' comparison tables (a method at a few strengths against CAA at a few, on the
same prompts) all come from :func:`compare_configs`: the task generates its greedy answers
once unsteered and once per configuration (:meth:`~steerlab.evals.tasks.generation.
GenerationTask.generations`), and measures each set of answers the same way
(:meth:`~steerlab.evals.tasks.generation.GenerationTask.measure`: the task's judge, and the
answers' perplexity under the unsteered model with Dist-n and repetition). Each row also
holds the primary metric's change from the unsteered answers (``shift``), the perplexity
ratio to the unsteered answers' (``ppl_ratio``) and the share of degenerate answers
(:func:`~steerlab.evals.fluency.degenerate_fraction`).

:func:`sentiment_sweep` is :func:`compare_configs` on the :class:`~steerlab.evals.tasks.
Sentiment` task with given prompts (answers in batches of 19, perplexity in batches of 8, as
the benchmarks have always run it); :func:`strength_configs` builds the configurations of
one controller at several strengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steerlab.evals.fluency import degenerate_fraction
from steerlab.evals.tasks.generation import GenerationTask, Sentiment
from steerlab.models import LoadedModel
from steerlab.runtime import Steer

__all__ = ["Config", "compare_configs", "format_row", "sentiment_sweep", "strength_configs"]

Config = tuple[str, Sequence[Steer]]
"""A named steering configuration: (label, the steers applied together)."""

EXAMPLE_CHARS = 100
"""Characters of the first answer kept in each row (``example``)."""


def strength_configs(controller: Any, strengths: Sequence[float], name: str, *,
                     scope: str | None = None) -> list[tuple[str, list[Steer]]]:
    """One configuration per strength: ``(name.format(s=s), [Steer(controller, s, scope)])``
    (``name`` such as ``"CAA x{s:g}"``; ``scope`` None: the controller's own)."""
    return [(name.format(s=s), [Steer(controller, s, scope)]) for s in strengths]


def _row(name: str, metrics: dict[str, float], base: dict[str, float] | None,
         texts: Sequence[str], primary: str) -> dict[str, Any]:
    """One table row: the config, its primary metric, shift, perplexity, ratio, example,
    degenerate fraction, then the task's other metrics."""
    if base is None:  # the unsteered row itself
        shift, ratio = 0.0, 1.0
    else:
        shift, ratio = metrics[primary] - base[primary], metrics["ppl"] / base["ppl"]
    row: dict[str, Any] = {"config": name, primary: metrics[primary], "shift": shift,
                           "ppl": metrics["ppl"], "ppl_ratio": ratio,
                           "example": texts[0][:EXAMPLE_CHARS],
                           "degenerate": degenerate_fraction(texts)}
    row.update({k: v for k, v in metrics.items() if k not in row})
    return row


def format_row(row: dict[str, Any], primary: str, label: str = "", width: int = 36) -> str:
    """``  CONFIG  LABEL +0.123 shift +0.045 ppl ratio 1.07``: one row as the sweeps print
    it (``label`` defaults to the metric's key)."""
    return (f"  {row['config']:{width}s} {label or primary} {row[primary]:+.3f} "
            f"shift {row['shift']:+.3f} ppl ratio {row['ppl_ratio']:.2f}")


def compare_configs(lm: LoadedModel, task: GenerationTask, configs: Sequence[Config], *,
                    fold: int = 0, verbose: bool = False) -> list[dict[str, Any]]:
    """Rows of behaviour vs fluency for ``configs`` on ``task``'s held-out prompts; see the
    module docstring. The first row is the unsteered answers' (``config`` "unsteered",
    shift 0, ratio 1). ``verbose`` prints each steered row as it is measured
    (:func:`format_row`)."""
    primary = task.primary
    prompts, plain = task.generations(lm, None, fold=fold)
    base = task.measure(lm, prompts, plain)
    rows = [_row("unsteered", base, None, plain, primary)]
    for name, steers in configs:
        _, texts = task.generations(lm, list(steers), fold=fold)
        rows.append(_row(name, task.measure(lm, prompts, texts), base, texts, primary))
        if verbose:
            print(format_row(rows[-1], primary, task.primary_label))
    return rows


def sentiment_sweep(
    lm: LoadedModel,
    prompts: Sequence[str],
    configs: Sequence[Config],
    *,
    max_new_tokens: int = 40,
    batch_size: int = 19,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Behaviour vs fluency for several steering configurations on the same prompts.

    :func:`compare_configs` on the :class:`~steerlab.evals.tasks.Sentiment` task over
    ``prompts`` (greedy answers of ``max_new_tokens`` tokens in batches of ``batch_size``,
    perplexity in batches of 8). Each row: mean VADER compound of the answers (``vader``),
    its shift from unsteered, the answers' perplexity under the unsteered model with its
    ratio to the unsteered answers', the degenerate fraction and the other fluency metrics.
    The first row is the unsteered baseline.
    """
    task = Sentiment(prompts=prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     ppl_batch_size=8)
    return compare_configs(lm, task, configs, verbose=verbose)
