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
    "iti": ITI,
    "repe": RepE,
    "probe": ProbeDirection,
    "angular": AngularSteering,
    "mean_act": MeanAcT,
    "linear_act": LinearAcT,
    "mimic": MiMiC,
}

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
