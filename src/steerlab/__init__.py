"""steerlab: inference-time control of language models by steering their activations."""

from __future__ import annotations

__version__ = "0.1.0"
