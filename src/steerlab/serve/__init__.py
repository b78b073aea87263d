"""Serving: a continuous-batching engine with per-row steering and an OpenAI-compatible
HTTP server (``steerlab serve``)."""

from __future__ import annotations

from steerlab.serve.engine import (
    Completion,
    Engine,
    EngineBusy,
    EngineClosed,
    EngineConfig,
    Event,
    RequestHandle,
    TokenLogprob,
)
from steerlab.serve.sampling import SamplingParams

__all__ = [
    "Completion",
    "Engine",
    "EngineBusy",
    "EngineClosed",
    "EngineConfig",
    "Event",
    "RequestHandle",
    "SamplingParams",
    "TokenLogprob",
]
