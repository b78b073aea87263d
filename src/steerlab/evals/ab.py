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
                         renderer: Renderer | None = None) -> float:
    """Mean over pairs of P(positive letter) / (P(A) + P(B)) at the answer position: the
    rendered prompt followed by ``(`` (CAA's evaluation of A/B behaviour sets)."""
    renderer = renderer or Renderer(lm.tokenizer)
    tok = lm.tokenizer
    ids_ab = [tok.encode(x, add_special_tokens=False) for x in ("A", "B")]
    if any(len(i) != 1 for i in ids_ab):
        raise DataError("the tokenizer does not encode 'A' and 'B' as single tokens")
    a_id, b_id = ids_ab[0][0], ids_ab[1][0]
    total = 0.0
    n = 0
    add_special = renderer.mode != "chat"
    for pair in data:
        want = _letter(pair.positive)
        sep = "" if renderer.mode == "chat" else " "
        text = renderer.prompt(pair.prompt) + sep + "("
        ids = tok(text, add_special_tokens=add_special, return_tensors="pt")["input_ids"]
        with torch.no_grad(), steering(lm, steers):
            logits = lm.model(input_ids=ids.to(lm.device), use_cache=False).logits[0, -1]
        two = torch.softmax(logits[[a_id, b_id]].float(), dim=0)
        total += float(two[0] if want == "A" else two[1])
        n += 1
    if n == 0:
        raise DataError("no A/B pairs to evaluate")
    return total / n
