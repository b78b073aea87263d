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
id check to a shape check). Everything else is checked when the file is loaded too, never
when the controller is first used: the header's schema, each field's type
(:func:`check_metadata`, a malformed field is named), and the controller itself
(:func:`check_controller`: sites within the model's blocks, finite tensors, vectors of the
model's width, and a dry ``steer`` on zero activations). Linear additive controllers (CAA,
ActAdd) also export to llama.cpp's GGUF control-vector layout (:func:`export_gguf`) and
import from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import steerlab
from steerlab.errors import ArtifactError, SteerlabError
from steerlab.io import atomic_write
from steerlab.methods import METHODS, Controller
from steerlab.methods.base import StepContext
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
    check_metadata(meta, source=str(p))
    return meta


_MODEL_FIELDS: dict[str, tuple[type, str]] = {
    "model_id": (str, "a string"),
    "architecture": (str, "a string"),
    "hidden_size": (int, "a positive integer"),
    "num_layers": (int, "a positive integer"),
    "is_chat": (bool, "true or false"),
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_metadata(meta: dict[str, Any], *, source: str = "artifact") -> None:  # noqa: C901
    """Check the types of an artifact's metadata fields (raises :class:`ArtifactError`
    naming the field), so that a malformed header fails here with a message, not later in
    whatever reads the field."""

    def bad(name: str, want: str, value: Any) -> ArtifactError:
        return ArtifactError(f"{source}: metadata field {name!r} must be {want}, got "
                             f"{_short(value)}")

    version = meta.get("format_version", FORMAT_VERSION)
    if not _is_int(version) or version < 1:
        raise bad("format_version", "a positive integer", version)
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{source} was written by a newer steerlab (format {version}); upgrade"
        )
    method = meta.get("method")
    if not isinstance(method, str) or not method:
        raise bad("method", "a method name (a string)", method)
    for name in ("library_version", "data_fingerprint", "created"):
        value = meta.get(name)
        if value is not None and not isinstance(value, str):
            raise bad(name, "a string or null", value)
    for name in ("hyperparameters", "fit"):
        value = meta.get(name)
        if value is not None and not isinstance(value, dict):
            raise bad(name, "an object (or null)", value)
    sites = meta.get("sites")
    if not isinstance(sites, list) or not sites or \
            not all(isinstance(x, str) for x in sites):
        raise bad("sites", "a non-empty list of site names such as 'resid_post.3'", sites)
    for text in sites:
        try:
            Site.parse(text)
        except SteerlabError as exc:
            raise ArtifactError(f"{source}: metadata field 'sites': {exc}") from None
    model = meta.get("model")
    if model is None:
        return
    if not isinstance(model, dict):
        raise bad("model", "an object (model_id, architecture, hidden_size, num_layers, "
                           "is_chat) or null", model)
    for name, (kind, want) in _MODEL_FIELDS.items():
        if name not in model:
            raise ArtifactError(f"{source}: metadata field 'model' has no {name!r}")
        value = model[name]
        ok = isinstance(value, bool) if kind is bool else (
            _is_int(value) and value > 0 if kind is int else isinstance(value, kind))
        if not ok:
            raise bad(f"model.{name}", want, value)
    if "fingerprint" in model and not (model["fingerprint"] is None or
                                       isinstance(model["fingerprint"], str)):
        raise bad("model.fingerprint", "a string or null", model["fingerprint"])


def _model_info(meta: dict[str, Any]) -> ModelInfo | None:
    m = meta.get("model")
    if not m:
        return None
    fp = m.get("fingerprint")
    return ModelInfo(**{k: m[k] for k in _MODEL_FIELDS},
                     fingerprint=fp if isinstance(fp, str) else None)


def _dry_order(site: Site) -> tuple[int, int]:
    # the order a forward pass reaches them: a block's input, its heads, then its output
    return site.layer, {"resid_pre": 0, "heads": 1, "resid_post": 2}[site.kind]


