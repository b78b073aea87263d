"""The HTTP side of the plugin (a ``vllm.endpoint_plugins`` entry, opt-in through
``VLLM_PLUGINS``): ``GET /v1/steering`` and steerlab's ``steering`` body field.

vLLM's OpenAI endpoints carry per-request extras in ``vllm_xargs``, which holds only strings,
numbers and lists. A small ASGI middleware takes the ``steering`` list that ``steerlab serve``
accepts from the JSON body of ``/v1/completions`` and ``/v1/chat/completions``, validates it
against the served controllers (an OpenAI-shaped 400 naming the problem otherwise) and puts
its resolved form into ``vllm_xargs["steering"]`` as a JSON string; the engine's input
processor validates it again (:mod:`steerlab.vllm_plugin._internals`), so a client that sends
``vllm_xargs`` directly gets the same checks.
"""

from __future__ import annotations

import json
from typing import Any

from steerlab.errors import SteerlabError
from steerlab.vllm_plugin import controllers, spec

_PATHS = ("/v1/completions", "/v1/chat/completions")


def _registry(model: str) -> Any:
    return controllers.load_registry(controllers.model_info_from_folder(model))


def _error(message: str, status: int = 400) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError",
                                 "param": "steering", "code": status}}).encode()


class SteeringBodyMiddleware:
    """Pure ASGI (streaming responses pass through untouched)."""

    def __init__(self, app: Any, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or \
                scope.get("path") not in _PATHS:
            await self.app(scope, receive, send)
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        if isinstance(doc, dict) and "steering" in doc:
            raw = doc.pop("steering")
            try:
                entries = spec.canonical(raw, _registry(self.state["model"])) \
                    if raw is not None else []
            except SteerlabError as exc:
                await self._reply(send, _error(str(exc)))
                return
            if entries:
                xargs = doc.get("vllm_xargs")
                if xargs is None:
                    xargs = doc["vllm_xargs"] = {}
                if not isinstance(xargs, dict):
                    await self._reply(send, _error("vllm_xargs must be an object"))
                    return
                xargs["steering"] = spec.encode(entries)
            body = json.dumps(doc).encode()
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, replay, send)

    @staticmethod
    async def _reply(send: Any, payload: bytes, status: int = 400) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


class SteeringEndpoints:
    """The ``vllm.endpoint_plugins`` object (see vLLM's ``EndpointPlugin`` protocol)."""

    name = "steerlab_http"
    required_tasks = None

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"model": None}

    def attach_router(self, app: Any) -> None:
        from fastapi.responses import JSONResponse

        state = self.state

        async def list_steering() -> Any:
            model = state.get("model")
            if model is None:
                return JSONResponse({"object": "list", "data": []})
            try:
                reg = _registry(model)
            except SteerlabError as exc:
                return JSONResponse({"error": {"message": str(exc), "type": "ServerError",
                                               "code": 500}}, status_code=500)
            return JSONResponse({"object": "list",
                                 "data": [reg.controllers[n].describe() for n in reg.names]})

        app.add_api_route("/v1/steering", list_steering, methods=["GET"])
        app.add_middleware(SteeringBodyMiddleware, state=state)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        self.state["model"] = getattr(args, "model", None) or getattr(args, "model_tag", None)
