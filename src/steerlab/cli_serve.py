"""Old import path of ``steerlab serve``'s helpers; the command now lives in
:mod:`steerlab.cli.serve`."""

from steerlab.cli.serve import parse_default_steering, serve_command

__all__ = ["parse_default_steering", "serve_command"]