def check_controller(controller: Controller, *, num_layers: int | None,  # noqa: C901
                     width: Callable[[Site], int | None],
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     source: str = "artifact") -> None:
    """Check a loaded controller against a model before anything uses it.

    Its sites (and read sites) must be blocks of the model, its tensors finite numbers,
    its GGUF-style vectors (linear methods) 1-D of the model's width, and a dry ``steer`` on
    zero activations (batch 2, strengths +1 and -1, a 3-token pre-fill then a 1-token
    decode step, in ``dtype`` on ``device``) must return finite tensors of the input's shape.
    ``width(site)`` gives the activation width at a site, ``None`` where it is unknown (the
    dry steer is then skipped). Raises :class:`ArtifactError` naming ``source`` and the
    reason.
    """
    def fail(reason: str) -> ArtifactError:
        return ArtifactError(f"{source}: invalid {controller.method} controller: {reason}")

    try:
        sites = list(controller.sites)
        reads = list(controller.read_sites)
    except Exception as exc:
        raise fail(f"its sites cannot be read ({type(exc).__name__}: {exc})") from None
    if not sites:
        raise fail("it has no sites (not fitted)")
    if num_layers is not None:
        for site in [*sites, *reads]:
            if not -num_layers <= site.layer < num_layers:
                raise fail(f"site {site} is out of range: the model has {num_layers} blocks "
                           f"(layers 0..{num_layers - 1})")
    try:
        tensors = controller.state_dict()
    except Exception as exc:
        raise fail(f"its tensors cannot be read ({type(exc).__name__}: {exc})") from None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise fail(f"state {name!r} is a {type(t).__name__}, not a tensor")
        if t.is_complex():
            raise fail(f"tensor {name!r} has dtype {t.dtype}; steerlab stores real tensors")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise fail(f"tensor {name!r} has NaN or inf values")
    try:
        vectors = controller.vectors_by_layer()
    except Exception:
        vectors = None
    for layer, v in (vectors or {}).items():
        want = width(Site("resid_post", layer))
        if v.ndim != 1 or (want is not None and v.shape[0] != want):
            raise fail(f"the vector at resid_post.{layer} has shape {tuple(v.shape)}, "
                       f"expected ({want if want is not None else 'width'},)")
    widths = {s: width(s) for s in [*sites, *reads]}
    if any(w is None for w in widths.values()):
        return
    batch = 2
    strength = torch.tensor([1.0, -1.0], dtype=torch.float32, device=device)
    carry: list[dict[Any, Any]] = [{} for _ in range(batch)]
    for start, seq in ((0, 3), (3, 1)):  # a pre-fill, then one decode step
        positions = (start + torch.arange(seq, device=device)).expand(batch, seq)

        def zeros(s: Site, n: int = seq) -> torch.Tensor:
            w = widths[s]
            assert w is not None
            return torch.zeros(batch, n, w, dtype=dtype, device=device)

        ctx = StepContext(positions=positions,
                          prompt_len=torch.full((batch,), 3, dtype=torch.long, device=device),
                          reads={s: zeros(s) for s in reads}, carry=carry)
        for site in sorted(sites, key=_dry_order):
            h = zeros(site)
            try:
                with torch.no_grad():
                    out = controller.steer(site, h, strength, ctx)
            except Exception as exc:
                raise fail(f"a dry steer at {site} on zero activations {tuple(h.shape)} "
                           f"raised {type(exc).__name__}: {exc}") from None
            if not isinstance(out, torch.Tensor):
                raise fail(f"steer at {site} returned a {type(out).__name__}, not a tensor")
            if tuple(out.shape) != tuple(h.shape):
                raise fail(f"steer at {site} returned shape {tuple(out.shape)} for "
                           f"activations of shape {tuple(h.shape)}")
            if not out.is_floating_point() or out.device != h.device:
                raise fail(f"steer at {site} returned a {out.dtype} tensor on {out.device} "
                           f"for {h.dtype} activations on {h.device}")
            if not bool(torch.isfinite(out).all()):
                raise fail(f"steer at {site} returned NaN or inf on zero activations")


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
    fp = m.get("fingerprint")
    if isinstance(fp, str) and info.fingerprint is not None:
        # the weights identify the model; its id (a name or a path) is for display only
        if strict and fp != info.fingerprint:
            raise ArtifactError(
                f"{source} was fitted on {want} with other weights than {have} (weights "
                f"fingerprint {fp[:12]} vs {info.fingerprint[:12]}); the shapes match, so you "
                f"can force it with strict=False (--no-strict), but the vector may mean "
                f"nothing here.")
        return
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
        controller = METHODS[method](**(meta.get("hyperparameters") or {}))
    except Exception as exc:  # a constructor's own checks (SteeringError, TypeError, ...)
        raise ArtifactError(f"{p}: hyper-parameters do not match {method}: "
                            f"{type(exc).__name__}: {exc}") from None
    try:
        with safe_open(str(p), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise ArtifactError(f"{p}: its tensors cannot be read ({exc})") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{p}: tensor {name!r} has NaN or inf values")
    try:
        sites = [Site.parse(s) for s in meta["sites"]]
        controller.load_state(tensors, sites)
    except Exception as exc:  # a missing key, a tensor of the wrong shape or dtype
        raise ArtifactError(f"{p}: tensors do not match its metadata "
                            f"({type(exc).__name__}: {exc})") from None
    controller.model_info = _model_info(meta)
    controller.data_fingerprint = meta.get("data_fingerprint")
    controller.fit_info = dict(meta.get("fit") or {})
    model = info or controller.model_info
    hidden = model.hidden_size if model is not None else None
    check_controller(controller, num_layers=model.num_layers if model is not None else None,
                     width=lambda s: hidden if s.kind != "heads" else None, source=str(p))
    return controller


def export_gguf(controller: Controller, path: str | os.PathLike[str], *,
                scale: float = 1.0, force: bool = False) -> Path:
    """Write a linear controller as a llama.cpp GGUF control vector (``direction.{L}``).

    llama.cpp applies a control vector at every token; a controller whose default scope is
    not ``all`` would steer other tokens there than here, so it is refused unless ``force``
    (the CLI's ``--force``), which the caller should warn about."""
    from steerlab.gguf_vectors import export_control_vector
    from steerlab.scope import ALL

    controller.check_fitted()
    if controller.default_scope != ALL and not force:
        raise ArtifactError(
            f"this {controller.method} controller steers scope {controller.default_scope} but "
            f"llama.cpp adds a control vector at every token (scope all); export anyway with "
            f"force=True (--force) or refit with scope all")
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
    widths = {int(v.shape[0]) for v in cv.directions.values()}
    if not widths:
        raise ArtifactError(f"{path}: the control vector holds no direction.L tensors")
    if len(widths) > 1:
        raise ArtifactError(f"{path}: its directions have different widths {sorted(widths)}")
    width = widths.pop()
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
    # llama.cpp, repeng and steering-vectors add a control vector at every token: so does the
    # import (scope all); how the vector was fitted is not in the file (recipe "imported")
    controller = CAA(layers=sorted(cv.directions), recipe="imported", scope="all")
    controller.set_vectors({Site("resid_post", k): v for k, v in cv.directions.items()})
    controller.model_info = info
    controller.fit_info = {"imported_from": str(path), "model_hint": cv.model_hint,
                           "provenance": "llama.cpp GGUF control vector: direction.L added to "
                                         "the output of block L at every token; the fit "
                                         "recipe and data are unknown"}
    return controller
