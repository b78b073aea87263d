"""The ``steering`` field of a vLLM request: parsing, validation and the prefix-cache salt.

A request carries steerlab's own schema, the list ``steerlab serve`` accepts::

    [{"controller": "positive", "strength": 4.0, "scope": "all"}, ...]

offline as ``SamplingParams(extra_args={"steering": [...]})`` and online as the body field
``steering`` (the plugin's HTTP middleware moves it into ``vllm_xargs`` as a JSON string,
since ``vllm_xargs`` carries only strings, numbers and lists). Both forms reach
:func:`canonical`, which validates them against the served controllers with
:meth:`steerlab.serve.registry.ControllerRegistry.resolve` (names, strength bounds, scopes,
the per-controller sum) and returns the resolved entries: every default filled in, so the
engine side never needs the manifest again and the cache salt is a function of what is
actually applied.

Nothing here imports vLLM: it is tested in the main virtualenv too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steerlab.errors import SteeringError
from steerlab.scope import TokenScope, parse_scope
from steerlab.serve.registry import ControllerRegistry, SteeringSpec

KEY = "steering"  # the extra_args / vllm_xargs / body key
_FIELDS = {"controller", "strength", "scope"}


@dataclass(frozen=True)
class Resolved:
    """One steering entry after validation: a served name, a strength, a scope."""

    controller: str
    strength: float
    scope: TokenScope

    def as_dict(self) -> dict[str, Any]:
        return {"controller": self.controller, "strength": self.strength,
                "scope": str(self.scope)}


def parse_specs(raw: Any) -> list[SteeringSpec]:
    """The declarative entries of ``raw`` (a list of objects, or that list as a JSON string),
    checked for shape only (the same rules as ``steerlab serve``'s pydantic model)."""
    if raw is None:
        return []
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise SteeringError(f"steering must be a JSON list of objects ({exc})") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise SteeringError(
            f"steering must be a list of {{controller, strength, scope}} objects, got "
            f"{type(raw).__name__}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise SteeringError(f"steering[{i}] must be an object, got {type(item).__name__}")
        unknown = set(item) - _FIELDS
        if unknown:
            raise SteeringError(f"steering[{i}] has unknown field(s) {sorted(unknown)}; use "
                                f"controller, strength and scope")
        name = item.get("controller")
        if not isinstance(name, str) or not name or len(name) > 200:
            raise SteeringError(f"steering[{i}].controller must be a controller name")
        strength = item.get("strength")
        if strength is not None and (isinstance(strength, bool)
                                     or not isinstance(strength, int | float)):
            raise SteeringError(f"steering[{i}].strength must be a number, got {strength!r}")
        scope = item.get("scope")
        if scope is not None and (not isinstance(scope, str) or len(scope) > 40):
            raise SteeringError(f"steering[{i}].scope must be a string such as 'all'")
        out.append(SteeringSpec(name, None if strength is None else float(strength), scope))
    return out


def canonical(raw: Any, registry: ControllerRegistry) -> list[Resolved]:
    """Validate ``raw`` against ``registry`` and resolve every default (see the module doc).
    Raises :class:`~steerlab.errors.SteeringError` with a client-facing message."""
    specs = parse_specs(raw)
    if not specs:
        return []
    steers = registry.resolve(specs)  # names, bounds, sums, scopes
    out = []
    for spec, steer in zip(specs, steers, strict=True):
        out.append(Resolved(spec.controller, float(steer.strength), steer.resolved_scope()))
    return out


def encode(entries: Sequence[Resolved]) -> str:
    """The resolved entries as the JSON string the engine side reads."""
    return json.dumps([e.as_dict() for e in entries], separators=(",", ":"), sort_keys=True)


def decode(raw: Any) -> list[Resolved]:
    """The engine side's reading of :func:`encode`'s output (already validated)."""
    if raw is None:
        return []
    items = json.loads(raw) if isinstance(raw, str | bytes) else raw
    return [Resolved(str(d["controller"]), float(d["strength"]), parse_scope(d["scope"]))
            for d in items]


def depends_on_prompt_len(scope: TokenScope) -> bool:
    """Whether the positions ``scope`` selects depend on the prompt length."""
    return scope.kind in ("last", "generated") or (scope.kind == "from" and scope.start < 0)


def cache_salt(entries: Sequence[Resolved], prompt_len: int, user_salt: str | None,
               fingerprint: str = "") -> str | None:
    """The prefix-cache salt of a request: ``None`` (the user's own salt, or none) when it is
    unsteered, else a digest of the resolved steering, of the prompt length when a scope
    depends on it, of the controllers' fingerprint and of the user's salt. Requests with
    different steering (or none) never share KV blocks; requests with the same steering do.
    """
    active = [e for e in entries if e.strength != 0]
    if not active:
        return user_salt
    doc: dict[str, Any] = {"steering": [e.as_dict() for e in active], "controllers": fingerprint,
           "user": user_salt}
    if any(depends_on_prompt_len(e.scope) for e in active):
        doc["prompt_len"] = int(prompt_len)
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
    return f"steerlab-{digest}"
