"""Steering methods: one file per method, each a :class:`~steerlab.methods.base.Controller`."""

from __future__ import annotations

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

__all__ = [
    "ALQR",
    "CAA",
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
]
