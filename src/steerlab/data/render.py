"""Rendering a (prompt, completion) into the text a model reads.

:class:`Renderer` uses the tokenizer's chat template for chat models (``add_special_tokens=False``
when tokenizing, since the template writes BOS) and CAA's plain format
``"Input: {prompt}\\nResponse:"`` (:data:`PLAIN_TEMPLATE`) for base models, the completion
joined with one space.
"""

from __future__ import annotations

from typing import Any, Literal

from steerlab.errors import DataError

__all__ = ["PLAIN_TEMPLATE", "RenderMode", "Renderer"]

RenderMode = Literal["auto", "chat", "plain"]

PLAIN_TEMPLATE = "Input: {prompt}\nResponse:"
"""CAA's prompt format for base (non-chat) models."""


class Renderer:
    """Turns (prompt, completion) into model text.

    ``mode="chat"`` uses the tokenizer's chat template (``apply_chat_template`` with
    ``add_generation_prompt=True, tokenize=False``; optional system message); ``mode="plain"``
    uses CAA's base-model format ``"Input: {prompt}\\nResponse:"`` and the completion is
    appended after one space; ``mode="auto"`` picks chat when ``tokenizer.chat_template`` is set.

    If a system message is given but the template rejects the system role (Gemma's raises), the
    system message is prepended to the user message instead. In plain mode it is put before the
    ``Input:`` line, followed by a blank line.

    Chat-rendered text already holds whatever special tokens the template writes (a BOS token,
    for many), so it should be tokenized with ``add_special_tokens=False``; see
    :attr:`add_special_tokens`.
    """

    def __init__(
        self, tokenizer: Any, mode: RenderMode = "auto", system: str | None = None
    ) -> None:
        if mode not in ("auto", "chat", "plain"):
            raise DataError(f"render mode must be 'auto', 'chat' or 'plain', got {mode!r}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if mode == "chat" and not has_template:
            raise DataError(
                "render mode 'chat' needs a tokenizer with a chat template, and this one has "
                "none; use mode='plain' (or 'auto') for base models"
            )
        self.tokenizer = tokenizer
        self.system = system
        self._mode: Literal["chat", "plain"] = (
            "chat" if mode == "chat" or (mode == "auto" and has_template) else "plain"
        )
        # None until a system message has been tried; then whether it must go in the user turn.
        self._system_in_user: bool | None = None

    @property
    def mode(self) -> Literal["chat", "plain"]:
        """The resolved mode: ``"chat"`` or ``"plain"``."""
        return self._mode

    @property
    def add_special_tokens(self) -> bool:
        """Whether to let the tokenizer add its special tokens when encoding rendered text.

        ``False`` in chat mode (the template writes them), ``True`` in plain mode.
        """
        return self._mode == "plain"

    def __repr__(self) -> str:
        return f"Renderer(mode={self._mode!r}, system={self.system!r})"

    def _apply(self, messages: list[dict[str, str]]) -> str:
        out = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        if not isinstance(out, str):
            raise DataError(
                f"the tokenizer's apply_chat_template returned {type(out).__name__}, not text"
            )
        return out

    def prompt(self, prompt: str) -> str:
        """Rendered text that generation continues from."""
        if self._mode == "plain":
            text = PLAIN_TEMPLATE.format(prompt=prompt)
            return f"{self.system}\n\n{text}" if self.system else text
        if not self.system:
            return self._apply([{"role": "user", "content": prompt}])
        merged = [{"role": "user", "content": f"{self.system}\n\n{prompt}"}]
        if self._system_in_user:
            return self._apply(merged)
        try:
            text = self._apply(
                [{"role": "system", "content": self.system}, {"role": "user", "content": prompt}]
            )
        except Exception:
            # Templates without a system role raise (jinja2 TemplateError from
            # raise_exception, or similar); fall back to putting it in the user turn.
            text = self._apply(merged)
            self._system_in_user = True
        else:
            self._system_in_user = False
        return text

    def full(self, prompt: str, completion: str) -> str:
        """The prompt rendered with its completion appended (after one space in plain mode)."""
        if self._mode == "plain":
            return f"{self.prompt(prompt)} {completion}"
        return self.prompt(prompt) + completion

