"""The controllers folder of a vLLM server: loaded with steerlab's own registry, checked
against the served model's config (front end) and against its modules (workers).

The folder and its options come from the environment, which vLLM's front end, engine core
and worker processes all inherit (``steerlab serve --backend vllm`` sets them):

``STEERLAB_VLLM_CONTROLLERS``  the controllers folder (unset: the plugin steers nothing and
                               refuses every ``steering`` field with a 400)
``STEERLAB_VLLM_STRICT``       ``0`` accepts artifacts fitted on another model id (shapes
                               are always checked); default ``1``
``STEERLAB_VLLM_MAX_STRENGTH`` the bound of controllers without their own (default 64)
``STEERLAB_VLLM_MAX_STEERS``   most entries per request (default 8)
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from steerlab.models import ModelInfo
from steerlab.serve.registry import DEFAULT_MAX_STRENGTH, ControllerRegistry

ENV_FOLDER = "STEERLAB_VLLM_CONTROLLERS"
ENV_STRICT = "STEERLAB_VLLM_STRICT"
ENV_MAX_STRENGTH = "STEERLAB_VLLM_MAX_STRENGTH"
ENV_MAX_STEERS = "STEERLAB_VLLM_MAX_STEERS"


def model_info_from_folder(model: str, hf_config: Any = None) -> ModelInfo:
    """What artifacts check, for a model vLLM serves from ``model`` (a folder or hub id).

    The model id is the first line of ``steerlab_source.txt`` when steerlab converted the
    folder (``load_model()`` writes it: ``smollm2-135m`` for the embedded model), else the
    name vLLM was given, as ``steerlab.models.load_model(model)`` would record it.
    """
    path = Path(model).expanduser()
    model_id = model
    source = path / "steerlab_source.txt"
    if source.is_file():
        first = source.read_text().splitlines()[:1]
        if first and first[0].strip():
            model_id = first[0].strip()
    cfg: dict[str, Any] = {}
    if hf_config is not None:
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else \
            hf_config
        cfg = {"hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
               "architectures": getattr(hf_config, "architectures", None)}
    elif (path / "config.json").is_file():
        raw = json.loads((path / "config.json").read_text())
        text_raw = raw.get("text_config", raw)
        cfg = {"hidden_size": text_raw["hidden_size"],
               "num_hidden_layers": text_raw["num_hidden_layers"],
               "architectures": raw.get("architectures")}
    arch = cfg.get("architectures") or ["unknown"]
    is_chat = (path / "chat_template.jinja").is_file()
    tc = path / "tokenizer_config.json"
    if not is_chat and tc.is_file():
        is_chat = bool(json.loads(tc.read_text()).get("chat_template"))
    return ModelInfo(model_id=model_id, architecture=str(arch[0]),
                     hidden_size=int(cfg.get("hidden_size", 0)),
                     num_layers=int(cfg.get("num_hidden_layers", 0)), is_chat=is_chat)


def folder() -> str | None:
    value = os.environ.get(ENV_FOLDER, "").strip()
    return value or None


@lru_cache(maxsize=4)
def _load(folder_: str, info: tuple[str, str, int, int, bool], strict: bool,
          max_strength: float, max_steers: int) -> ControllerRegistry:
    return ControllerRegistry.from_dir(folder_, ModelInfo(*info), strict=strict,
                                       max_strength=max_strength, max_steers=max_steers)


def load_registry(info: ModelInfo) -> ControllerRegistry:
    """The served controllers for ``info`` (empty when no folder is configured); raises
    :class:`~steerlab.errors.ArtifactError` for a folder that cannot be served."""
    f = folder()
    if f is None:
        return ControllerRegistry({}, max_steers=_int(ENV_MAX_STEERS, 8))
    key = (info.model_id, info.architecture, info.hidden_size, info.num_layers, info.is_chat)
    return _load(f, key, os.environ.get(ENV_STRICT, "1") != "0",
                 float(os.environ.get(ENV_MAX_STRENGTH, DEFAULT_MAX_STRENGTH)),
                 _int(ENV_MAX_STEERS, 8))


def fingerprint(registry: ControllerRegistry) -> str:
    """A digest of the served files (names, sizes, times), part of every steered request's
    cache salt, so that replacing an artifact never reuses KV blocks computed with the old."""
    h = hashlib.sha256()
    for name in registry.names:
        sc = registry.controllers[name]
        try:
            st = sc.path.stat()
            h.update(f"{name}:{sc.path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{name}:{sc.path.name};".encode())
    return h.hexdigest()[:16]


def _int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
