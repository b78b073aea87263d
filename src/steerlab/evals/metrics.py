"""Metrics for steered text: a behaviour judge and a fluency measure.

* :func:`vader_compound`: VADER's compound sentiment score in [-1, 1] per text (Hutto and
  Gilbert, ICWSM 2014), an offline rule-based sentiment judge.
* :func:`conditional_perplexity`: perplexity of completions given their prompts under a
  model (normally the *unsteered* model), exp of the mean negative log-likelihood over all
  completion tokens. A steered answer that stays fluent keeps this close to the unsteered
  answers' value.
* :func:`next_token_kl`: mean KL of the next-token distributions, steered vs unsteered.

``sentiment_sweep`` moved to :mod:`steerlab.evals.compare` (built on the generation tasks);
it is still importable from here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from steerlab.data import Renderer
from steerlab.errors import DataError, ModelLoadError
from steerlab.models import LoadedModel

if TYPE_CHECKING:
    from steerlab.runtime import Steer


@functools.cache
def _vader() -> Any:
    """The one VADER analyzer of the process (its lexicon is read once, on first use)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ModelLoadError("the sentiment judge needs the vaderSentiment package "
                             "(pip install vaderSentiment)") from exc
    return SentimentIntensityAnalyzer()


def vader_compound(texts: Sequence[str]) -> list[float]:
    """VADER compound score of each text, in [-1, 1]: the only place steerlab calls VADER."""
    if isinstance(texts, str):
        raise DataError("give a list of texts, not a single string")
    analyzer = _vader()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def conditional_perplexity(
    lm: LoadedModel,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    renderer: Renderer | None = None,
    batch_size: int = 8,
) -> float:
    """Perplexity of ``completions`` given rendered ``prompts`` (token-weighted)."""
    if len(prompts) != len(completions) or not prompts:
        raise DataError("give as many completions as prompts, at least one")
    renderer = renderer or Renderer(lm.tokenizer)
    tok = lm.tokenizer
    add_special = renderer.mode != "chat"
    total, count = 0.0, 0
    rows: list[tuple[list[int], int]] = []
    for p, c in zip(prompts, completions, strict=True):
        prompt_text = renderer.prompt(p)
        n_prompt = len(tok(prompt_text, add_special_tokens=add_special)["input_ids"])
        ids = tok(prompt_text + c, add_special_tokens=add_special)["input_ids"]
        if len(ids) > n_prompt:
            rows.append((list(ids), n_prompt))
    if not rows:
        raise DataError("every completion is empty; nothing to score")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        length = max(len(ids) for ids, _ in chunk)
        ids_t = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        target = torch.zeros((len(chunk), length), dtype=torch.bool)
        for r, (ids, n_prompt) in enumerate(chunk):
            off = length - len(ids)
            ids_t[r, off:] = torch.tensor(ids)
            mask[r, off:] = 1
            target[r, off + n_prompt :] = True
        with torch.no_grad():
            logits = lm.model(input_ids=ids_t.to(lm.device),
                              attention_mask=mask.to(lm.device)).logits.float().cpu()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(2, ids_t[:, 1:, None])[..., 0]
        sel = target[:, 1:]
        total += float(nll[sel].sum())
        count += int(sel.sum())
    return math.exp(total / count)


def next_token_kl(
    lm: LoadedModel,
    texts: Sequence[str],
    steers: Steer | Sequence[Steer] | None,
    *,
    batch_size: int = 8,
    render: bool = False,
) -> float:
    """Mean KL(p_unsteered ‖ p_steered) of the next-token distributions over every real token
    position of ``texts`` (a fluency cost that needs no generation: 0 when steering changes
    nothing). Texts are read as they are unless ``render`` applies the chat template to them
    as user prompts. Batched with right padding (positions after a row's end are ignored)."""
    from steerlab.runtime import steering

    if not texts:
        raise DataError("give at least one text")
    tok = lm.tokenizer
    renderer = Renderer(tok)
    rows = [renderer.prompt(t) for t in texts] if render else list(texts)
    add_special = not (render and renderer.mode == "chat")
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        enc = tok(rows[start:start + batch_size], add_special_tokens=add_special,
                  padding=True, padding_side="right", return_tensors="pt")
        ids = enc["input_ids"].to(lm.device)
        mask = enc["attention_mask"].to(lm.device)
        with torch.no_grad():
            base = lm.model(input_ids=ids, attention_mask=mask).logits.float()
            with steering(lm, steers):
                steered = lm.model(input_ids=ids, attention_mask=mask).logits.float()
        lp, lq = torch.log_softmax(base, -1), torch.log_softmax(steered, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        sel = mask.bool()
        total += float(kl[sel].sum())
        count += int(sel.sum())
    return total / count


def __getattr__(name: str) -> Any:
    """``sentiment_sweep``, re-exported from :mod:`steerlab.evals.compare` on first use (a
    lazy import: compare is built on the tasks, which import this module)."""
    if name == "sentiment_sweep":
        from steerlab.evals.compare import sentiment_sweep

        return sentiment_sweep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
