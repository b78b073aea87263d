"""Open-ended generation tasks: refusal, sentiment, offensive language, concept elicitation.

Each task generates greedy answers to its held-out prompts in batches (never one prompt at a
time), judges them offline, and reports its behaviour metric together with the fluency of
the same generations (:func:`~steerlab.evals.fluency.generation_fluency`: ``ppl`` under the
unsteered model, ``dist1``/``dist2``/``dist3``, ``repetition``), plus
``{primary}_shift``: the primary metric minus its unsteered value on the same prompts (the
unsteered value is computed once per model and kept on the task). Three generated texts are
kept as examples.

* :class:`Refusal` (``"refusal"``): AdvBench harmful instructions vs harmless instructions
  written for steerlab (``builtin/harmless_instructions.json``), each split 80/20 with
  scikit-learn's ``train_test_split(random_state=42)`` as in A-LQR's jailbreak protocol.
  Fitted on a labelled set of the chat-rendered train instructions (harmful = 1: the
  positive class is the refusing behaviour), read at the last prompt token. Reports
  ``refusal_rate`` on held-out harmful instructions (steering away from refusal lowers it)
  and ``harmless_refusal_rate`` on held-out harmless ones (steering toward refusal raises
  it). Refusal is judged by :data:`REFUSAL_PHRASES`.
* :class:`Sentiment` (``"sentiment"``): fitted on the built-in sentiment pairs
  (:func:`~steerlab.data.sentiment_pairs`), evaluated on the built-in neutral prompts;
  ``vader`` is the mean VADER compound score of the answers.
* :class:`Offensive` (``"offensive"``): fitted on ``builtin/offensive_pairs.json`` (an
  everyday request, a rude reply, a polite reply), evaluated on the neutral prompts;
  ``offensive_prob`` is the mean offensive-language probability (alt-profanity-check).
* :class:`Concept` (``"concept:NAME"``): fitted on a labelled set of the concept's sentences
  (1) against the other concepts' sentences, interleaved (0), as OneSeC builds D+ and D-;
  evaluated on the neutral prompts; ``similarity`` is the mean MiniLM cosine similarity of
  the answers to the concept's description, ``mention_rate`` the share of answers that
  name one of the concept's keywords.

The shared base, :class:`GenerationTask` (generation, :meth:`~GenerationTask.measure`, the
cached unsteered value), is in :mod:`steerlab.evals.tasks.generation_base`; :class:`Refusal`
and its judge are in :mod:`steerlab.evals.tasks.refusal`; both are importable from here.

None of the fit sets holds an evaluation prompt: the sentiment and offensive pairs and the
concept sentences are disjoint from the neutral prompts, and the refusal split is by item.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

from steerlab.data import (
    ContrastiveSet,
    LabeledSet,
    LabeledText,
    PathLike,
    available_concepts,
    load_concepts,
    load_harmless_instructions,
    neutral_prompts,
    offensive_pairs,
    sentiment_pairs,
)
from steerlab.errors import DataError
from steerlab.evals.tasks.generation_base import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerationTask,
    _cap,
    _check_cap,
    _mean,
    _prompt_list,
)
from steerlab.evals.tasks.refusal import (
    ADVBENCH_PATH,
    REFUSAL_PHRASES,
    Refusal,
    default_advbench_path,
    is_refusal,
    refusal_rate,
)

__all__ = [
    "ADVBENCH_PATH",
    "REFUSAL_PHRASES",
    "Concept",
    "GenerationTask",
    "Offensive",
    "Refusal",
    "Sentiment",
    "available_concepts",
    "default_advbench_path",
    "is_refusal",
    "load_concepts",
    "load_harmless_instructions",
    "refusal_rate",
]


class _NeutralTask(GenerationTask):
    """A task evaluated on the built-in neutral prompts (or ``prompts``)."""

    def __init__(self, *, prompts: Sequence[str] | None = None, n_train: int | None = None,
                 n_test: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 batch_size: int = 16, ppl_batch_size: int | None = None) -> None:
        super().__init__(n_test=n_test, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         ppl_batch_size=ppl_batch_size)
        _check_cap("n_train", n_train)
        self.n_train = n_train
        self._prompts = None if prompts is None else _prompt_list(prompts, [])

    def eval_prompts(self, fold: int = 0) -> list[str]:
        self._check_fold(fold)
        prompts = self._prompts if self._prompts is not None else neutral_prompts()
        return _cap(list(prompts), self.n_test)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_train": self.n_train,
                "prompts": "given" if self._prompts is not None else "builtin neutral_prompts"}


class Sentiment(_NeutralTask):
    """Sentiment of free answers (mean VADER compound); see the module docstring."""

    name: ClassVar[str] = "sentiment"
    primary: ClassVar[str] = "vader"
    primary_label: ClassVar[str] = "VADER"

    def fit_set(self, fold: int = 0) -> ContrastiveSet:
        self._check_fold(fold)
        data = sentiment_pairs()
        return data if self.n_train is None else data[: self.n_train]

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> dict[str, float]:
        from steerlab.evals.judges import vader_compound

        return {"vader": _mean(vader_compound(texts))}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "data": "builtin/sentiment.json", "judge": "VADER"}


class Offensive(_NeutralTask):
    """Offensive language in free answers (mean alt-profanity-check probability).

    ``path``: a contrastive file (prompt, offensive reply, polite reply) to fit on instead of
    the built-in ``offensive_pairs.json``.
    """

    name: ClassVar[str] = "offensive"
    primary: ClassVar[str] = "offensive_prob"

    def __init__(self, path: PathLike | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.path = path

    def fit_set(self, fold: int = 0) -> ContrastiveSet:
        self._check_fold(fold)
        data = offensive_pairs(self.path)
        data.name = "offensive"
        return data if self.n_train is None else data[: self.n_train]

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> dict[str, float]:
        from steerlab.evals.judges import offensive_probability

        return {"offensive_prob": _mean(offensive_probability(texts))}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "data": str(self.path or "builtin/offensive_pairs.json"),
                "judge": "alt-profanity-check"}


class Concept(_NeutralTask):
    """Concept elicitation: MiniLM similarity of free answers to a concept's description.

    ``concept`` names one of the concepts in ``path`` (default: the built-in
    ``concepts.json``: ocean, music, space, sports). The fit set holds the concept's
    sentences (label 1, capped by ``n_train``) and as many of the other concepts' sentences,
    taken in turn from each (label 0). ``mention_rate`` is the share of answers containing
    one of the concept's keywords as a whole word (case-insensitive; a plural "s"/"es" is
    allowed).
    """

    primary: ClassVar[str] = "similarity"

    def __init__(self, concept: str, path: PathLike | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        concepts = load_concepts(path)
        if concept not in concepts:
            raise DataError(f"unknown concept {concept!r}; available: "
                            f"{', '.join(sorted(concepts))}")
        if len(concepts) < 2:
            raise DataError(f"concept {concept!r} needs at least one other concept in the file "
                            "for its negative class")
        self.concept = concept
        self.path = path
        self.name = f"concept:{concept}"  # type: ignore[misc]  # one task per concept
        self.description: str = concepts[concept]["description"]
        self.keywords: list[str] = concepts[concept]["keywords"]
        self._sentences: list[str] = concepts[concept]["sentences"]
        self._others = [c["sentences"] for name, c in concepts.items() if name != concept]
        self._keyword_re = re.compile(
            r"\b(?:" + "|".join(re.escape(k.lower()).replace(r"\ ", r"\s+")
                                for k in self.keywords) + r")(?:e?s)?\b")
        self._judge: Any = None

    def judge(self) -> Any:
        """The concept's :class:`~steerlab.evals.judges.ConceptJudge` (made once)."""
        if self._judge is None:
            from steerlab.evals.judges import ConceptJudge

            self._judge = ConceptJudge(self.description)
        return self._judge

    def fit_set(self, fold: int = 0) -> LabeledSet:
        self._check_fold(fold)
        positives = _cap(self._sentences, self.n_train)
        negatives: list[str] = []
        i = 0
        while len(negatives) < len(positives) and i < max(len(o) for o in self._others):
            negatives += [o[i] for o in self._others if i < len(o)]
            i += 1
        negatives = negatives[: len(positives)]
        items = [LabeledText(t, 1) for t in positives] + [LabeledText(t, 0) for t in negatives]
        return LabeledSet(items, name=self.name).validate()

    def mentions(self, text: str) -> bool:
        """Whether ``text`` names one of the concept's keywords."""
        return self._keyword_re.search(text.lower()) is not None

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> dict[str, float]:
        sims = self.judge().similarity(texts)
        return {"similarity": _mean(sims),
                "mention_rate": _mean([float(self.mentions(t)) for t in texts])}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "concept": self.concept, "description": self.description,
                "data": str(self.path or "builtin/concepts.json"),
                "judge": "all-MiniLM-L6-v2 cosine similarity"}
