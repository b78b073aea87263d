"""Steering methods: one file per method, each a :class:`~steerlab.methods.base.Controller`."""

from __future__ import annotations

from steerlab.methods.actadd import ActAdd
from steerlab.methods.base import Controller
from steerlab.methods.caa import CAA

METHODS: dict[str, type[Controller]] = {"caa": CAA, "actadd": ActAdd}

__all__ = ["CAA", "METHODS", "ActAdd", "Controller"]
