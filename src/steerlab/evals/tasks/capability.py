"""Capability under the steering of a behaviour task: one task's score, another's controllers.

A capability task (MMLU A/B accuracy) has no fitting data of its own: it measures what
steering *for a behaviour* costs. :class:`CapabilityUnder` pairs it with a behaviour task
for the harness: the controllers are fitted on the behaviour task's data (the same cached
fit, as :meth:`fit_name` is the behaviour task's name), and the capability task scores them.
Its name is ``"{capability}@{behaviour}"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steerlab.data import ContrastiveSet, LabeledSet
from steerlab.evals.tasks.base import Task, TaskResult
from steerlab.models import LoadedModel
from steerlab.runtime import Steer


class CapabilityUnder(Task):
    """``capability`` scored under controllers fitted for ``behaviour`` (see the module doc)."""

    kind = "capability"

    def __init__(self, capability: Task, behaviour: Task) -> None:
        self.capability = capability
        self.behaviour = behaviour
        self.name = f"{capability.name}@{behaviour.name}"  # type: ignore[misc]
        self.primary = capability.primary  # type: ignore[misc]
        self.recipe = behaviour.recipe  # type: ignore[misc]
        self.folds = behaviour.folds

    def fit_name(self) -> str:
        return self.behaviour.fit_name()

    def fit_set(self, fold: int = 0) -> ContrastiveSet | LabeledSet:
        return self.behaviour.fit_set(fold)

    def evaluate(self, lm: LoadedModel, steers: Steer | Sequence[Steer] | None = None, *,
                 fold: int = 0) -> TaskResult:
        r = self.capability.evaluate(lm, steers, fold=0)
        return TaskResult(task=self.name, metrics=r.metrics, n=r.n, seconds=r.seconds,
                          fold=fold, examples=r.examples)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "primary": self.primary,
                "folds": self.folds, "capability": self.capability.describe(),
                "fitted_on": self.behaviour.name}
