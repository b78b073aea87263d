"""Evaluation tasks (see :mod:`steerlab.evals.tasks.base` for the contract) and a factory.

Task names as the CLI and :func:`make_task` read them:

==================  =========================================================================
``ab:BEHAVIOUR``    CAA behaviour A/B set: P(behaviour-matching letter) (7 behaviours)
``mmlu_ab``         capability: CAA's MMLU A/B accuracy
``truthfulqa_mc``   TruthfulQA MC1/MC2 by log-probability, 2-fold
``refusal``         refusal rate on held-out AdvBench / harmless instructions
``sentiment``       VADER of answers to neutral prompts
``offensive``       offensive-language probability of answers to neutral prompts
``concept:NAME``    MiniLM similarity of answers to a concept description
==================  =========================================================================
"""

from __future__ import annotations

import inspect
from typing import Any

from steerlab.errors import DataError
from steerlab.evals.tasks.ab import BEHAVIOURS, BehaviourAB, MMLUCapability
from steerlab.evals.tasks.base import Task, TaskResult
from steerlab.evals.tasks.capability import CapabilityUnder
from steerlab.evals.tasks.generation import (
    Concept,
    GenerationTask,
    Offensive,
    Refusal,
    Sentiment,
    available_concepts,
)
from steerlab.evals.tasks.truthfulqa import TruthfulQAMC
from steerlab.models import LoadedModel

TASKS: dict[str, type[Task]] = {
    "ab": BehaviourAB,
    "mmlu_ab": MMLUCapability,
    "truthfulqa_mc": TruthfulQAMC,
    "refusal": Refusal,
    "sentiment": Sentiment,
    "offensive": Offensive,
    "concept": Concept,
}


def _accepted(cls: type[Task]) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names |= {p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD}
        if not any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values()):
            break
    return names - {"self"}


def make_task(spec: str, lm: LoadedModel | None = None, **options: Any) -> Task:
    """Build a task from its name (``"sentiment"``, ``"ab:sycophancy"``, ``"concept:ocean"``,
    ...; see the module docstring). ``options`` (``n_train``, ``n_test``, ``max_new_tokens``,
    ``batch_size``, ``path``, ...) go to the task's constructor where it takes them; ``None``
    values are dropped, and so are options this task does not take (so one set of options
    serves several tasks). ``lm`` gives the refusal task its chat template."""
    kind, _, arg = spec.partition(":")
    if kind not in TASKS:
        raise DataError(f"unknown task {spec!r}; known: ab:BEHAVIOUR ({', '.join(BEHAVIOURS)}),"
                        f" mmlu_ab, truthfulqa_mc, refusal, sentiment, offensive, concept:NAME")
    cls = TASKS[kind]
    opts = {k: v for k, v in options.items() if v is not None}
    accepted = _accepted(cls)
    if lm is not None and "tokenizer" in accepted:
        opts.setdefault("tokenizer", lm.tokenizer)
    dropped = [k for k in opts if k not in accepted]
    for k in dropped:
        opts.pop(k)
    args: list[Any] = []
    if kind in ("ab", "concept"):
        if not arg:
            raise DataError(f"task {kind!r} needs a name: {kind}:NAME")
        args.append(arg)
    elif arg:
        raise DataError(f"task {kind!r} takes no ':{arg}' part")
    return cls(*args, **opts)


__all__ = [
    "BEHAVIOURS",
    "TASKS",
    "BehaviourAB",
    "CapabilityUnder",
    "Concept",
    "GenerationTask",
    "MMLUCapability",
    "Offensive",
    "Refusal",
    "Sentiment",
    "Task",
    "TaskResult",
    "TruthfulQAMC",
    "available_concepts",
    "make_task",
]
