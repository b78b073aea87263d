"""Self-describing artifacts: a fitted controller as one safetensors file.

The file holds the controller's learned tensors, and its safetensors header metadata holds one
JSON document under the key ``"steerlab"``::

    {"format": "steerlab-controller", "format_version": 1, "library_version": "0.1.0",
     "method": "caa", "hyperparameters": {...}, "sites": ["resid_post.15"],
     "model": {"model_id", "architecture", "hidden_size", "num_layers", "is_chat"},
     "data_fingerprint": "…", "fit": {...}, "created": "2026-11-24T12:00:00+00:00"}

Nothing is ever unpickled: tensors load with safetensors, metadata with ``json``. Files are
written to a temporary name and renamed, so a failed save leaves nothing behind. Loading into
a model of another shape or id fails with a message naming both (``strict=False`` relaxes the
id check to a shape check). Linear additive controllers (CAA, ActAdd) also export to
llama.cpp's GGUF control-vector layout (:func:`export_gguf`) and import from it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import steerlab
from steerlab.errors import ArtifactError
from steerlab.io import atomic_write
from steerlab.methods import METHODS, Controller
from steerlab.methods.caa import CAA
from steerlab.models import ModelInfo
from steerlab.sites import Site

FORMAT = "steerlab-controller"
FORMAT_VERSION = 1


def metadata(controller: Controller) -> dict[str, Any]:
    """The JSON document an artifact of ``controller`` carries."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": steerlab.__version__,
        "method": controller.method,
        "hyperparameters": controller.hyperparameters(),
        "sites": [str(s) for s in controller.sites],
        "model": controller.model_info.as_dict() if controller.model_info else None,
        "data_fingerprint": controller.data_fingerprint,
        "fit": controller.fit_info,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def save(controller: Controller, path: str | os.PathLike[str]) -> Path:
    """Save a fitted controller to ``path`` (``.safetensors`` is appended if missing)."""
    controller.check_fitted()
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in controller.state_dict().items()}
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"refusing to save: tensor {name!r} has NaN or inf values")
    meta = {"steerlab": json.dumps(metadata(controller), sort_keys=True)}
    return atomic_write(p, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an artifact's JSON metadata without loading its tensors."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"artifact not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("steerlab")
    except Exception as exc:
        raise ArtifactError(f"{p} is not a safetensors file ({exc})") from exc
    if raw is None:
        raise ArtifactError(f"{p} is a safetensors file but not a steerlab artifact (no metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{p}: its steerlab metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{p}: not a {FORMAT} artifact")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ArtifactError(
            f"{p} was written by a newer steerlab (format {meta['format_version']}); upgrade"
        )
    return meta


def check_model(meta: dict[str, Any], info: ModelInfo, *, strict: bool = True,
                source: str = "artifact") -> None:
    """Fail clearly when an artifact was fitted on another model."""
    m = meta.get("model")
    if not m:
        return
    want = f"{m.get('model_id')} ({m.get('architecture')}, {m.get('num_layers')} layers, " \
           f"hidden {m.get('hidden_size')})"
    have = f"{info.model_id} ({info.architecture}, {info.num_layers} layers, " \
           f"hidden {info.hidden_size})"
    if int(m.get("hidden_size", -1)) != info.hidden_size or \
            int(m.get("num_layers", -1)) != info.num_layers:
        raise ArtifactError(
            f"{source} was fitted on {want} and cannot steer {have}: hidden size or layer "
            f"count differ. Fit it again on this model."
        )
    if strict and (m.get("model_id") != info.model_id or
                   m.get("architecture") != info.architecture):
        raise ArtifactError(
            f"{source} was fitted on {want}, not on {have}. The shapes match, so you can "
            f"force it with strict=False (--no-strict), but the vector may mean nothing here."
        )


def load(path: str | os.PathLike[str], info: ModelInfo | None = None, *,
         strict: bool = True) -> Controller:
    """Load an artifact; with ``info``, check that it fits that model."""
    p = Path(path)
    meta = read_metadata(p)
    method = meta.get("method")
    if method not in METHODS:
        raise ArtifactError(f"{p}: unknown method {method!r}; known: {sorted(METHODS)}")
    if info is not None:
        check_model(meta, info, strict=strict, source=str(p))
    try:
        controller = METHODS[method](**meta.get("hyperparameters", {}))
    except TypeError as exc:
        raise ArtifactError(f"{p}: hyper-parameters do not match {method}: {exc}") from exc
    try:
        with safe_open(str(p), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        sites = [Site.parse(s) for s in meta["sites"]]
        controller.load_state(tensors, sites)
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{p}: tensors do not match its metadata ({exc})") from exc
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{p}: tensor {name!r} has NaN or inf values")
    if meta.get("model"):
        controller.model_info = ModelInfo(**meta["model"])
    controller.data_fingerprint = meta.get("data_fingerprint")
    controller.fit_info = dict(meta.get("fit") or {})
    return controller


def export_gguf(controller: Controller, path: str | os.PathLike[str], *,
                scale: float = 1.0) -> Path:
    """Write a linear controller as a llama.cpp GGUF control vector (``direction.{L}``)."""
    from steerlab.gguf_vectors import export_control_vector

    controller.check_fitted()
    vectors = controller.vectors_by_layer()
    if vectors is None:
        raise ArtifactError(
            f"{controller.method} is not a constant vector on block outputs, so it has no "
            f"GGUF control-vector form (only resid_post additive methods: CAA, ActAdd vector)"
        )
    hint = "llama"
    if controller.model_info is not None:
        arch = controller.model_info.architecture.lower()
        hint = arch.replace("forcausallm", "").replace("forconditionalgeneration", "") or hint
    return export_control_vector(path, vectors, hint, scale=scale)


def import_gguf(path: str | os.PathLike[str], info: ModelInfo | None = None) -> CAA:
    """Read a llama.cpp GGUF control vector as a CAA controller on the same blocks."""
    from steerlab.gguf_vectors import import_control_vector

    cv = import_control_vector(path)
    width = {int(v.shape[0]) for v in cv.directions.values()}.pop()
    if info is not None:
        if width != info.hidden_size:
            raise ArtifactError(
                f"{path}: control vector width {width} does not match the model's hidden size "
                f"{info.hidden_size} ({info.model_id})"
            )
        too_deep = [layer for layer in cv.directions if layer >= info.num_layers]
        if too_deep:
            raise ArtifactError(
                f"{path}: directions for blocks {too_deep} but {info.model_id} has "
                f"{info.num_layers} blocks"
            )
    controller = CAA(layers=sorted(cv.directions))
    controller.set_vectors({Site("resid_post", k): v for k, v in cv.directions.items()})
    controller.model_info = info
    controller.fit_info = {"imported_from": str(path), "model_hint": cv.model_hint}
    return controller
