"""Datasets for building and checking steering directions.

Two shapes of data are used throughout steerlab:

* **Contrastive pairs** (:class:`ContrastivePair`, :class:`ContrastiveSet`): a prompt with one
  completion that shows a behaviour (``positive``) and one that shows its opposite
  (``negative``). Mean-difference (CAA-style) and similar methods read these.
* **Labelled texts** (:class:`LabeledText`, :class:`LabeledSet`): whole texts with a binary label,
  ``1`` for the positive class and ``0`` for the negative one. Probe-based methods read these; a
  contrastive set turns into one with :meth:`ContrastiveSet.to_labeled`.

Formats read from disk (every loader takes a ``str`` or ``os.PathLike`` and raises
:class:`~steerlab.errors.DataError` naming the file, the line or item, and the missing field):

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

Written with each set is :meth:`ContrastiveSet.to_jsonl` (one ``{"prompt", "positive",
"negative"}`` object per line), which :func:`load_jsonl` reads back.

:class:`Renderer` turns a (prompt, completion) into model text, with the tokenizer's chat template
or CAA's base-model format ``"Input: {prompt}\\nResponse:"``.

A small built-in sentiment set, written for steerlab, is available through
:func:`sentiment_pairs` and :func:`neutral_prompts`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, overload

from steerlab.errors import DataError

__all__ = [
    "ContrastivePair",
    "ContrastiveSet",
    "LabeledSet",
    "LabeledText",
    "Renderer",
    "load_advbench",
    "load_caa_ab",
    "load_csv",
    "load_dataset",
    "load_jsonl",
    "load_mmlu_ab",
    "load_truthfulqa",
    "load_truthfulqa_labeled",
    "neutral_prompts",
    "sentiment_pairs",
]

PathLike = str | os.PathLike[str]
RenderMode = Literal["auto", "chat", "plain"]

PLAIN_TEMPLATE = "Input: {prompt}\nResponse:"
"""CAA's prompt format for base (non-chat) models."""

_TRUE_LABELS = frozenset({"1", "true", "positive"})
_FALSE_LABELS = frozenset({"0", "false", "negative"})

_JSON_LIST_KEYS = ("pairs", "items", "data")
"""Keys of a JSON object under which a list of rows is looked for."""

# File names CAA and similar repositories give to a behaviour's data; for these the set is
# named after the folder instead of the file.
_GENERIC_STEMS = frozenset({"generate_dataset", "dataset", "data", "train", "test", "all"})


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ContrastivePair:
    """A prompt with a completion showing a behaviour and one showing its opposite."""

    prompt: str
    """The user instruction or question, not rendered with any template."""
    positive: str
    """A completion showing the behaviour."""
    negative: str
    """A completion showing the opposite behaviour."""


@dataclass(frozen=True)
class LabeledText:
    """A text with a binary label: ``1`` positive class, ``0`` negative class."""

    text: str
    label: int
    group: str | None = None
    """Optional id of the question (or other unit) the text belongs to, e.g. the TruthfulQA
    question of an answer: methods that split data (ITI) keep a group on one side."""


def _sha256_json(obj: Any) -> str:
    blob = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _check_fraction(test_fraction: float) -> None:
    if not isinstance(test_fraction, int | float) or not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")


def _n_test(n: int, test_fraction: float) -> int:
    """Items going to the test part of ``n``: rounded, and at least one left on each side."""
    return min(max(round(n * test_fraction), 1), n - 1)


