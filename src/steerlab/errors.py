"""Exceptions raised by steerlab.

Every error a user can trigger with bad input derives from :class:`SteerlabError`
(itself a ``ValueError``), and its message names the problem and what to do.
"""

from __future__ import annotations


class SteerlabError(ValueError):
    """Base class of every user-facing steerlab error."""


class DataError(SteerlabError):
    """A dataset is empty, one-class, malformed or has missing fields."""


class SiteError(SteerlabError):
    """A layer index, site name or model layout is wrong or cannot be found."""


class ModelLoadError(SteerlabError):
    """A model cannot be found or loaded (a missing embedded package, a bad path)."""


class ArtifactError(SteerlabError):
    """An artifact is malformed, or does not match the model it is loaded into."""


class SteeringError(SteerlabError):
    """A steering request is invalid (non-finite strength, wrong width, unknown scope)."""
