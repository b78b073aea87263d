"""The two shapes of data steerlab reads, and their seeded splits.

* **Contrastive pairs** (:class:`ContrastivePair`, :class:`ContrastiveSet`): a prompt with one
  completion that shows a behaviour (``positive``) and one that shows its opposite
  (``negative``). Mean-difference (CAA-style) and similar methods read these.
* **Labelled texts** (:class:`LabeledText`, :class:`LabeledSet`): whole texts with a binary label,
  ``1`` for the positive class and ``0`` for the negative one. Probe-based methods read these; a
  contrastive set turns into one with :meth:`ContrastiveSet.to_labeled`.

Each set validates itself (:meth:`ContrastiveSet.validate`, :meth:`LabeledSet.validate`), has a
content fingerprint independent of its name, splits with a seed, and writes itself as JSONL
(:meth:`ContrastiveSet.to_jsonl`, read back by :func:`steerlab.data.load_jsonl`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from steerlab.data.files import PathLike, _atomic_write_lines
from steerlab.errors import DataError

if TYPE_CHECKING:
    from steerlab.data.render import Renderer

__all__ = ["ContrastivePair", "ContrastiveSet", "LabeledSet", "LabeledText"]


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


# --------------------------------------------------------------------------- sets


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
