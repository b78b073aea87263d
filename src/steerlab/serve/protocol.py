"""Request bodies of the OpenAI-compatible endpoints (pydantic), with steerlab's extension.

Fields the OpenAI API defines and steerlab does not implement (penalties, tools, ``best_of``,
``suffix``, ...) are accepted only at their neutral values; anything else is refused
with a 400 that names the field, rather than silently ignored. Unknown fields are refused
too (a misspelt ``steering`` must not fall back to unsteered generation without a word).
Types are strict (pydantic strict mode): ``"max_tokens": "5"``, ``true`` or ``5.0`` is a 422,
not a coerced 5; an integer is accepted where a number is expected.

Validation runs on the event loop, so its cost must stay small for any body under the size
limit: lists of objects have length caps (``MAX_MESSAGES``, ``MAX_STEERING``, ``MAX_PARTS``
per message and ``MAX_TOTAL_PARTS`` per request) checked before their items are validated,
and ``prompt`` is checked by one linear pass that stops at the first bad item (pydantic's
union of four list types would report every item of every branch: seconds for 200,000
floats).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator
from pydantic_core import PydanticCustomError

from steerlab.serve.registry import SteeringSpec

Strength = Annotated[float, Field(allow_inf_nan=False)]
MAX_MESSAGES = 2048  # messages of one chat request
MAX_STEERING = 256  # entries of one steering list (the server's own bound is lower: 400)
MAX_PARTS = 256  # text parts of one message
MAX_TOTAL_PARTS = 4096  # text parts of all the messages of one request
StopText = Annotated[str, Field(min_length=1, max_length=200)]
MAX_LOGPROBS = 20  # alternatives per token (logprobs, top_logprobs): vLLM's and OpenAI chat's

_PROMPT_KINDS = "a string, a list of strings, a list of token ids or a list of such lists"


def _bad_prompt(what: str) -> PydanticCustomError:
    return PydanticCustomError("prompt_type", "prompt must be {kinds}: {what}",
                               {"kinds": _PROMPT_KINDS, "what": what})


def _is_id(x: Any) -> bool:
    return type(x) is int  # strict: not a bool, not a float


def _check_prompt(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    """``str | list[str] | list[int] | list[list[int]]``, strictly, in one pass."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad_prompt(f"got {type(value).__name__}")
    if not value:
        return value
    first = value[0]
    if isinstance(first, str):
        ok, kind = (lambda x: isinstance(x, str)), "a string"
    elif _is_id(first):
        ok, kind = _is_id, "a token id (an integer)"
    elif isinstance(first, list):
        ok, kind = ((lambda x: isinstance(x, list) and all(map(_is_id, x))),
                    "a list of token ids (integers)")
    else:
        raise _bad_prompt(f"prompt[0] is a {type(first).__name__}")
    for i, x in enumerate(value):
        if not ok(x):
            raise _bad_prompt(f"prompt[{i}] is not {kind} like prompt[0]")
    return value


Prompt = Annotated[str | list[str] | list[int] | list[list[int]], PlainValidator(
    _check_prompt, json_schema_input_type=str | list[str] | list[int] | list[list[int]])]


class Steering(BaseModel):
    """``{"controller": "positive", "strength": 4.0, "scope": "all"}``; strength and scope
    default to the controller's (see ``GET /v1/steering``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    controller: Annotated[str, Field(min_length=1, max_length=200)]
    strength: Strength | None = None
    scope: Annotated[str, Field(max_length=40)] | None = None

    def spec(self) -> SteeringSpec:
        return SteeringSpec(self.controller, self.strength, self.scope)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[str, Field(max_length=500)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Any] | None = None  # unsupported: refused unless empty
    user: str | None = None
    steering: Annotated[list[Steering], Field(max_length=MAX_STEERING)] | None = None
    ignore_eos: bool = False  # vLLM's extension, for load tests

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def unsupported(self) -> list[str]:
        """Fields set to values steerlab does not implement."""
        bad = []
        if self.presence_penalty:
            bad.append("presence_penalty")
        if self.frequency_penalty:
            bad.append("frequency_penalty")
        if self.logit_bias:
            bad.append("logit_bias")
        return bad

    def steering_specs(self) -> list[SteeringSpec]:
        return [s.spec() for s in self.steering or []]


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0: with echo only (score the prompt)
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.best_of not in (None, 1):
            bad.append("best_of")
        if self.suffix:
            bad.append("suffix")
        return bad


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_PARTS)] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]


class ChatRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _few_parts(cls, data: Any) -> Any:
        """Count the messages' text parts before validating any (a cheap pass)."""
        messages = data.get("messages") if isinstance(data, dict) else None
        if isinstance(messages, list) and len(messages) <= MAX_MESSAGES:
            parts = sum(len(m["content"]) for m in messages
                        if isinstance(m, dict) and isinstance(m.get("content"), list))
            if parts > MAX_TOTAL_PARTS:
                raise PydanticCustomError(
                    "too_many_parts", "messages hold {parts} text parts; at most {limit} per "
                    "request", {"parts": parts, "limit": MAX_TOTAL_PARTS})
        return data

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.tools:
            bad.append("tools")
        if self.tool_choice not in (None, "none"):
            bad.append("tool_choice")
        return bad

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape, as every error response carries it."""

    error: ErrorDetail
