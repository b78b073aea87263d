"""The built-in data sets shipped with steerlab (``src/steerlab/builtin/*.json``), all written
for steerlab:

* ``sentiment.json``: :func:`sentiment_pairs` (everyday prompts, positive vs negative
  first-person replies) and :func:`neutral_prompts` (held-out prompts with no tone);
* ``offensive_pairs.json``: :func:`offensive_pairs` (an everyday request, a rude reply, a
  polite reply);
* ``harmless_instructions.json``: :func:`load_harmless_instructions`;
* ``concepts.json``: :func:`load_concepts` / :func:`available_concepts` (description, keywords
  and sentences per concept).

The loaders that take a ``path`` read a user file of the same format instead. A built-in file
that cannot be read (a broken install) raises :class:`~steerlab.errors.DataError`.
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from steerlab.data.files import PathLike
from steerlab.data.public import load_dataset
from steerlab.data.sets import ContrastivePair, ContrastiveSet
from steerlab.errors import DataError

__all__ = [
    "available_concepts",
    "builtin_file",
    "load_concepts",
    "load_harmless_instructions",
    "neutral_prompts",
    "offensive_pairs",
    "sentiment_pairs",
]


def builtin_file(name: str) -> Traversable:
    """The built-in data file ``name`` (e.g. ``"sentiment.json"``), as package data."""
    return resources.files("steerlab").joinpath("builtin").joinpath(name)


# --------------------------------------------------------------------------- sentiment


def _builtin_json(name: str) -> dict[str, Any]:
    resource = builtin_file(name)
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


# ------------------------------------------------- evaluation tasks' data (and user files)


def _read_json(path: PathLike | None, builtin: str) -> tuple[str, Any]:
    """(where, parsed JSON) of a user file, or of the named built-in file when ``path`` is
    None."""
    if path is None:
        resource = builtin_file(builtin)
        where = f"built-in {builtin}"
        try:
            return where, json.loads(resource.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{where} cannot be read: {exc}") from exc
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        return str(p), json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: line {exc.lineno}: malformed JSON ({exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot be read ({exc})") from exc


def _strings(where: str, value: Any, field: str, *, min_size: int = 1) -> list[str]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field!r} must be a list of strings, "
                        f"found {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{where}: field {field!r}: item {i} is not a non-empty string")
    if len(value) < min_size:
        raise DataError(f"{where}: field {field!r} has {len(value)} item(s), fewer than the "
                        f"{min_size} needed")
    return [str(v) for v in value]


def _need(where: str, obj: Any, field: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if field not in obj:
        found = ", ".join(repr(k) for k in obj) or "none"
        raise DataError(f"{where}: missing field {field!r} (found: {found})")
    return obj[field]


def load_harmless_instructions(path: PathLike | None = None) -> list[str]:
    """Harmless instructions: a JSON list of strings, or an object with an ``instructions``
    list (the built-in ``harmless_instructions.json`` when ``path`` is None)."""
    where, obj = _read_json(path, "harmless_instructions.json")
    rows = obj if isinstance(obj, list) else _need(where, obj, "instructions")
    return _strings(where, rows, "instructions", min_size=2)


def load_concepts(path: PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Concepts by name, each ``{"description", "keywords", "sentences"}`` (the built-in
    ``concepts.json`` when ``path`` is None). The file is a JSON object with a ``concepts``
    object; a missing or malformed field is named in the :class:`DataError`."""
    where, obj = _read_json(path, "concepts.json")
    concepts = _need(where, obj, "concepts")
    if not isinstance(concepts, dict) or not concepts:
        raise DataError(f"{where}: field 'concepts' must be a non-empty object of concepts")
    out: dict[str, dict[str, Any]] = {}
    for name, c in concepts.items():
        w = f"{where}: concept {name!r}"
        description = _need(w, c, "description")
        if not isinstance(description, str) or not description.strip():
            raise DataError(f"{w}: field 'description' must be a non-empty string")
        out[name] = {
            "description": description,
            "keywords": _strings(w, _need(w, c, "keywords"), "keywords"),
            "sentences": _strings(w, _need(w, c, "sentences"), "sentences", min_size=2),
        }
    return out


def available_concepts(path: PathLike | None = None) -> list[str]:
    """Names of the concepts in ``path`` (the built-in file when None)."""
    return sorted(load_concepts(path))


def _load_pairs(path: PathLike | None, builtin: str) -> ContrastiveSet:
    """A contrastive set from a user file (any format :func:`load_dataset` reads) or from a
    built-in ``{"pairs": [{"prompt", "positive", "negative"}, ...]}`` file."""
    if path is None:
        resource = builtin_file(builtin)
        with resources.as_file(resource) as p:
            data = load_dataset(p)
    else:
        data = load_dataset(path)
    if not isinstance(data, ContrastiveSet):
        raise DataError(f"{path or builtin}: expected contrastive rows with fields 'prompt', "
                        "'positive' and 'negative', found labelled rows")
    return data


def offensive_pairs(path: PathLike | None = None) -> ContrastiveSet:
    """Rude vs polite replies to everyday requests: (prompt, offensive reply, polite reply).

    The built-in ``offensive_pairs.json`` when ``path`` is None, else a contrastive file in
    any format :func:`~steerlab.data.load_dataset` reads.
    """
    return _load_pairs(path, "offensive_pairs.json")
