"""lm-evaluation-harness on a steered model, in process: the ``steerlab`` lm-eval model.

``python -m steerlab.lm_eval --model steerlab --model_args
model=smollm2-135m,steer=ART,strength=S,scope=all --tasks ...`` is lm-eval's own command line
(``lm_eval``) with this model registered in lm-eval's model registry (``register_model``).
lm-eval 0.4 discovers models only from its built-in table, not from plugin entry points, so
the plain ``lm_eval`` command cannot see it; in Python, ``import steerlab.lm_eval`` before
``lm_eval.simple_evaluate(model="steerlab", ...)`` does the same.

Model arguments: ``model`` (an embedded name, folder or .gguf; default ``smollm2-135m``),
``steer`` (artifact paths separated by ``+``; none: the unsteered model), ``strength`` (one
per artifact, ``+``-separated, or one for all; default each artifact's ``--auto`` strength,
else 1), ``scope`` (overrides the artifacts' default scopes), ``batch_size`` (default 8),
``max_length`` (default the model's context).

Semantics. Every request is scored or generated under the same steering as
:func:`steerlab.runtime.generate` would apply: the runtime is told each row's prompt length
(the context), so a scope such as ``last`` or ``from:-1`` steers the continuation's tokens
(and the last context token), ``all`` every token. Log-likelihoods are the sum of the
continuation tokens' log-probabilities given the context tokens, tokenised as lm-eval's
``HFLM`` does (context and continuation encoded separately, the context's trailing
whitespace moved onto the continuation), with the tokenizer's special tokens; rolling
log-likelihoods score the whole text after a BOS (or the first token). Unsteered, they equal
transformers' own to float precision (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them
import torch  # lazily only while it is empty, so registering ours first would hide them)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from steerlab import artifacts
from steerlab.errors import SteerlabError


def _split(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    return [v for v in str(value).split("+") if v]


@register_model("steerlab")
class SteerlabLM(LM):
    """An lm-eval ``LM`` backed by steerlab's model loading and steering runtime."""

    def __init__(self, model: str = "smollm2-135m", steer: str | None = None,
                 strength: Any = None, scope: str | None = None, batch_size: Any = 8,
                 max_length: Any = None, **_: Any) -> None:
        super().__init__()
        from steerlab.autotune import stored_strength
        from steerlab.models import load_model
        from steerlab.runtime import Steer
        from steerlab.scope import parse_scope

        self.lm = load_model(str(model))
        if scope is not None:
            parse_scope(str(scope))
        paths = _split(steer)
        controllers = [artifacts.load(p, self.lm.info) for p in paths]
        given = [float(s) for s in _split(strength)]
        if given and len(given) not in (1, len(controllers)):
            raise SteerlabError(f"give one strength per artifact ({len(controllers)}) or one "
                                f"for all, got {len(given)}")
        strengths = (given * len(controllers) if len(given) == 1 else given) or \
            [stored_strength(c) or 1.0 for c in controllers]
        for s in strengths:
            if not math.isfinite(s):
                raise SteerlabError(f"strength must be finite, got {s}")
        self.steers = [Steer(c, s, scope) for c, s in zip(controllers, strengths, strict=True)]
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 8
        config = self.lm.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_length = int(max_length) if max_length else int(
            getattr(text, "max_position_embeddings", 2048) or 2048)
        tok = self.lm.tokenizer
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    # -- tokenisation, as lm-eval's HFLM ------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx):]

    # -- scoring --------------------------------------------------------------------------------
    def _score(self, rows: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether it is the greedy continuation,
        for (context ids, continuation ids) rows, batched with left padding."""
        from steerlab.runtime import steering

        lm = self.lm
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        out: list[tuple[float, bool]] = []
        for start in range(0, len(rows), self.batch_size_per_gpu):
            chunk = []
            for ctx, cont in rows[start:start + self.batch_size_per_gpu]:
                ctx = ctx or [self.prefix_id]
                ids = (ctx + cont)[-(self.max_length + 1):]
                n_cont = min(len(cont), len(ids) - 1)
                chunk.append((ids, n_cont))
            width = max(len(ids) - 1 for ids, _ in chunk)
            inp = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (ids, _) in enumerate(chunk):
                x = ids[:-1]
                inp[r, width - len(x):] = torch.tensor(x)
                mask[r, width - len(x):] = 1
            prompt_len = [len(ids) - n for ids, n in chunk]
            with torch.no_grad():
                kw = {"input_ids": inp.to(lm.device), "attention_mask": mask.to(lm.device)}
                if self.steers:
                    with steering(lm, self.steers, prompt_len=prompt_len):
                        logits = lm.model(**kw).logits
                else:
                    logits = lm.model(**kw).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for r, (ids, n_cont) in enumerate(chunk):
                target = torch.tensor(ids[-n_cont:]) if n_cont else torch.zeros(0, dtype=torch.long)
                rows_lp = logp[r, width - n_cont:] if n_cont else logp[r, :0]
                lp = rows_lp.gather(1, target[:, None])[:, 0]
                greedy = bool((rows_lp.argmax(-1) == target).all())
                out.append((float(lp.sum()), greedy))
        return out

    def loglikelihood(self, requests: list[Any],
                      disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = [self._encode_pair(*r.args) for r in requests]
        return self._score(rows)

    def loglikelihood_rolling(self, requests: list[Any],
                              disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            ids = self._encode(r.args[0])
            total = 0.0
            step = self.max_length
            for start in range(0, len(ids), step):
                window = ids[start:start + step]
                ctx = ids[max(0, start - 1):start] if start else [self.prefix_id]
                total += self._score([(ctx, window)])[0][0]
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from steerlab.runtime import generate

        out = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 64))
            text = generate(self.lm, [context], steers=self.steers or None,
                            max_new_tokens=max_new, render=False)[0]
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out

    @property
    def tokenizer_name(self) -> str:
        return self.lm.info.model_id.replace("/", "__")


def main() -> None:
    """``python -m steerlab.lm_eval``: lm-eval's command line with ``steerlab`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