def _atomic_write_lines(path: PathLike, lines: Sequence[str]) -> None:
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for line in lines:
                fh.write(line)
                fh.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class ContrastiveSet:
    """An ordered list of :class:`ContrastivePair` with a name (e.g. the behaviour)."""

    pairs: list[ContrastivePair]
    name: str = "contrastive"

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[ContrastivePair]:
        return iter(self.pairs)

    @overload
    def __getitem__(self, index: int) -> ContrastivePair: ...

    @overload
    def __getitem__(self, index: slice) -> ContrastiveSet: ...

    def __getitem__(self, index: int | slice) -> ContrastivePair | ContrastiveSet:
        if isinstance(index, slice):
            return ContrastiveSet(self.pairs[index], name=self.name)
        return self.pairs[index]

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the pairs (in order); independent of :attr:`name`."""
        return _sha256_json(
            {"kind": "contrastive", "pairs": [[p.prompt, p.positive, p.negative] for p in self]}
        )

    def validate(self, min_size: int = 1) -> ContrastiveSet:
        """Check the set is usable and return it.

        Raises :class:`DataError` when the set is empty or smaller than ``min_size``, when a
        pair has an empty (or whitespace-only) field, or when every pair's positive and negative
        completions are the same (nothing to contrast).
        """
        if not self.pairs:
            raise DataError(f"contrastive set {self.name!r} is empty: it needs at least one pair")
        if len(self.pairs) < min_size:
            raise DataError(
                f"contrastive set {self.name!r} has {len(self.pairs)} pair(s), "
                f"fewer than the {min_size} needed"
            )
        for i, pair in enumerate(self.pairs):
            if not isinstance(pair, ContrastivePair):
                raise DataError(
                    f"contrastive set {self.name!r}: item {i} is a {type(pair).__name__}, "
                    "not a ContrastivePair"
                )
            for field_name in ("prompt", "positive", "negative"):
                value = getattr(pair, field_name)
                if not isinstance(value, str) or not value.strip():
                    raise DataError(
                        f"contrastive set {self.name!r}: pair {i} has an empty {field_name!r}"
                    )
        if all(p.positive == p.negative for p in self.pairs):
            raise DataError(
                f"contrastive set {self.name!r} is degenerate: every pair has the same positive "
                "and negative completion, so there is nothing to contrast"
            )
        return self

    def split(
        self, test_fraction: float = 0.2, seed: int = 0
    ) -> tuple[ContrastiveSet, ContrastiveSet]:
        """Seeded random split into (train, test); each part keeps the original order.

        ``round(len * test_fraction)`` pairs go to test, but never all nor none of them.
        Raises :class:`DataError` if ``test_fraction`` is not in (0, 1) or the set has fewer
        than two pairs.
        """
        _check_fraction(test_fraction)
        n = len(self.pairs)
        if n < 2:
            raise DataError(
                f"cannot split contrastive set {self.name!r} of {n} pair(s): "
                "both parts need at least one"
            )
        order = list(range(n))
        random.Random(seed).shuffle(order)
        test_idx = set(order[: _n_test(n, test_fraction)])
        train = [p for i, p in enumerate(self.pairs) if i not in test_idx]
        test = [p for i, p in enumerate(self.pairs) if i in test_idx]
        return ContrastiveSet(train, name=self.name), ContrastiveSet(test, name=self.name)

    def to_labeled(self, renderer: Renderer | None = None) -> LabeledSet:
        """Two texts per pair: prompt + positive labelled 1, prompt + negative labelled 0.

        With a ``renderer`` the texts are ``renderer.full(prompt, completion)``; without one
        they are ``prompt + " " + completion``.
        """
        items: list[LabeledText] = []
        for p in self.pairs:
            if renderer is not None:
                pos, neg = renderer.full(p.prompt, p.positive), renderer.full(p.prompt, p.negative)
            else:
                pos, neg = f"{p.prompt} {p.positive}", f"{p.prompt} {p.negative}"
            items.append(LabeledText(pos, 1))
            items.append(LabeledText(neg, 0))
        return LabeledSet(items, name=self.name)

    def to_jsonl(self, path: PathLike) -> None:
        """Write one ``{"prompt", "positive", "negative"}`` object per line, atomically."""
        _atomic_write_lines(
            path,
            [
                json.dumps(
                    {"prompt": p.prompt, "positive": p.positive, "negative": p.negative},
                    ensure_ascii=False,
                )
                for p in self.pairs
            ],
        )


@dataclass
class LabeledSet:
    """An ordered list of :class:`LabeledText` with a name."""

    items: list[LabeledText] = field(default_factory=list)
    name: str = "labeled"

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[LabeledText]:
        return iter(self.items)

    @overload
    def __getitem__(self, index: int) -> LabeledText: ...

    @overload
    def __getitem__(self, index: slice) -> LabeledSet: ...

    def __getitem__(self, index: int | slice) -> LabeledText | LabeledSet:
        if isinstance(index, slice):
            return LabeledSet(self.items[index], name=self.name)
        return self.items[index]

    def texts(self) -> list[str]:
        return [item.text for item in self.items]

    def labels(self) -> list[int]:
        return [item.label for item in self.items]

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the texts and labels (in order); independent of :attr:`name`."""
        return _sha256_json({"kind": "labeled", "items": [[t.text, t.label] for t in self]})

    def validate(self) -> LabeledSet:
        """Check the set is usable and return it.

        Raises :class:`DataError` when it is empty, a label is not 0 or 1, a text is empty, or
        only one class is present.
        """
        if not self.items:
            raise DataError(f"labelled set {self.name!r} is empty: it needs texts of both classes")
        for i, item in enumerate(self.items):
            if isinstance(item.label, bool) or item.label not in (0, 1):
                raise DataError(
                    f"labelled set {self.name!r}: item {i} has label {item.label!r}; "
                    "labels must be 0 or 1"
                )
            if not isinstance(item.text, str) or not item.text.strip():
                raise DataError(f"labelled set {self.name!r}: item {i} has an empty text")
        present = set(self.labels())
        if len(present) < 2:
            (only,) = present
            raise DataError(
                f"labelled set {self.name!r} needs both classes: found only label {only} "
                f"({len(self.items)} item(s)) and no label {1 - only}"
            )
        return self

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[LabeledSet, LabeledSet]:
        """Seeded split into (train, test), stratified by label; each part keeps the order.

        Each class with at least two items sends ``round(count * test_fraction)`` of them (at
        least one, never all) to test; a class with a single item stays in train. Raises
        :class:`DataError` if ``test_fraction`` is not in (0, 1) or no class has two items.
        """
        _check_fraction(test_fraction)
        by_label: dict[int, list[int]] = {}
        for i, item in enumerate(self.items):
            by_label.setdefault(item.label, []).append(i)
        rng = random.Random(seed)
        test_idx: set[int] = set()
        for label in sorted(by_label):
            indices = by_label[label]
            if len(indices) < 2:
                continue
            rng.shuffle(indices)
            test_idx.update(indices[: _n_test(len(indices), test_fraction)])
        if not test_idx:
            raise DataError(
                f"cannot split labelled set {self.name!r} of {len(self.items)} item(s): "
                "both parts need at least one item, and some class needs two"
            )
        train = [t for i, t in enumerate(self.items) if i not in test_idx]
        test = [t for i, t in enumerate(self.items) if i in test_idx]
        return LabeledSet(train, name=self.name), LabeledSet(test, name=self.name)

    def to_jsonl(self, path: PathLike) -> None:
        """Write one ``{"text", "label"}`` object per line, atomically."""
        _atomic_write_lines(
            path,
            [json.dumps({"text": t.text, "label": t.label}, ensure_ascii=False) for t in self],
        )


