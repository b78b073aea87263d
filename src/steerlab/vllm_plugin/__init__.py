"""steerlab as a vLLM plugin: per-request steering with steerlab's own schema.

Installed with ``pip install steerlab[vllm]`` (or ``scripts/setup_vllm.sh``), vLLM finds it
through the ``vllm.general_plugins`` entry point ``steerlab`` and calls :func:`register` in
every process it starts (front end, engine core, workers). Controllers come from the folder
in ``$STEERLAB_VLLM_CONTROLLERS`` (see :mod:`steerlab.vllm_plugin.controllers`); each request
picks its own, offline::

    SamplingParams(temperature=0, extra_args={"steering": [
        {"controller": "positive", "strength": 4.0, "scope": "all"}]})

and online with the ``steering`` body field that ``steerlab serve`` accepts (the
``vllm.endpoint_plugins`` entry ``steerlab_http`` adds it and ``GET /v1/steering``;
``steerlab serve --backend vllm`` enables both). See docs/vllm.md.
"""

from __future__ import annotations

import logging

log = logging.getLogger("steerlab.vllm")


def register() -> None:
    """The ``vllm.general_plugins`` entry point: safe to call more than once per process."""
    from steerlab.vllm_plugin import _internals

    _internals.install()


def endpoint_plugin() -> object:
    """The ``vllm.endpoint_plugins`` entry point (``/v1/steering`` and the body field)."""
    from steerlab.vllm_plugin.http import SteeringEndpoints

    return SteeringEndpoints()
