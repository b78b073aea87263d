"""The evaluation task contract: what a task fits controllers on, and how it scores them.

A task owns its data and its seeded train/test split, so a controller is never evaluated on
the items it was fitted on. The harness (sweeps, calibration, reports) only uses this
interface, so a new task or a new method plugs in without changes to the harness:

* ``fit_set(fold)``: the data controllers are fitted on for this task (the train part);
* ``recipe``: the token position fitting reads (``"ab"`` for A/B tasks: the answer letter;
  ``None``: each method's own default, e.g. the last token for CAA, the completion mean for
  A-LQR's setpoints);
* ``evaluate(lm, steers, fold)``: score the test part under the given steering (``None``:
  unsteered) and return a :class:`TaskResult` of named metrics;
* ``primary``: the metric whose increase means "more of the positive class's behaviour",
  ``kind`` says whether the task measures behaviour, capability or fluency, and ``folds``
  how many train/test folds it has (TruthfulQA: 2; most tasks: 1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from steerlab.data import ContrastiveSet, LabeledSet
from steerlab.models import LoadedModel
from steerlab.runtime import Steer

TaskKind = Literal["behaviour", "capability", "fluency"]


@dataclass
class TaskResult:
    """Named metrics of one evaluation (plain floats), with what produced them."""

    task: str
    metrics: dict[str, float]
    n: int
    seconds: float
    fold: int = 0
    examples: list[str] = field(default_factory=list)  # a few generated texts, if any

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Task(ABC):
    """Base class of evaluation tasks; see the module docstring."""

    name: ClassVar[str]
    kind: ClassVar[TaskKind] = "behaviour"
    primary: ClassVar[str]
    recipe: ClassVar[str | None] = None
    folds: int = 1

    @abstractmethod
    def fit_set(self, fold: int = 0) -> ContrastiveSet | LabeledSet:
        """The data controllers are fitted on (the train part of ``fold``)."""

    @abstractmethod
    def evaluate(self, lm: LoadedModel, steers: Steer | Sequence[Steer] | None = None, *,
                 fold: int = 0) -> TaskResult:
        """Score the test part of ``fold`` under ``steers`` (``None``: unsteered)."""

    def fit_name(self) -> str:
        """The name fitted controllers are cached under (tasks that share fitting data, such
        as a capability task scored under a behaviour task's steering, share fits)."""
        return self.name

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (name, kind, sizes, data path, seed)."""
        return {"name": self.name, "kind": self.kind, "primary": self.primary,
                "folds": self.folds}
