"""Multiple-choice behaviour: the probability a steered model gives the matching A/B answer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steerlab.data import ContrastiveSet, Renderer
from steerlab.errors import DataError
from steerlab.models import LoadedModel
from steerlab.runtime import Steer, steering


def _letter(text: str) -> str:
    s = text.strip().lstrip("(").strip()
    if not s or s[0] not in "AB":
        raise DataError(f"expected an A/B answer such as '(A)', got {text!r}")
    return s[0]


def ab_match_probability(lm: LoadedModel, data: ContrastiveSet,
                         steers: Steer | Sequence[Steer] | None = None, *,
                         renderer: Renderer | None = None, batch_size: int = 16) -> float:
    """Mean over pairs of P(positive letter) / (P(A) + P(B)) at the answer position: the
    rendered prompt followed by ``(`` (CAA's evaluation of A/B behaviour sets).

    Scored in batches of ``batch_size`` prompts, right-padded: a causal model's logits at a
    row's last real token do not depend on the padding after it, so batching changes nothing
    (tested against one prompt at a time)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    renderer = renderer or Renderer(lm.tokenizer)
    tok = lm.tokenizer
    ids_ab = [tok.encode(x, add_special_tokens=False) for x in ("A", "B")]
    if any(len(i) != 1 for i in ids_ab):
        raise DataError("the tokenizer does not encode 'A' and 'B' as single tokens")
    a_id, b_id = ids_ab[0][0], ids_ab[1][0]
    add_special = renderer.mode != "chat"
    sep = "" if renderer.mode == "chat" else " "
    texts, wants = [], []
    for pair in data:
        wants.append(_letter(pair.positive))
        texts.append(renderer.prompt(pair.prompt) + sep + "(")
    if not texts:
        raise DataError("no A/B pairs to evaluate")
    total = 0.0
    old_side = tok.padding_side
    tok.padding_side = "right"
    try:
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], add_special_tokens=add_special, padding=True,
                      return_tensors="pt")
            mask = enc["attention_mask"].to(lm.device)
            with torch.no_grad(), steering(lm, steers):
                logits = lm.model(input_ids=enc["input_ids"].to(lm.device),
                                  attention_mask=mask, use_cache=False).logits
            last = mask.sum(dim=1) - 1
            rows = logits[torch.arange(logits.shape[0], device=logits.device), last]
            two = torch.softmax(rows[:, [a_id, b_id]].float(), dim=-1)
            for j, want in enumerate(wants[i:i + batch_size]):
                total += float(two[j, 0] if want == "A" else two[j, 1])
    finally:
        tok.padding_side = old_side
    return total / len(texts)
