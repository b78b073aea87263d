"""OpenAI-shaped response bodies and stream chunks (plain dicts, serialised by the app)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from steerlab.serve.engine import Completion

Kind = Literal["completion", "chat"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(kind: Kind, rid: str, created: int, model: str,
                  results: Sequence[Completion], prompt_tokens: int,
                  steering: list[dict[str, Any]]) -> dict[str, Any]:
    """The non-streamed body: one choice per result, in order."""
    choices: list[dict[str, Any]] = []
    for i, r in enumerate(results):
        if kind == "chat":
            choices.append({"index": i, "finish_reason": r.finish_reason, "logprobs": None,
                            "message": {"role": "assistant", "content": r.text}})
        else:
            choices.append({"index": i, "finish_reason": r.finish_reason, "logprobs": None,
                            "text": r.text})
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, sum(r.completion_tokens for r in results)),
        "steering": steering,
    }


def chunk(kind: Kind, rid: str, created: int, model: str, index: int, *, text: str = "",
          finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
    """One stream chunk for one choice."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if role else (
            {"content": text} if text else {})
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason,
                                  "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: Kind, rid: str, created: int, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"
