"""Fit controllers on a model from data: render, collect activations, call ``fit``.

The controllers' ``fit`` methods are pure estimators on activation tensors; the fit driver
(:func:`fit`, ``driver.py``) does the model-side work around them: it asks the controller what
to read (``Controller.reading``), collects it along the one collection path
(``collect.py``), lets the controller learn from it (``Controller.fit_collected``) and
records what an artifact needs (the model, the data fingerprint, fit time and figures).
:func:`fit_method` (``by_name.py``) fits any registered method by name; ``fit_caa``,
``fit_iti``, ... (``helpers.py``) are one-line calls of the driver.
"""

from __future__ import annotations

from steerlab.fitting.by_name import build_controller, fit_method
from steerlab.fitting.collect import (
    _RECIPE_POSITION,
    _concept_sets,
    check_answer_letters,
    class_activations,
    collect_reading,
    contrastive_samples,
    describe_data,
    jacobian_texts,
    lfs_activations,
    ode_activations,
)
from steerlab.fitting.driver import fit, fit_with
from steerlab.fitting.helpers import (
    fit_actadd,
    fit_alqr,
    fit_angular,
    fit_caa,
    fit_contrastive,
    fit_innsteer,
    fit_iti,
    fit_lfs_baseline,
    fit_odesteer,
    fit_sas,
)
from steerlab.methods.actadd import ActAdd
from steerlab.methods.alqr import ALQR, SPID, ActAddLFS
from steerlab.methods.caa import CAA
from steerlab.methods.iti_tuning import DEFAULT_ITI_TUNING_FRACTION
from steerlab.methods.iti_tuning import hold_out_questions as _iti_hold_out
from steerlab.methods.iti_tuning import question_ids as _iti_groups

__all__ = [
    "ALQR",
    "CAA",
    "DEFAULT_ITI_TUNING_FRACTION",
    "SPID",
    "_RECIPE_POSITION",
    "ActAdd",
    "ActAddLFS",
    "_concept_sets",
    "_iti_groups",
    "_iti_hold_out",
    "build_controller",
    "check_answer_letters",
    "class_activations",
    "collect_reading",
    "contrastive_samples",
    "describe_data",
    "fit",
    "fit_actadd",
    "fit_alqr",
    "fit_angular",
    "fit_caa",
    "fit_contrastive",
    "fit_innsteer",
    "fit_iti",
    "fit_lfs_baseline",
    "fit_method",
    "fit_odesteer",
    "fit_sas",
    "fit_with",
    "jacobian_texts",
    "lfs_activations",
    "ode_activations",
]
