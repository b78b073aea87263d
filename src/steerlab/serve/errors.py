"""The server's errors, in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

:class:`APIError` is what the routes, the state and the middleware raise or answer with;
:func:`install_error_handlers` maps everything else onto it: schema validation failures
(422, the first few problems in the message, the first one's location as ``param``),
Starlette's HTTP errors (404 for an unknown route, 405 keeping its ``Allow`` header, 400 for a
body that cannot be parsed, with the parser's reason), and any other exception (500, logged
with its traceback on the ``steerlab.serve`` logger). :func:`generation_error` turns a failed
or server-cancelled choice into the error its request answers with.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerlab.serve import responses
from steerlab.serve.protocol import ErrorBody
from steerlab.serve.requests import Completion, Event

log = logging.getLogger("steerlab.serve")

#: The error statuses the ``/v1`` routes document (FastAPI's ``responses=``).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what} for code, what in (
        (400, "a valid body the server will not run (unknown controller, limits, ...)"),
        (401, "missing or wrong bearer token"),
        (404, "unknown model"),
        (413, "request body too large"),
        (422, "the body fails schema validation"),
        (429, "the waiting queue is full"),
        (500, "generation failed"),
        (503, "the server is shutting down"),
    )}


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def response(self) -> JSONResponse:
        """The JSON response that answers this error."""
        return JSONResponse(responses.error_body(self.message, type=self.type, param=self.param,
                                                 code=self.code), status_code=self.status)


def generation_error(results: Sequence[Completion | Event]) -> APIError | None:
    """The error to answer with when a choice failed or was cancelled by the server."""
    for r in results:
        if r.finish_reason == "error":
            return APIError(500, r.error or "generation failed", type="server_error",
                            code="generation_failed")
        if r.finish_reason == "cancelled":
            return APIError(503, r.error or "the request was cancelled", type="server_error",
                            code="cancelled")
    return None


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    """An :class:`APIError` raised by a route: its own response."""
    return exc.response()


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that fails schema validation: 422, naming the first five problems."""
    errors = exc.errors()
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    first = errors[0] if errors else {}
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    return APIError(422, "invalid request: " + "; ".join(parts), param=param,
                    code="validation_error").response()


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's HTTP errors (unknown route, wrong method, unparsable body) in OpenAI's
    shape, keeping their headers."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message, code = str(exc.detail or ""), None
    cause = exc.__cause__
    if exc.status_code == 400 and cause is not None:  # FastAPI could not parse the body
        code = "invalid_body"
        if isinstance(cause, RecursionError):
            message = ("the request body nests JSON arrays or objects too deeply to be "
                       "parsed; send a flatter body")
        else:
            message = (f"the request body could not be parsed as JSON "
                       f"({type(cause).__name__}: {cause})"[:500])
    if not message.strip():
        try:
            message = http.HTTPStatus(exc.status_code).phrase
        except ValueError:
            message = f"HTTP error {exc.status_code}"
    response = APIError(exc.status_code, message, type=kind, code=code).response()
    for name, value in (exc.headers or {}).items():  # e.g. Allow on a 405
        response.headers[name] = value
    return response


async def crash(request: Request, exc: Exception) -> JSONResponse:
    """Any other exception: logged with its traceback, answered 500 with its type only."""
    log.exception({"event": "error", "path": request.url.path})
    return APIError(500, f"internal error: {type(exc).__name__}",
                    type="server_error").response()


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in OpenAI's shape."""
    app.exception_handler(APIError)(api_error)
    app.exception_handler(RequestValidationError)(validation_error)
    app.exception_handler(StarletteHTTPException)(http_error)
    app.exception_handler(Exception)(crash)
