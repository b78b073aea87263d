"""ITI's head selection and tuning data: the reference's head ranking (numpy's argsort order,
reproduced), its question split of the probe rows, the per-class row split, and the fit
helper's default tuning set (a held-out slice of the data's questions) with the question ids
of each class's rows. See :mod:`steerlab.methods.iti`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from steerlab.errors import DataError

DEFAULT_ITI_TUNING_FRACTION = 0.2


# numpy's introsort (numpy/_core/src/npysort/quicksort.cpp, aquicksort_; the same in 1.23.4):
# partitions longer than this many + 1 elements are split around a median of three.
_SMALL_QUICKSORT = 15


def _less(a: float, b: float) -> bool:
    """numpy's float order: NaN after everything."""
    return a < b or (b != b and a == a)


def _aheapsort(v: list[float], idx: list[int], start: int, n: int) -> None:
    """numpy's indirect heapsort (npysort_heapsort.h, aheapsort_) of idx[start:start + n]."""
    def get(i: int) -> int:  # 1-based, as numpy's
        return idx[start + i - 1]

    def put(i: int, x: int) -> None:
        idx[start + i - 1] = x

    def sift(tmp: int, i: int, j: int, size: int) -> None:
        while j <= size:
            if j < size and _less(v[get(j)], v[get(j + 1)]):
                j += 1
            if _less(v[tmp], v[get(j)]):
                put(i, get(j))
                i, j = j, j + j
            else:
                break
        put(i, tmp)

    for top in range(n >> 1, 0, -1):
        sift(get(top), top, top << 1, n)
    while n > 1:
        tmp = get(n)
        put(n, get(1))
        n -= 1
        sift(tmp, 1, 2, n)


def reference_argsort(values: Sequence[float] | np.ndarray) -> np.ndarray:  # noqa: C901
    """``np.argsort(values)`` exactly as numpy 1.23.4, the reference's numpy
    (``environment.yaml`` L142), computes it, ties included.

    That is numpy's introsort, written here in Python: median-of-three quicksort on runs of
    more than 16 elements, insertion sort below, heapsort once 2·⌊log₂ n⌋ partitions deep
    (``quicksort.cpp`` ``aquicksort_``, unchanged since). Newer numpy sends ``np.argsort`` to a
    SIMD sort on AVX-512 / AVX2 CPUs, which leaves equal values in another order; this gives
    the same order on every machine. For n ≤ 16 it is a stable sort.
    """
    v = [float(x) for x in np.asarray(values, dtype=np.float64).reshape(-1)]
    n = len(v)
    idx = list(range(n))
    if n < 2:
        return np.array(idx, dtype=np.int64)

    def swap(a: int, b: int) -> None:
        idx[a], idx[b] = idx[b], idx[a]

    stack: list[tuple[int, int, int]] = []
    pl, pr = 0, n - 1
    cdepth = 2 * (n.bit_length() - 1)
    while True:
        if cdepth < 0:
            _aheapsort(v, idx, pl, pr - pl + 1)
        else:
            while pr - pl > _SMALL_QUICKSORT:
                pm = pl + ((pr - pl) >> 1)
                if _less(v[idx[pm]], v[idx[pl]]):
                    swap(pm, pl)
                if _less(v[idx[pr]], v[idx[pm]]):
                    swap(pr, pm)
                if _less(v[idx[pm]], v[idx[pl]]):
                    swap(pm, pl)
                vp = v[idx[pm]]
                pi, pj = pl, pr - 1
                swap(pm, pj)
                while True:
                    pi += 1
                    while _less(v[idx[pi]], vp):
                        pi += 1
                    pj -= 1
                    while _less(vp, v[idx[pj]]):
                        pj -= 1
                    if pi >= pj:
                        break
                    swap(pi, pj)
                swap(pi, pr - 1)
                cdepth -= 1
                if pi - pl < pr - pi:  # the larger part waits on the stack
                    stack.append((pi + 1, pr, cdepth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, cdepth))
                    pl = pi + 1
            for pi in range(pl + 1, pr + 1):  # insertion sort
                vi = idx[pi]
                vp = v[vi]
                pj = pi
                while pj > pl and _less(vp, v[idx[pj - 1]]):
                    idx[pj] = idx[pj - 1]
                    pj -= 1
                idx[pj] = vi
        if not stack:
            break
        pl, pr, cdepth = stack.pop()
    return np.array(idx, dtype=np.int64)


def rank_heads(accuracy: Sequence[float] | np.ndarray) -> np.ndarray:
    """Flat head indices, best first, as honest_llama ranks them (``utils.py`` L714,
    ``np.argsort(acc)[::-1]``): by accuracy, highest first; equal accuracies in the reverse of
    :func:`reference_argsort`'s order (for up to 16 heads: the later flat index first)."""
    return reference_argsort(accuracy)[::-1].copy()


