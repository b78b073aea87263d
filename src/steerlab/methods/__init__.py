"""Steering methods: one file per method, each a :class:`~steerlab.methods.base.Controller`."""

from __future__ import annotations

from steerlab.methods.actadd import ActAdd
from steerlab.methods.alqr import ALQR, SPID, ActAddLFS, ALQRPlus
from steerlab.methods.base import Controller
from steerlab.methods.caa import CAA
from steerlab.methods.inn import INNSteer
from steerlab.methods.ode import ODESteer, StepODESteer
from steerlab.methods.sas import SAS

METHODS: dict[str, type[Controller]] = {
    "caa": CAA,
    "actadd": ActAdd,
    "alqr": ALQR,
    "alqr_plus": ALQRPlus,
    "spid": SPID,
    "actadd_lfs": ActAddLFS,
    "odesteer": ODESteer,
    "step_odesteer": StepODESteer,
    "innsteer": INNSteer,
    "sas": SAS,
}

__all__ = [
    "ALQR",
    "CAA",
    "METHODS",
    "SAS",
    "SPID",
    "ALQRPlus",
    "ActAdd",
    "ActAddLFS",
    "Controller",
    "INNSteer",
    "ODESteer",
    "StepODESteer",
]
