"""The controllers a server offers, loaded from a folder, and the declarative steering specs
clients send.

``steerlab serve --controllers DIR`` loads every steerlab artifact (``*.safetensors``) and
every llama.cpp control vector (``*.gguf``) in ``DIR``; a controller is named by its file's
stem. An optional ``DIR/controllers.json`` sets per-name defaults and may name one file
several times, e.g. a sentiment vector as ``positive`` and ``negative``::

    {"positive": {"file": "sentiment.safetensors", "strength": 4.0, "scope": "all",
                  "max_strength": 8, "description": "more positive sentiment"},
     "negative": {"file": "sentiment.safetensors", "strength": -4.0}}

A name in the manifest with a ``file`` replaces that file's stem-name; files the manifest does
not mention keep their stem. A manifest names files inside ``DIR`` only (no absolute paths, no
``..``) unless ``allow_outside=True``.

Every artifact is checked against the served model when the server starts, never at request
time: hidden size and layer count always, model id unless ``strict=False``, and with the
model at hand (``lm=``) its sites, tensors and a dry ``steer`` on zero activations
(:func:`steerlab.artifacts.check_controller`). A file that fails is skipped with a warning
naming it and the reason (listed in :attr:`ControllerRegistry.skipped`), or refuses the whole
folder with ``strict_controllers=True``. A request's steering is bounded per controller: the
``|strength|`` of all its entries that use one controller add up to at most that
controller's ``max_strength``.

A client never sends code: a steering spec is a controller name, a strength and a scope.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerlab import artifacts
from steerlab.errors import ArtifactError, SteeringError, SteerlabError
from steerlab.methods import Controller
from steerlab.models import LoadedModel, ModelInfo
from steerlab.runtime import Steer, check_compatible
from steerlab.scope import parse_scope
from steerlab.sites import LayerMap, find_layers

log = logging.getLogger("steerlab.serve")

MANIFEST = "controllers.json"
DEFAULT_MAX_STRENGTH = 64.0
_OPTION_KEYS = {"file", "strength", "scope", "max_strength", "description"}


@dataclass(frozen=True)
class SteeringSpec:
    """One entry of a request's ``steering`` list (after JSON validation)."""

    controller: str
    strength: float | None = None
    scope: str | None = None


@dataclass(frozen=True)
class ServedController:
    """A controller under a name, with the defaults a request falls back on."""

    name: str
    controller: Controller
    path: Path
    strength: float = 1.0
    scope: str | None = None  # None: the controller's own default scope
    max_strength: float = DEFAULT_MAX_STRENGTH
    description: str = ""

    def describe(self) -> dict[str, Any]:
        c = self.controller
        info = c.model_info.as_dict() if c.model_info is not None else None
        return {
            "id": self.name,
            "object": "steering.controller",
            "method": c.method,
            "file": self.path.name,
            "sites": [str(s) for s in c.sites],
            "read_sites": [str(s) for s in c.read_sites],
            "default_strength": self.strength,
            "default_scope": self.scope or str(c.default_scope),
            "max_strength": self.max_strength,
            "description": self.description,
            "hyperparameters": c.hyperparameters(),
            "fitted_on": info,
            "data_fingerprint": c.data_fingerprint,
        }