def split_questions(
    positive_groups: Sequence[Hashable], negative_groups: Sequence[Hashable],
    val_fraction: float, seed: int,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Split rows by question, as honest_llama does (``validation/validate_2fold.py``
    L143-144, ``utils.py`` L687-690).

    The rows are the positive rows then the negative rows (indices 0 … N₊ − 1, then
    N₊ … N₊ + N₋ − 1); ``*_groups`` give each row's question. The G questions are numbered in
    order of first appearance (positives, then negatives);
    ``RandomState(seed).choice(G, int(G·(1 − val_fraction)), replace=False)`` are the training
    questions, in that order, the rest the validation questions, in ascending order. Each
    question contributes its positive rows, then its negative rows, in their order.

    Returns (train rows, validation rows, training questions, validation questions).
    """
    number: dict[Hashable, int] = {}
    for g in (*positive_groups, *negative_groups):
        number.setdefault(g, len(number))
    n_q = len(number)
    n_train = int(n_q * (1 - val_fraction))
    if n_train < 1 or n_train >= n_q:
        raise DataError(
            f"{n_q} question(s) cannot be split into training and validation questions with "
            f"val_fraction={val_fraction} (int({n_q}·(1 − {val_fraction})) = {n_train} "
            f"training questions); ITI needs at least one of each"
        )
    train_q = np.random.RandomState(seed).choice(n_q, size=n_train, replace=False)
    in_train = {int(q) for q in train_q}
    val_q = [q for q in range(n_q) if q not in in_train]
    rows: list[list[int]] = [[] for _ in range(n_q)]
    for i, g in enumerate(positive_groups):
        rows[number[g]].append(i)
    offset = len(positive_groups)
    for i, g in enumerate(negative_groups):
        rows[number[g]].append(offset + i)
    train = np.array([r for q in train_q for r in rows[int(q)]], dtype=np.int64)
    val = np.array([r for q in val_q for r in rows[q]], dtype=np.int64)
    return train, val, n_train, len(val_q)


def split_rows(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """(train, validation) row indices of one class: a permutation from ``rng``, its last
    round(val_fraction·n) entries (clamped to 1 … n−1) for validation."""
    perm = rng.permutation(n)
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    return perm[: n - n_val], perm[n - n_val:]


def hold_out_questions(data: Any, fraction: float, seed: int) -> tuple[Any, Any | None, int]:
    """ITI's default tuning set: (probe part, held-out part or None, questions held out) of
    a contrastive or labelled set. The units are questions (a pair's prompt, a labelled
    item's ``group``; an item without one is its own unit); round(fraction·U) of the U units
    (at least 1, leaving at least 2), drawn by ``numpy.random.default_rng(seed).permutation(U)``,
    are held out, each part keeping the data's order. With fewer than 3 units nothing is held
    out."""
    from steerlab.data import ContrastiveSet, LabeledSet

    if isinstance(data, ContrastiveSet):
        keys: list[Any] = [("q", p.prompt) for p in data]
    else:
        keys = [("q", t.group) if t.group is not None else ("row", i)
                for i, t in enumerate(data)]
    number: dict[Any, int] = {}
    for key in keys:
        number.setdefault(key, len(number))
    n_units = len(number)
    if n_units < 3:
        return data, None, 0
    n_held = min(max(round(n_units * fraction), 1), n_units - 2)
    held = {int(u) for u in np.random.default_rng(seed).permutation(n_units)[:n_held]}
    out = [number[key] in held for key in keys]
    if isinstance(data, ContrastiveSet):
        pairs = list(data)
        return (ContrastiveSet([p for p, o in zip(pairs, out, strict=True) if not o], data.name),
                ContrastiveSet([p for p, o in zip(pairs, out, strict=True) if o], data.name),
                n_held)
    items = list(data)
    return (LabeledSet([t for t, o in zip(items, out, strict=True) if not o], data.name),
            LabeledSet([t for t, o in zip(items, out, strict=True) if o], data.name), n_held)


def question_ids(data: Any) -> tuple[list[Any], list[Any]] | None:
    """Question ids of the positive and the negative rows the fit driver collects from a
    contrastive or labelled set: a pair's prompt (both completions answer it), a labelled
    item's ``group``; ``None`` for a labelled set without groups (ITI then splits by row)."""
    from steerlab.data import ContrastiveSet

    if isinstance(data, ContrastiveSet):
        prompts = [p.prompt for p in data]
        return prompts, list(prompts)
    have = [t.group is not None for t in data]
    if not any(have):
        return None
    if not all(have):
        raise DataError(f"labelled set {data.name!r}: {have.count(False)} of {len(have)} items "
                        f"have no group; give every item a group (question id) or none")
    return ([t.group for t in data if t.label == 1], [t.group for t in data if t.label == 0])


def tuning_texts(held: Any, recipe: str) -> list[str]:
    """The texts of a labelled tuning set or a list of strings, which ITI reads as they are
    at the last token (so only with recipe ``last``)."""
    from steerlab.data import LabeledSet

    texts = [t.text for t in held] if isinstance(held, LabeledSet) else [str(t) for t in held]
    if recipe != "last":
        raise DataError(f"tuning texts have no prompt/completion split, so recipe {recipe!r} "
                        f"cannot be read on them; use recipe 'last' or a contrastive tuning "
                        f"set")
    if not texts:
        raise DataError("the tuning set is empty")
    return texts