# --------------------------------------------------------------------------- rendering


class Renderer:
    """Turns (prompt, completion) into model text.

    ``mode="chat"`` uses the tokenizer's chat template (``apply_chat_template`` with
    ``add_generation_prompt=True, tokenize=False``; optional system message); ``mode="plain"``
    uses CAA's base-model format ``"Input: {prompt}\\nResponse:"`` and the completion is
    appended after one space; ``mode="auto"`` picks chat when ``tokenizer.chat_template`` is set.

    If a system message is given but the template rejects the system role (Gemma's raises), the
    system message is prepended to the user message instead. In plain mode it is put before the
    ``Input:`` line, followed by a blank line.

    Chat-rendered text already holds whatever special tokens the template writes (a BOS token,
    for many), so it should be tokenized with ``add_special_tokens=False``; see
    :attr:`add_special_tokens`.
    """

    def __init__(
        self, tokenizer: Any, mode: RenderMode = "auto", system: str | None = None
    ) -> None:
        if mode not in ("auto", "chat", "plain"):
            raise DataError(f"render mode must be 'auto', 'chat' or 'plain', got {mode!r}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if mode == "chat" and not has_template:
            raise DataError(
                "render mode 'chat' needs a tokenizer with a chat template, and this one has "
                "none; use mode='plain' (or 'auto') for base models"
            )
        self.tokenizer = tokenizer
        self.system = system
        self._mode: Literal["chat", "plain"] = (
            "chat" if mode == "chat" or (mode == "auto" and has_template) else "plain"
        )
        # None until a system message has been tried; then whether it must go in the user turn.
        self._system_in_user: bool | None = None

    @property
    def mode(self) -> Literal["chat", "plain"]:
        """The resolved mode: ``"chat"`` or ``"plain"``."""
        return self._mode

    @property
    def add_special_tokens(self) -> bool:
        """Whether to let the tokenizer add its special tokens when encoding rendered text.

        ``False`` in chat mode (the template writes them), ``True`` in plain mode.
        """
        return self._mode == "plain"

    def __repr__(self) -> str:
        return f"Renderer(mode={self._mode!r}, system={self.system!r})"

    def _apply(self, messages: list[dict[str, str]]) -> str:
        out = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        if not isinstance(out, str):
            raise DataError(
                f"the tokenizer's apply_chat_template returned {type(out).__name__}, not text"
            )
        return out

    def prompt(self, prompt: str) -> str:
        """Rendered text that generation continues from."""
        if self._mode == "plain":
            text = PLAIN_TEMPLATE.format(prompt=prompt)
            return f"{self.system}\n\n{text}" if self.system else text
        if not self.system:
            return self._apply([{"role": "user", "content": prompt}])
        merged = [{"role": "user", "content": f"{self.system}\n\n{prompt}"}]
        if self._system_in_user:
            return self._apply(merged)
        try:
            text = self._apply(
                [{"role": "system", "content": self.system}, {"role": "user", "content": prompt}]
            )
        except Exception:
            # Templates without a system role raise (jinja2 TemplateError from
            # raise_exception, or similar); fall back to putting it in the user turn.
            text = self._apply(merged)
            self._system_in_user = True
        else:
            self._system_in_user = False
        return text

    def full(self, prompt: str, completion: str) -> str:
        """The prompt rendered with its completion appended (after one space in plain mode)."""
        if self._mode == "plain":
            return f"{self.prompt(prompt)} {completion}"
        return self.prompt(prompt) + completion


# --------------------------------------------------------------------------- reading files

Record = tuple[str, Mapping[str, Any]]
"""A row read from a file, with where it was (e.g. ``"line 3"``, ``"item 0"``)."""


def _existing_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if p.is_dir():
        raise DataError(f"{p}: is a directory, not a data file")
    return p


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{p}: cannot read ({exc})") from exc


def _jsonl_records(p: Path, text: str) -> list[Record]:
    records: list[Record] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: line {lineno}: malformed JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise DataError(
                f"{p}: line {lineno}: expected a JSON object, found {type(obj).__name__}"
            )
        records.append((f"line {lineno}", obj))
    return records


def _json_records(p: Path, obj: Any) -> list[Record]:
    rows = obj
    if isinstance(obj, dict):
        key = next((k for k in _JSON_LIST_KEYS if isinstance(obj.get(k), list)), None)
        if key is None:
            return [("line 1", obj)]  # a single object: a one-line JSONL file
        rows = obj[key]
    if not isinstance(rows, list):
        raise DataError(f"{p}: expected a JSON list of objects, found {type(rows).__name__}")
    records: list[Record] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{p}: item {i}: expected a JSON object, found {type(row).__name__}")
        records.append((f"item {i}", row))
    return records


def _read_json_or_jsonl(path: PathLike) -> tuple[Path, list[Record]]:
    """Rows of a JSON list/object or JSONL file; the format is taken from the content."""
    p = _existing_file(path)
    text = _read_text(p)
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return p, _jsonl_records(p, text)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        # Not one JSON document: JSONL if its first non-blank line is an object on its own.
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        try:
            is_jsonl = isinstance(json.loads(first), dict)
        except json.JSONDecodeError:
            is_jsonl = False
        if is_jsonl:
            return p, _jsonl_records(p, text)
        raise DataError(f"{p}: line {exc.lineno}: malformed JSON ({exc.msg})") from exc
    return p, _json_records(p, obj)


def _read_csv(path: PathLike) -> tuple[Path, list[str], list[Record]]:
    p = _existing_file(path)
    text = _read_text(p)
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        records: list[Record] = []
        for row in reader:
            if not any((v or "").strip() for k, v in row.items() if k is not None):
                continue  # blank line
            records.append((f"line {reader.line_num}", row))
    except csv.Error as exc:
        raise DataError(f"{p}: line {reader.line_num}: malformed CSV ({exc})") from exc
    if not header:
        raise DataError(f"{p}: empty CSV file, expected a header row")
    return p, header, records


def _field(p: Path, where: str, row: Mapping[str, Any], name: str) -> str:
    """A required, non-empty string field of a row (a one-item list gives its item)."""
    if name not in row or row[name] is None:
        found = ", ".join(repr(str(k)) for k in row if k is not None) or "none"
        raise DataError(f"{p}: {where}: missing field {name!r} (found: {found})")
    value = row[name]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]  # some model-written-eval rows list several matching answers
    if not isinstance(value, str):
        raise DataError(
            f"{p}: {where}: field {name!r} must be a string, found {type(value).__name__}"
        )
    if not value.strip():
        raise DataError(f"{p}: {where}: field {name!r} is empty")
    return value


