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
not mention keep their stem. Every artifact is checked against the served model when the
server starts (hidden size and layer count always, model id unless ``strict=False``), so a
mismatch fails at start-up with both models named, never at request time.

A client never sends code: a steering spec is a controller name, a strength and a scope.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlab import artifacts
from steerlab.errors import ArtifactError, SteeringError
from steerlab.methods import Controller
from steerlab.models import ModelInfo
from steerlab.runtime import Steer
from steerlab.scope import parse_scope

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


class ControllerRegistry:
    """Named controllers; :meth:`resolve` turns request specs into runtime :class:`Steer`\\ s.

    Args:
        controllers: the served controllers by name.
        max_steers: most entries one request's ``steering`` list may have.
    """

    def __init__(self, controllers: Mapping[str, ServedController], *,
                 max_steers: int = 8) -> None:
        self.controllers = dict(controllers)
        self.max_steers = max_steers

    @classmethod
    def empty(cls) -> ControllerRegistry:
        return cls({})

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str], info: ModelInfo | None = None, *,
                 strict: bool = True, max_strength: float = DEFAULT_MAX_STRENGTH,
                 max_steers: int = 8) -> ControllerRegistry:
        """Load every artifact and GGUF control vector in ``folder`` (see the module doc)."""
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
        loaded: dict[Path, Controller] = {}

        def load(path: Path) -> Controller:
            if path not in loaded:
                if path.suffix == ".gguf":
                    loaded[path] = artifacts.import_gguf(path, info)
                else:
                    loaded[path] = artifacts.load(path, info, strict=strict)
            return loaded[path]

        by_name: dict[str, ServedController] = {}
        claimed: set[Path] = set()
        for name, opts in manifest.items():
            file = opts.get("file", None)
            path = root / str(file) if file is not None else _by_stem(files, name, root)
            if not path.is_file():
                raise ArtifactError(f"{MANIFEST}: {name!r} names {path.name}, which is not in "
                                    f"{root}")
            claimed.add(path)
            by_name[name] = ServedController(
                name=name, controller=load(path), path=path,
                strength=_number(name, "strength", opts.get("strength", 1.0)),
                scope=_scope(name, opts.get("scope")),
                max_strength=_number(name, "max_strength",
                                     opts.get("max_strength", max_strength)),
                description=str(opts.get("description", "")),
            )
        for path in files:
            if path in claimed or path.stem in by_name:
                continue
            by_name[path.stem] = ServedController(
                name=path.stem, controller=load(path), path=path, max_strength=max_strength)
        for sc in by_name.values():
            if abs(sc.strength) > sc.max_strength:
                raise ArtifactError(f"{sc.name}: default strength {sc.strength} exceeds its "
                                    f"max_strength {sc.max_strength}")
        return cls(by_name, max_steers=max_steers)

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
            scope = spec.scope if spec.scope is not None else served.scope
            out.append(Steer(served.controller, strength,
                             parse_scope(scope) if scope is not None else None))
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
