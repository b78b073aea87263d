"""OpenAI-shaped response bodies and stream chunks (plain dicts, serialised by the app)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from steerlab.serve.requests import Completion, TokenLogprob

Kind = Literal["completion", "chat"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: Sequence[TokenLogprob], text: Mapping[int, str],
                        offset: int = 0) -> dict[str, Any]:
    """The legacy completions layout: ``tokens``, ``token_logprobs``, ``top_logprobs`` (a dict
    token -> logprob of the top alternatives and the chosen token, ``None`` where the token has
    no log-probability: a prompt's first) and ``text_offset`` (from ``offset``: cumulative
    lengths of the token strings)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for e in entries:
        s = text[e.token]
        tokens.append(s)
        values.append(e.logprob)
        offsets.append(offset)
        offset += len(s)
        if e.logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for t, v in e.top:  # most likely first: a string two ids share keeps the higher value
            top.setdefault(text[t], v)
        top.setdefault(s, e.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], text: Mapping[int, str],
                  raw: Mapping[int, list[int]] | None = None) -> dict[str, Any]:
    """The chat layout: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``
    (``raw``: each token's bytes, when its text is not all of them)."""
    def item(token: int, value: float | None) -> dict[str, Any]:
        s = text[token]
        b = raw[token] if raw is not None and token in raw else list(s.encode("utf-8"))
        return {"token": s, "logprob": value, "bytes": b}

    return {"content": [{**item(e.token, e.logprob),
                         "top_logprobs": [item(t, v) for t, v in e.top]} for e in entries],
            "refusal": None}


def full_response(kind: Kind, rid: str, created: int, model: str,
                  results: Sequence[Completion], prompt_tokens: int,
                  steering: list[dict[str, Any]], *, texts: Sequence[str] | None = None,
                  logprobs: Sequence[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """The non-streamed body: one choice per result, in order (``texts``: each choice's text
    when it is not the result's own, e.g. with the prompt echoed; ``logprobs``: each
    choice's log-probabilities, already laid out)."""
    choices: list[dict[str, Any]] = []
    for i, r in enumerate(results):
        text = texts[i] if texts is not None else r.text
        lp = logprobs[i] if logprobs is not None else None
        if kind == "chat":
            choices.append({"index": i, "finish_reason": r.finish_reason, "logprobs": lp,
                            "message": {"role": "assistant", "content": text}})
        else:
            choices.append({"index": i, "finish_reason": r.finish_reason, "logprobs": lp,
                            "text": text})
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
          finish_reason: str | None = None, role: bool = False,
          logprobs: dict[str, Any] | None = None,
          steering: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One stream chunk for one choice (``steering``: the resolved steering, which the first
    chunk of a stream carries, as the non-streamed body does)."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if role else (
            {"content": text} if text else {})
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason,
                                  "logprobs": logprobs}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text, "finish_reason": finish_reason,
                  "logprobs": logprobs}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if steering is not None:
        out["steering"] = steering
    return out


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
