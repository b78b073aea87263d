"""The one fit driver (issue 18, step 2) fits exactly what the per-method fitting functions
fitted before it: every case of ``tests/fit_cases.py`` (every registered method, several
recipes, scopes, blocks, presets and data kinds, through ``fit_method`` and through the
per-method helpers, and the refusals) gives bit-identical state tensors and the same
hyper-parameters, fit_info (without timings), data fingerprint and model as the reference
``tests/fit_reference/`` written by the code before the refactor
(``scripts/make_fit_reference.py``; ``$STEERLAB_FIT_REFERENCE`` points elsewhere).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fit_cases import CASES, snapshot
from steerlab.methods import METHODS

pytestmark = pytest.mark.usefixtures("torch_single_thread")

REFERENCE = Path(os.environ.get("STEERLAB_FIT_REFERENCE",
                                Path(__file__).parent / "fit_reference"))


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    index = json.loads((REFERENCE / "cases.json").read_text())
    assert isinstance(index, dict)
    return index


def test_the_cases_cover_every_registered_method(reference: dict[str, Any]) -> None:
    assert set(reference) == set(CASES), "run scripts/make_fit_reference.py"
    fitted = {doc["class"] for doc in reference.values() if "class" in doc}
    assert fitted == {cls.__name__ for cls in METHODS.values()}


@pytest.mark.parametrize("name", list(CASES))
def test_fit_is_bit_identical_to_the_reference(name: str, reference: dict[str, Any]) -> None:
    tensors, meta = snapshot(CASES[name]())
    assert json.loads(meta) == reference[name]
    path = REFERENCE / f"{name}.safetensors"
    expected = load_file(str(path)) if path.exists() else {}
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