def _label(p: Path, where: str, row: Mapping[str, Any], name: str) -> int:
    if name not in row or row[name] is None:
        found = ", ".join(repr(str(k)) for k in row if k is not None) or "none"
        raise DataError(f"{p}: {where}: missing field {name!r} (found: {found})")
    value = row[name]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _TRUE_LABELS:
            return 1
        if key in _FALSE_LABELS:
            return 0
    raise DataError(
        f"{p}: {where}: label {value!r} in field {name!r} is not one of 0, 1, true, false, "
        "positive, negative"
    )


def _no_rows(p: Path) -> DataError:
    return DataError(f"{p}: no rows found (the file is empty)")


def _set_name(p: Path) -> str:
    stem = p.stem
    if stem.lower() in _GENERIC_STEMS or stem.lower().startswith(("generate_", "test_dataset")):
        return p.resolve().parent.name or stem
    return stem


def _pairs(
    p: Path, records: list[Record], prompt: str, positive: str, negative: str
) -> list[ContrastivePair]:
    if not records:
        raise _no_rows(p)
    return [
        ContrastivePair(
            prompt=_field(p, where, row, prompt),
            positive=_field(p, where, row, positive),
            negative=_field(p, where, row, negative),
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


def _split_answers(text: str) -> list[str]:
    out: list[str] = []
    for part in text.split(";"):
        answer = part.strip()
        if answer and answer not in out:
            out.append(answer)
    return out


def _truthfulqa_rows(path: PathLike, need: Sequence[str]) -> tuple[Path, list[Record]]:
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
    p, records = _truthfulqa_rows(path, ("Question", "Best Answer", "Incorrect Answers"))
    pairs: list[ContrastivePair] = []
    for where, row in records:
        question = _field(p, where, row, "Question")
        best = _field(p, where, row, "Best Answer")
        incorrect = _split_answers(_field(p, where, row, "Incorrect Answers"))
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
    p, records = _truthfulqa_rows(
        path, ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
    )
    items: list[LabeledText] = []
    for where, row in records:
        question = _field(p, where, row, "Question").strip()
        best = _field(p, where, row, "Best Answer").strip()
        correct = _split_answers(_field(p, where, row, "Correct Answers"))
        if best not in correct:
            correct.insert(0, best)
        incorrect = _split_answers(_field(p, where, row, "Incorrect Answers"))
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
    return [_field(p, where, row, "goal") for where, row in records]


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
            LabeledText(_field(p, w, row, text), _label(p, w, row, label)) for w, row in records
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


# --------------------------------------------------------------------------- built-in data


def _builtin_json(name: str) -> dict[str, Any]:
    resource = resources.files("steerlab").joinpath("builtin").joinpath(name)
    try:
        data = json.loads(resource.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:  # a broken install
        raise DataError(f"built-in data file {name!r} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"built-in data file {name!r} is not a JSON object")
    return data


def sentiment_pairs() -> ContrastiveSet:
    """Built-in sentiment pairs (everyday prompts, positive vs negative first-person replies)."""
    data = _builtin_json("sentiment.json")
    pairs = [ContrastivePair(r["prompt"], r["positive"], r["negative"]) for r in data["pairs"]]
    return ContrastiveSet(pairs, name="sentiment").validate()


def neutral_prompts() -> list[str]:
    """Built-in held-out prompts on topics unlike the sentiment pairs', with no tone of their own.

    For checking that steering moves the tone of free generations.
    """
    return [str(s) for s in _builtin_json("sentiment.json")["neutral_prompts"]]
