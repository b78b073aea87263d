"""Loaders: the public data sets' formats and generic contrastive / labelled files.

Every loader takes a ``str`` or ``os.PathLike`` and raises :class:`~steerlab.errors.DataError`
naming the file, the line or item, and the missing field.

* **CAA A/B** (:func:`load_caa_ab`): a JSON list (or JSONL) of ``{"question",
  "answer_matching_behavior", "answer_not_matching_behavior"}``; the answers are usually
  ``"(A)"``/``"(B)"`` and are kept as given. The set is named after the behaviour, i.e. the parent
  folder of ``generate_dataset.json``.
* **MMLU A/B** (:func:`load_mmlu_ab`): a JSON list of ``{"prompt", "correct", "incorrect", ...}``.
* **TruthfulQA** (:func:`load_truthfulqa`, :func:`load_truthfulqa_labeled`): the original CSV with
  columns ``Type, Category, Question, Best Answer, Correct Answers, Incorrect Answers, Source``,
  multiple answers separated by ``;``.
* **AdvBench** (:func:`load_advbench`): CSV ``goal,target``; only the goals (harmful requests) are
  returned, as a list of prompts for refusal studies. It is not contrastive.
* **Generic JSONL / JSON / CSV** (:func:`load_jsonl`, :func:`load_csv`): rows with
  ``prompt``/``positive``/``negative`` fields give a :class:`ContrastiveSet`; rows with
  ``text``/``label`` give a :class:`LabeledSet`. Field names are configurable. Labels may be
  ``0``/``1``, booleans, or the strings ``"0"``, ``"1"``, ``"false"``, ``"true"``,
  ``"negative"``, ``"positive"`` (any case). Blank JSONL lines are skipped. A ``.json`` file may
  hold a list of rows, or an object whose ``"pairs"``, ``"items"`` or ``"data"`` key holds one.
* :func:`load_dataset` picks one of the above from the file's extension and content.

The row-level reading is in :mod:`steerlab.data.files`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from steerlab.data.files import (
    PathLike,
    Record,
    _existing_file,
    _label,
    _no_rows,
    _read_csv,
    _read_json_or_jsonl,
    _set_name,
    required_field,
)
from steerlab.data.sets import ContrastivePair, ContrastiveSet, LabeledSet, LabeledText
from steerlab.errors import DataError

__all__ = [
    "load_advbench",
    "load_caa_ab",
    "load_csv",
    "load_dataset",
    "load_jsonl",
    "load_mmlu_ab",
    "load_truthfulqa",
    "load_truthfulqa_labeled",
]


# --------------------------------------------------------------------------- rows to pairs


def _pairs(
    p: Path, records: list[Record], prompt: str, positive: str, negative: str
) -> list[ContrastivePair]:
    if not records:
        raise _no_rows(p)
    return [
        ContrastivePair(
            prompt=required_field(p, where, row, prompt),
            positive=required_field(p, where, row, positive),
            negative=required_field(p, where, row, negative),
        )
        for where, row in records
    ]


# --------------------------------------------------------------------------- loaders


def load_caa_ab(path: PathLike) -> ContrastiveSet:
    """Load a CAA A/B file (JSON list or JSONL).

    Each ``{"question", "answer_matching_behavior", "answer_not_matching_behavior"}`` becomes a
    pair ``(question, matching answer, not-matching answer)``, the answers kept as given (e.g.
    ``"(A)"``). The set is named after the behaviour: the parent folder for CAA's generic file
    names (``generate_dataset.json``, ``test_dataset_ab.json``, ...), else the file's stem.
    """
    p, records = _read_json_or_jsonl(path)
    pairs = _pairs(
        p, records, "question", "answer_matching_behavior", "answer_not_matching_behavior"
    )
    return ContrastiveSet(pairs, name=_set_name(p)).validate()


def load_mmlu_ab(path: PathLike) -> ContrastiveSet:
    """Load MMLU recast as A/B: ``{"prompt", "correct", "incorrect", ...}`` rows."""
    p, records = _read_json_or_jsonl(path)
    pairs = _pairs(p, records, "prompt", "correct", "incorrect")
    return ContrastiveSet(pairs, name=_set_name(p)).validate()


def split_answers(text: str) -> list[str]:
    out: list[str] = []
    for part in text.split(";"):
        answer = part.strip()
        if answer and answer not in out:
            out.append(answer)
    return out


def truthfulqa_rows(path: PathLike, need: Sequence[str]) -> tuple[Path, list[Record]]:
    p, header, records = _read_csv(path)
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(
            f"{p}: line 1: not a TruthfulQA CSV, missing column(s) "
            f"{', '.join(map(repr, missing))} (found: {', '.join(map(repr, header))})"
        )
    if not records:
        raise _no_rows(p)
    return p, records


def load_truthfulqa(path: PathLike) -> ContrastiveSet:
    """One pair per TruthfulQA question: (Question, Best Answer, first Incorrect Answer)."""
    p, records = truthfulqa_rows(path, ("Question", "Best Answer", "Incorrect Answers"))
    pairs: list[ContrastivePair] = []
    for where, row in records:
        question = required_field(p, where, row, "Question")
        best = required_field(p, where, row, "Best Answer")
        incorrect = split_answers(required_field(p, where, row, "Incorrect Answers"))
        if not incorrect:
            raise DataError(f"{p}: {where}: field 'Incorrect Answers' holds no answer")
        pairs.append(ContrastivePair(question, best.strip(), incorrect[0]))
    return ContrastiveSet(pairs, name="truthfulqa").validate()


def load_truthfulqa_labeled(path: PathLike) -> LabeledSet:
    """``"Q: {question} A: {answer}"`` for every correct (1) and incorrect (0) answer.

    Correct answers are the ``Correct Answers`` column, with ``Best Answer`` added first when it
    is not already there; duplicates within a question are dropped. Each item's ``group`` is
    its question, so a split by group (ITI's) keeps a question's answers on one side.
    """
    p, records = truthfulqa_rows(
        path, ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
    )
    items: list[LabeledText] = []
    for where, row in records:
        question = required_field(p, where, row, "Question").strip()
        best = required_field(p, where, row, "Best Answer").strip()
        correct = split_answers(required_field(p, where, row, "Correct Answers"))
        if best not in correct:
            correct.insert(0, best)
        incorrect = split_answers(required_field(p, where, row, "Incorrect Answers"))
        items.extend(LabeledText(f"Q: {question} A: {a}", 1, question) for a in correct)
        items.extend(LabeledText(f"Q: {question} A: {a}", 0, question) for a in incorrect)
    return LabeledSet(items, name="truthfulqa").validate()


def load_advbench(path: PathLike) -> list[str]:
    """The ``goal`` column of an AdvBench CSV (harmful requests, for refusal studies)."""
    p, header, records = _read_csv(path)
    if "goal" not in header:
        raise DataError(
            f"{p}: line 1: missing column 'goal' (found: {', '.join(map(repr, header))})"
        )
    if not records:
        raise _no_rows(p)
    return [required_field(p, where, row, "goal") for where, row in records]


def _from_records(
    p: Path,
    records: list[Record],
    *,
    prompt: str,
    positive: str,
    negative: str,
    text: str,
    label: str,
) -> ContrastiveSet | LabeledSet:
    if not records:
        raise _no_rows(p)
    where, first = records[0]
    keys = set(first)
    if {prompt, positive, negative} <= keys:
        pairs = _pairs(p, records, prompt, positive, negative)
        return ContrastiveSet(pairs, name=_set_name(p)).validate()
    if {text, label} <= keys:
        items = [
            LabeledText(required_field(p, w, row, text), _label(p, w, row, label))
            for w, row in records
        ]
        return LabeledSet(items, name=_set_name(p)).validate()
    contrastive_missing = [f for f in (prompt, positive, negative) if f not in keys]
    labeled_missing = [f for f in (text, label) if f not in keys]
    found = ", ".join(repr(str(k)) for k in first if k is not None) or "none"
    raise DataError(
        f"{p}: {where}: rows need fields {prompt!r}/{positive!r}/{negative!r} (contrastive) or "
        f"{text!r}/{label!r} (labelled); missing field(s) "
        f"{', '.join(map(repr, contrastive_missing))} or "
        f"{', '.join(map(repr, labeled_missing))} (found: {found})"
    )


def load_jsonl(
    path: PathLike,
    *,
    prompt: str = "prompt",
    positive: str = "positive",
    negative: str = "negative",
    text: str = "text",
    label: str = "label",
) -> ContrastiveSet | LabeledSet:
    """Load JSONL (or a JSON list) of contrastive or labelled rows; see the module docstring.

    The first row decides: with ``prompt``/``positive``/``negative`` fields the result is a
    :class:`ContrastiveSet`, with ``text``/``label`` a :class:`LabeledSet`; every row must then
    have the same fields. The set is named after the file (or its folder, for generic names).
    """
    p, records = _read_json_or_jsonl(path)
    return _from_records(
        p, records, prompt=prompt, positive=positive, negative=negative, text=text, label=label
    )


def load_csv(
    path: PathLike,
    *,
    prompt: str = "prompt",
    positive: str = "positive",
    negative: str = "negative",
    text: str = "text",
    label: str = "label",
) -> ContrastiveSet | LabeledSet:
    """Load a CSV (``.tsv``: tab-separated) of contrastive or labelled rows, like
    :func:`load_jsonl`; the header row names the fields."""
    p, _header, records = _read_csv(path)
    return _from_records(
        p, records, prompt=prompt, positive=positive, negative=negative, text=text, label=label
    )


def load_dataset(path: PathLike, **kw: str) -> ContrastiveSet | LabeledSet:
    """Load a file, picking the format from its extension and content.

    * ``.json``/``.jsonl`` rows with ``answer_matching_behavior`` -> :func:`load_caa_ab`;
      with ``prompt``/``correct``/``incorrect`` -> :func:`load_mmlu_ab`; else :func:`load_jsonl`.
    * ``.csv``/``.tsv`` with a ``Best Answer`` column -> :func:`load_truthfulqa`; with
      ``goal``/``target`` columns (AdvBench) -> :class:`DataError`, since AdvBench is not
      contrastive (use :func:`load_advbench`); else :func:`load_csv`.
    * A folder holding ``generate_dataset.json`` (a CAA behaviour folder) -> that file.

    ``kw`` are the field names passed on to :func:`load_jsonl` / :func:`load_csv`.
    """
    p = Path(path)
    if p.is_dir():
        inner = p / "generate_dataset.json"
        if not inner.is_file():
            raise DataError(f"{p}: is a directory without a generate_dataset.json in it")
        p = inner
    p = _existing_file(p)
    if p.suffix.lower() in (".csv", ".tsv"):
        _p, header, _records = _read_csv(p)
        if "Best Answer" in header:
            return load_truthfulqa(p)
        if {"goal", "target"} <= set(header) and not {
            kw.get("prompt", "prompt"),
            kw.get("text", "text"),
        } & set(header):
            raise DataError(
                f"{p}: looks like AdvBench (goal,target columns), which holds prompts only and "
                "is not a contrastive or labelled set; read it with steerlab.data.load_advbench"
            )
        return load_csv(p, **kw)
    _p, records = _read_json_or_jsonl(p)
    if records:
        keys = set(records[0][1])
        if "answer_matching_behavior" in keys:
            return load_caa_ab(p)
        if {"prompt", "correct", "incorrect"} <= keys:
            return load_mmlu_ab(p)
    return load_jsonl(p, **kw)

