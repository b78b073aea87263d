"""Datasets for building and checking steering directions.

Two shapes of data are used throughout steerlab (:mod:`steerlab.data.sets`):

* **Contrastive pairs** (:class:`ContrastivePair`, :class:`ContrastiveSet`): a prompt with one
  completion that shows a behaviour (``positive``) and one that shows its opposite
  (``negative``). Mean-difference (CAA-style) and similar methods read these.
* **Labelled texts** (:class:`LabeledText`, :class:`LabeledSet`): whole texts with a binary label,
  ``1`` for the positive class and ``0`` for the negative one. Probe-based methods read these; a
  contrastive set turns into one with :meth:`ContrastiveSet.to_labeled`.

Formats read from disk (:mod:`steerlab.data.public`; every loader takes a ``str`` or
``os.PathLike`` and raises :class:`~steerlab.errors.DataError` naming the file, the line or
item, and the missing field):

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
"negative"}`` object per line), which :func:`load_jsonl` reads back. The row-level readers and
the atomic writer are in :mod:`steerlab.data.files`.

:class:`Renderer` (:mod:`steerlab.data.render`) turns a (prompt, completion) into model text,
with the tokenizer's chat template or CAA's base-model format ``"Input: {prompt}\\nResponse:"``.

The built-in sets (:mod:`steerlab.data.builtin`, files in ``steerlab/builtin/``), written for
steerlab: sentiment pairs (:func:`sentiment_pairs`) and neutral prompts
(:func:`neutral_prompts`), rude/polite pairs (:func:`offensive_pairs`), harmless instructions
(:func:`load_harmless_instructions`) and concepts (:func:`load_concepts`).

The public data sets themselves live in the shared data folder, :func:`shared_data_dir`
(:mod:`steerlab.data.locate`): ``$STEERLAB_DATA``, else ``../shared/data`` from the current
directory, else from the checkout.

Layering: nothing in this package imports from steerlab's higher layers (fitting, methods,
evals, cli, serve).
"""

from __future__ import annotations

# The private names are those the single-module steerlab.data had; code importing them from
# steerlab.data keeps working.
from steerlab.data.builtin import (  # noqa: F401
    _builtin_json,
    available_concepts,
    builtin_file,
    load_concepts,
    load_harmless_instructions,
    neutral_prompts,
    offensive_pairs,
    sentiment_pairs,
)
from steerlab.data.files import (  # noqa: F401
    _FALSE_LABELS,
    _GENERIC_STEMS,
    _JSON_LIST_KEYS,
    _TRUE_LABELS,
    PathLike,
    Record,
    _atomic_write_lines,
    _existing_file,
    _json_records,
    _jsonl_records,
    _label,
    _no_rows,
    _read_csv,
    _read_json_or_jsonl,
    _read_text,
    _set_name,
    required_field,
)
from steerlab.data.locate import (
    DATA_ENV,
    find_shared_data_dir,
    shared_data_candidates,
    shared_data_dir,
)
from steerlab.data.public import (  # noqa: F401
    _from_records,
    _pairs,
    load_advbench,
    load_caa_ab,
    load_csv,
    load_dataset,
    load_jsonl,
    load_mmlu_ab,
    load_truthfulqa,
    load_truthfulqa_labeled,
    split_answers,
    truthfulqa_rows,
)
from steerlab.data.render import PLAIN_TEMPLATE, Renderer, RenderMode  # noqa: F401
from steerlab.data.sets import (  # noqa: F401
    ContrastivePair,
    ContrastiveSet,
    LabeledSet,
    LabeledText,
    _check_fraction,
    _n_test,
    _sha256_json,
)

# the names these helpers had before they became public (kept for code importing them)
_field = required_field
_split_answers = split_answers
_truthfulqa_rows = truthfulqa_rows

__all__ = [
    "DATA_ENV",
    "ContrastivePair",
    "ContrastiveSet",
    "LabeledSet",
    "LabeledText",
    "Renderer",
    "available_concepts",
    "builtin_file",
    "find_shared_data_dir",
    "load_advbench",
    "load_caa_ab",
    "load_concepts",
    "load_csv",
    "load_dataset",
    "load_harmless_instructions",
    "load_jsonl",
    "load_mmlu_ab",
    "load_truthfulqa",
    "load_truthfulqa_labeled",
    "neutral_prompts",
    "offensive_pairs",
    "sentiment_pairs",
    "shared_data_candidates",
    "shared_data_dir",
]
