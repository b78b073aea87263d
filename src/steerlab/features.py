"""What an SAS vector pushes: moved to :mod:`steerlab.sae.features`; this module re-exports it
so that ``steerlab.features`` imports keep working."""

from __future__ import annotations

from steerlab.sae.features import FeatureReport, top_activating

__all__ = ["FeatureReport", "top_activating"]
