"""File format readers and writers shared by the loaders of :mod:`steerlab.data`.

Everything here works on rows, not on sets: a file is read into :data:`Record` s (a row with
where it was, ``"line 3"`` or ``"item 0"``), and the helpers pull required fields and labels
out of a row, raising :class:`~steerlab.errors.DataError` naming the file, the line or item,
and the field. Set-building loaders live in :mod:`steerlab.data.public`.

* JSON: a list of row objects, or an object whose ``"pairs"``, ``"items"`` or ``"data"`` key
  holds one (any other object is one row). JSONL: one object per line, blank lines skipped; a
  file of another extension whose content is JSONL is read as JSONL.
* CSV (``.tsv``: tab-separated): a header row naming the fields; blank lines skipped.
* Writing: :func:`_atomic_write_lines` writes text lines through a temporary file renamed into
  place, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steerlab.errors import DataError

__all__ = ["PathLike", "Record"]

PathLike = str | os.PathLike[str]

Record = tuple[str, Mapping[str, Any]]
"""A row read from a file, with where it was (e.g. ``"line 3"``, ``"item 0"``)."""

_TRUE_LABELS = frozenset({"1", "true", "positive"})
_FALSE_LABELS = frozenset({"0", "false", "negative"})

_JSON_LIST_KEYS = ("pairs", "items", "data")
"""Keys of a JSON object under which a list of rows is looked for."""

# File names CAA and similar repositories give to a behaviour's data; for these the set is
# named after the folder instead of the file.
_GENERIC_STEMS = frozenset({"generate_dataset", "dataset", "data", "train", "test", "all"})


# --------------------------------------------------------------------------- writing


def _atomic_write_lines(path: PathLike, lines: Sequence[str]) -> None:
    """Write ``lines`` (each followed by ``\\n``) to ``path`` through a renamed temporary file."""
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


# --------------------------------------------------------------------------- reading


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
    """(path, header, rows) of a CSV file (tab-separated for ``.tsv``)."""
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


# --------------------------------------------------------------------------- fields of a row


def required_field(p: Path, where: str, row: Mapping[str, Any], name: str) -> str:
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
    """A required binary label: 0/1, a boolean, or 0/1/true/false/positive/negative text."""
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
    """The file's stem, or its folder's name for generic file names (CAA's behaviours)."""
    stem = p.stem
    if stem.lower() in _GENERIC_STEMS or stem.lower().startswith(("generate_", "test_dataset")):
        return p.resolve().parent.name or stem
    return stem
