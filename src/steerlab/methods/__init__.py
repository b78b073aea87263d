"""Steering methods: one file per method, each a :class:`~steerlab.methods.base.Controller`.

:data:`METHODS` maps each method's name to its class: the built-in methods below, then the
methods other packages declare under the ``steerlab.methods`` entry-point group (read once,
when this package is first imported, in every process: the CLI, the server, a sweep's
subprocesses), then any a caller adds with :func:`register` (this process only). See
``docs/adding-a-method.md``.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import TypeVar

from steerlab.methods.act import LinearAcT, MeanAcT
from steerlab.methods.actadd import ActAdd
from steerlab.methods.alqr import ALQR, SPID, ActAddLFS, ALQRPlus
from steerlab.methods.angular import AngularSteering
from steerlab.methods.base import Controller
from steerlab.methods.caa import CAA
from steerlab.methods.inn import INNSteer
from steerlab.methods.iti import ITI
from steerlab.methods.mimic import MiMiC
from steerlab.methods.ode import ODESteer, StepODESteer
from steerlab.methods.probe import ProbeDirection
from steerlab.methods.repe import RepE
from steerlab.methods.sas import SAS

# The registry of fit-and-save methods, keyed by each class's ``method`` name (artifacts
# record it; the CLI's ``--method`` takes it). Order: as listed here.
_REGISTERED: tuple[type[Controller], ...] = (
    CAA, ActAdd, ALQR, ALQRPlus, SPID, ActAddLFS, ODESteer, StepODESteer, INNSteer, SAS,
    ITI, RepE, ProbeDirection, AngularSteering, MeanAcT, LinearAcT, MiMiC,
)


def _registry(classes: tuple[type[Controller], ...]) -> dict[str, type[Controller]]:
    """``{cls.method: cls}``; two classes may not share a method name."""
    out: dict[str, type[Controller]] = {}
    for cls in classes:
        if cls.method in out:
            raise RuntimeError(f"{cls.__name__} and {out[cls.method].__name__} are both "
                               f"registered as method {cls.method!r}")
        out[cls.method] = cls
    return out


METHODS: dict[str, type[Controller]] = _registry(_REGISTERED)

# The entry-point group a package declares its methods under, ``NAME = "module:Class"``
# with NAME the class's ``method``.
ENTRY_POINT_GROUP = "steerlab.methods"

ControllerClass = TypeVar("ControllerClass", bound=type[Controller])


def register(cls: ControllerClass) -> ControllerClass:
    """Add a :class:`Controller` subclass to :data:`METHODS` under its ``method`` name and
    return it (so it also works as a class decorator). From then on, in this process, the
    name works everywhere a method name does: ``fit_method``, ``steerlab fit --method``,
    sweeps, ``artifacts.load`` and the server. Registering the same class again does
    nothing; another class under a name already taken raises :class:`SteeringError`."""
    from steerlab.errors import SteeringError

    if not (isinstance(cls, type) and issubclass(cls, Controller)):
        raise SteeringError(f"register takes a Controller subclass, got {cls!r}")
    name = getattr(cls, "method", None)
    if not isinstance(name, str) or not name:
        raise SteeringError(f"{cls.__name__} has no method name: set the class attribute "
                            f"method = \"...\"")
    other = METHODS.get(name)
    if other is not None and other is not cls:
        raise SteeringError(f"method {name!r} is already registered by "
                            f"{other.__module__}.{other.__qualname__}")
    METHODS[name] = cls
    return cls


def load_entry_points() -> list[str]:
    """Register every method declared under :data:`ENTRY_POINT_GROUP` (done once at import;
    call it again after installing a package in a running process). A declaration that
    fails to import, is not a controller, is named other than its class's ``method`` or
    takes a name already registered is skipped with a warning, so one broken package never
    breaks steerlab. Returns the names registered."""
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            if getattr(cls, "method", None) != ep.name:
                raise ValueError(f"the entry point's name must be the class's method name "
                                 f"({getattr(cls, 'method', None)!r})")
            register(cls)
        except Exception as exc:  # a plugin's own import error, a clash, ...
            warnings.warn(f"steerlab: method entry point {ep.name} = {ep.value!r} is not "
                          f"registered: {type(exc).__name__}: {exc}", stacklevel=2)
            continue
        names.append(ep.name)
    return names


load_entry_points()

__all__ = [
    "ALQR",
    "CAA",
    "ENTRY_POINT_GROUP",
    "ITI",
    "METHODS",
    "SAS",
    "SPID",
    "ALQRPlus",
    "ActAdd",
    "ActAddLFS",
    "AngularSteering",
    "Controller",
    "INNSteer",
    "LinearAcT",
    "MeanAcT",
    "MiMiC",
    "ODESteer",
    "ProbeDirection",
    "RepE",
    "StepODESteer",
    "load_entry_points",
    "register",
]