def _number(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(float(value)):
        raise ArtifactError(f"{MANIFEST}: {name}.{key} must be a finite number, got {value!r}")
    return float(value)


def check_max_strength(value: Any, what: str = "max_strength") -> float:
    """A strength bound must be a finite, positive number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(float(value)) or value <= 0:
        raise SteeringError(f"{what} must be a finite, positive number, got {value!r}")
    return float(value)


def validate_controller(controller: Controller, lm: LoadedModel, *,
                        layers: LayerMap | None = None, source: str = "controller") -> None:
    """Check that ``controller`` can steer ``lm``: its fitted shape and sites
    (:func:`steerlab.runtime.check_compatible`), its tensors, and a dry ``steer`` on zero
    activations in the model's dtype and device (:func:`steerlab.artifacts.check_controller`).
    Raises :class:`~steerlab.errors.ArtifactError` naming ``source`` and the reason."""
    layers = layers if layers is not None else find_layers(lm.model)
    try:
        check_compatible(controller, layers, lm.info.model_id)  # also resolves every site
    except SteerlabError as exc:
        raise ArtifactError(f"{source}: {exc}") from None
    except Exception as exc:
        raise ArtifactError(f"{source}: invalid controller ({type(exc).__name__}: {exc})") \
            from None
    param = next(iter(lm.model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    artifacts.check_controller(controller, num_layers=layers.num_layers, width=layers.width,
                               dtype=dtype, device=lm.device, source=source)


class ControllerRegistry:
    """Named controllers; :meth:`resolve` turns request specs into runtime :class:`Steer`\\ s.

    Args:
        controllers: the served controllers by name.
        max_steers: most entries one request's ``steering`` list may have.
        skipped: files :meth:`from_dir` left out, with the reason (for start-up messages).
    """

    def __init__(self, controllers: Mapping[str, ServedController], *,
                 max_steers: int = 8, skipped: Sequence[tuple[Path, str]] = ()) -> None:
        if isinstance(max_steers, bool) or not isinstance(max_steers, int) or max_steers < 1:
            raise SteeringError(f"max_steers must be a positive integer, got {max_steers!r}")
        self.controllers = dict(controllers)
        self.max_steers = max_steers
        self.skipped = list(skipped)

    @classmethod
    def empty(cls) -> ControllerRegistry:
        return cls({})

    def validate(self, lm: LoadedModel, *, layers: LayerMap | None = None) -> None:
        """Check every controller against the served model (:func:`validate_controller`);
        raises :class:`~steerlab.errors.ArtifactError` on the first that cannot steer it."""
        layers = layers if layers is not None else find_layers(lm.model)
        seen: set[int] = set()
        for name in self.names:
            served = self.controllers[name]
            if id(served.controller) in seen:
                continue
            seen.add(id(served.controller))
            validate_controller(served.controller, lm, layers=layers,
                                source=f"controller {name!r} ({served.path})")

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str], info: ModelInfo | None = None, *,  # noqa: C901
                 strict: bool = True, max_strength: float = DEFAULT_MAX_STRENGTH,
                 max_steers: int = 8, lm: LoadedModel | None = None,
                 strict_controllers: bool = False,
                 allow_outside: bool = False) -> ControllerRegistry:
        """Load every artifact and GGUF control vector in ``folder`` (see the module doc).

        Args:
            info: the served model (``lm.info`` when ``lm`` is given).
            strict: also refuse artifacts fitted on another model id (shapes always).
            max_strength: the bound of controllers without their own ``max_strength``.
            max_steers: most steering entries per request.
            lm: the served model, for the full check of every controller (a dry steer).
            strict_controllers: a file that cannot be loaded or fails the checks raises
                :class:`~steerlab.errors.ArtifactError`; by default it is skipped with a
                warning (logged, and listed in :attr:`skipped`).
            allow_outside: let ``controllers.json`` name files outside ``folder``.
        """
        max_strength = check_max_strength(max_strength, "the default max_strength")
        if info is None and lm is not None:
            info = lm.info
        layers = find_layers(lm.model) if lm is not None else None
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ArtifactError(f"controllers folder not found: {root}")
        files = sorted([*root.glob("*.safetensors"), *root.glob("*.gguf")])
        manifest = _read_manifest(root / MANIFEST)
        if not files and not manifest:
            raise ArtifactError(
                f"{root} holds no controllers (*.safetensors artifacts or *.gguf control "
                f"vectors); fit one with `steerlab fit --out {root}/NAME.safetensors ...`"
            )
        loaded: dict[Path, Controller | None] = {}
        skipped: list[tuple[Path, str]] = []

        def load(path: Path) -> Controller | None:
            if path not in loaded:
                try:
                    controller: Controller = (
                        artifacts.import_gguf(path, info) if path.suffix == ".gguf"
                        else artifacts.load(path, info, strict=strict))
                    if lm is not None:
                        validate_controller(controller, lm, layers=layers, source=str(path))
                except Exception as exc:  # SteerlabError, or a reader's own on a bad file
                    reason = str(exc) if isinstance(exc, SteerlabError) else (
                        f"{path}: cannot be loaded ({type(exc).__name__}: {exc})")
                    if strict_controllers:
                        raise ArtifactError(reason) from None
                    log.warning({"event": "controller_skipped", "file": str(path),
                                 "reason": reason})
                    skipped.append((path, reason))
                    loaded[path] = None
                else:
                    loaded[path] = controller
            return loaded[path]

        by_name: dict[str, ServedController] = {}
        claimed: set[Path] = set()
        for name, opts in manifest.items():
            file = opts.get("file", None)
            path = _inside(root, name, file, allow_outside) if file is not None else \
                _by_stem(files, name, root)
            if not path.is_file():
                raise ArtifactError(f"{MANIFEST}: {name!r} names {file}, which is not in "
                                    f"{root} (or not a file)")
            claimed.add(path)
            # the manifest's values first: a bad manifest stops the server, whatever the files
            strength = _number(name, "strength", opts.get("strength", 1.0))
            scope = _scope(name, opts.get("scope"))
            bound = _bound(name, opts.get("max_strength", max_strength))
            if abs(strength) > bound:
                raise ArtifactError(f"{name}: default strength {strength} exceeds its "
                                    f"max_strength {bound}")
            controller = load(path)
            if controller is None:
                log.warning({"event": "controller_skipped", "name": name, "file": str(path),
                             "reason": "its file was skipped"})
                continue
            by_name[name] = ServedController(
                name=name, controller=controller, path=path, strength=strength, scope=scope,
                max_strength=bound, description=str(opts.get("description", "")),
            )
        for path in files:
            if path in claimed or path.stem in by_name or path.stem in manifest:
                continue
            controller = load(path)
            if controller is None:
                continue
            by_name[path.stem] = ServedController(
                name=path.stem, controller=controller, path=path, max_strength=max_strength)
        for sc in by_name.values():
            if abs(sc.strength) > sc.max_strength:
                raise ArtifactError(f"{sc.name}: default strength {sc.strength} exceeds its "
                                    f"max_strength {sc.max_strength}")
        return cls(by_name, max_steers=max_steers, skipped=skipped)

    @property
    def names(self) -> list[str]:
        return sorted(self.controllers)

    def get(self, name: str) -> ServedController:
        try:
            return self.controllers[name]
        except KeyError:
            known = ", ".join(self.names) or "none are loaded"
            raise SteeringError(f"unknown controller {name!r}; this server has: {known}") \
                from None

    def resolve(self, specs: Sequence[SteeringSpec] | None) -> list[Steer]:
        """Validate a request's steering and return the runtime steers (empty: unsteered)."""
        if not specs:
            return []
        if len(specs) > self.max_steers:
            raise SteeringError(f"at most {self.max_steers} steering entries per request, got "
                                f"{len(specs)}")
        out = []
        # entries that use one controller (under any of its names) add up: bound their sum
        totals: dict[int, list[Any]] = {}  # id(controller) -> [sum |s|, bound, names, count]
        for i, spec in enumerate(specs):
            served = self.get(spec.controller)
            strength = served.strength if spec.strength is None else float(spec.strength)
            if not math.isfinite(strength):
                raise SteeringError(f"steering[{i}].strength must be finite")
            if abs(strength) > served.max_strength:
                raise SteeringError(
                    f"steering[{i}]: strength {strength} is out of bounds for {served.name!r} "
                    f"(|strength| <= {served.max_strength})"
                )
            total = totals.setdefault(id(served.controller), [0.0, 0.0, [], 0])
            total[0] += abs(strength)
            total[1] = max(total[1], served.max_strength)
            if served.name not in total[2]:
                total[2].append(served.name)
            total[3] += 1
            scope = spec.scope if spec.scope is not None else served.scope
            out.append(Steer(served.controller, strength,
                             parse_scope(scope) if scope is not None else None))
        for size, bound, names, count in totals.values():
            if size > bound:
                which = " / ".join(repr(n) for n in names)
                raise SteeringError(
                    f"steering: the {count} entries using {which} add up to |strength| "
                    f"{size:g}, over its bound of {bound:g} (entries of one controller add up, "
                    f"so their |strength| must sum to at most its max_strength)"
                )
        return out

    def describe_steers(self, specs: Sequence[SteeringSpec] | None) -> list[dict[str, Any]]:
        """The resolved steering of a request, for responses and logs (call after resolve)."""
        out = []
        for spec in specs or []:
            served = self.controllers[spec.controller]
            scope = spec.scope if spec.scope is not None else served.scope
            out.append({
                "controller": served.name, "method": served.controller.method,
                "strength": served.strength if spec.strength is None else float(spec.strength),
                "scope": str(parse_scope(scope)) if scope else str(
                    served.controller.default_scope),
            })
        return out


def _scope(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ArtifactError(f"{MANIFEST}: {name}.scope must be a string, got {value!r}")
    try:
        return str(parse_scope(value))
    except SteeringError as exc:
        raise ArtifactError(f"{MANIFEST}: {name}.scope: {exc}") from exc


def _bound(name: str, value: Any) -> float:
    try:
        return check_max_strength(value, f"{MANIFEST}: {name}.max_strength")
    except SteeringError as exc:
        raise ArtifactError(str(exc)) from None


def _inside(root: Path, name: str, file: Any, allow_outside: bool) -> Path:
    """The path a manifest's ``file`` names; refused outside ``root`` unless allowed."""
    if not isinstance(file, str) or not file:
        raise ArtifactError(f"{MANIFEST}: {name}.file must be a file name, got {file!r}")
    rel = Path(file)
    path = root / rel
    if allow_outside:
        return path
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise ArtifactError(
            f"{MANIFEST}: {name!r} names {file!r}, which is outside the controllers folder "
            f"{root} (an absolute path or '..'); a manifest names files in its folder only, "
            f"so that serving a folder never reads files elsewhere: move the file into "
            f"{root}, or pass --allow-outside (allow_outside=True) to allow it")
    return path


def _by_stem(files: Sequence[Path], name: str, root: Path) -> Path:
    for path in files:
        if path.stem == name:
            return path
    raise ArtifactError(f"{MANIFEST}: {name!r} has no 'file' and {root} has no {name}.safetensors "
                        f"or {name}.gguf")


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path} must hold a JSON object of name -> options")
    out: dict[str, dict[str, Any]] = {}
    for name, opts in raw.items():
        if not isinstance(opts, dict):
            raise ArtifactError(f"{path}: the options of {name!r} must be an object")
        unknown = set(opts) - _OPTION_KEYS
        if unknown:
            raise ArtifactError(f"{path}: unknown option(s) {sorted(unknown)} for {name!r}; "
                                f"use {sorted(_OPTION_KEYS)}")
        if not name or "/" in name:
            raise ArtifactError(f"{path}: invalid controller name {name!r}")
        out[name] = opts
    return out
