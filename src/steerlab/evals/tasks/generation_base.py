"""The shared machinery of the open-ended generation tasks (:class:`GenerationTask`).

A generation task answers its held-out prompts greedily in batches, judges the answers
(:meth:`GenerationTask.score`) and measures their fluency
(:meth:`GenerationTask.measure`: :func:`~steerlab.evals.fluency.generation_fluency`); the
tasks themselves are in :mod:`steerlab.evals.tasks.generation` (see its docstring) and
:mod:`steerlab.evals.tasks.refusal`.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from steerlab.errors import DataError
from steerlab.evals.fluency import generation_fluency
from steerlab.evals.tasks.base import Task, TaskResult
from steerlab.models import LoadedModel
from steerlab.runtime import Steer

DEFAULT_MAX_NEW_TOKENS = 40


# --------------------------------------------------------------------------- checks
# (the built-in sets and their readers are in steerlab.data.builtin)


def _cap(items: list[Any], n: int | None) -> list[Any]:
    return items if n is None else items[:n]


def _check_cap(name: str, n: int | None) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DataError(f"{name} must be a positive integer or None, got {n!r}")


def _check_positive(name: str, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"{name} must be at least 1, got {n!r}")


def _prompt_list(prompts: Sequence[str] | None, default: list[str]) -> list[str]:
    if prompts is None:
        return default
    if isinstance(prompts, str):
        raise DataError("give a list of prompts, not a single string")
    out = list(prompts)
    if not out:
        raise DataError("the prompt list is empty: give at least one prompt")
    for i, p in enumerate(out):
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"prompt {i} is not a non-empty string")
    return out


# --------------------------------------------------------------------------- base


def _unsteered(steers: Steer | Sequence[Steer] | None) -> bool:
    return steers is None or (not isinstance(steers, Steer) and len(steers) == 0)


class GenerationTask(Task):
    """Shared machinery of the generation tasks: held-out prompts, batched greedy generation,
    behaviour + fluency metrics, the cached unsteered value of the primary metric.

    Subclasses give :meth:`eval_prompts` and :meth:`score`.
    """

    primary_label: ClassVar[str] = ""
    """How printed rows name the primary metric (empty: its key, :attr:`primary`)."""

    def __init__(self, *, n_test: int | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 16,
                 ppl_batch_size: int | None = None) -> None:
        _check_cap("n_test", n_test)
        _check_positive("max_new_tokens", max_new_tokens)
        _check_positive("batch_size", batch_size)
        if ppl_batch_size is not None:
            _check_positive("ppl_batch_size", ppl_batch_size)
        self.n_test = n_test
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.ppl_batch_size = ppl_batch_size
        self._baseline: dict[tuple[Any, ...], float] = {}

    def _check_fold(self, fold: int) -> None:
        if fold not in range(self.folds):
            raise DataError(f"task {self.name!r} has {self.folds} fold(s); fold {fold!r} "
                            "does not exist")

    @abstractmethod
    def eval_prompts(self, fold: int = 0) -> list[str]:
        """The held-out prompts answered in :meth:`evaluate`."""

    @abstractmethod
    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> dict[str, float]:
        """Behaviour metrics of the answers (including :attr:`primary`)."""

    def examples(self, prompts: Sequence[str], texts: Sequence[str]) -> list[str]:
        """The generated texts kept in the result (the first three)."""
        return list(texts[:3])

    def generations(self, lm: LoadedModel, steers: Steer | Sequence[Steer] | None = None, *,
                    fold: int = 0) -> tuple[list[str], list[str]]:
        """(prompts, greedy answers) of ``fold``'s held-out prompts, generated in batches of
        :attr:`batch_size`."""
        from steerlab.runtime import generate

        self._check_fold(fold)
        prompts = self.eval_prompts(fold)
        texts = generate(lm, prompts, steers=None if _unsteered(steers) else steers,
                         max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        return prompts, texts

    def _key(self, lm: LoadedModel, fold: int) -> tuple[Any, ...]:
        return (lm.info.model_id, id(lm.model), fold, self.max_new_tokens,
                tuple(self.eval_prompts(fold)))

    def unsteered_value(self, lm: LoadedModel, *, fold: int = 0) -> float:
        """The primary metric without steering (generated once per model, then cached)."""
        key = self._key(lm, fold)
        if key not in self._baseline:
            prompts, texts = self.generations(lm, None, fold=fold)
            self._baseline[key] = self.score(prompts, texts)[self.primary]
        return self._baseline[key]

    def measure(self, lm: LoadedModel, prompts: Sequence[str],
                texts: Sequence[str]) -> dict[str, float]:
        """Behaviour (:meth:`score`) and fluency (:func:`~steerlab.evals.fluency.
        generation_fluency`, perplexity in batches of :attr:`ppl_batch_size`, default
        :attr:`batch_size`) of answers ``texts`` to ``prompts``, however they were generated.
        Call it outside any steering: the perplexity is the model's as it is when called."""
        metrics = self.score(prompts, texts)
        metrics.update(generation_fluency(lm, prompts, texts,
                                          batch_size=self.ppl_batch_size or self.batch_size))
        return metrics

    def evaluate(self, lm: LoadedModel, steers: Steer | Sequence[Steer] | None = None, *,
                 fold: int = 0) -> TaskResult:
        """Generate, judge and measure fluency; see :mod:`steerlab.evals.tasks.generation`."""
        start = time.perf_counter()
        prompts, texts = self.generations(lm, steers, fold=fold)
        metrics = self.measure(lm, prompts, texts)
        seconds = time.perf_counter() - start
        if _unsteered(steers):
            self._baseline[self._key(lm, fold)] = metrics[self.primary]
        base = self.unsteered_value(lm, fold=fold)
        metrics[f"{self.primary}_shift"] = metrics[self.primary] - base
        return TaskResult(task=self.name, metrics=metrics, n=len(prompts), seconds=seconds,
                          fold=fold, examples=self.examples(prompts, texts))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_test": self.n_test,
                "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                "decoding": "greedy"}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan

