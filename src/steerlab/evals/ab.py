"""Multiple-choice scoring under steering, batched.

* :func:`ab_scores` / :func:`ab_match_probability`: two-choice A/B items (CAA's behaviour
  sets, MMLU recast as A/B): the next-token probabilities of ``A`` and ``B`` after the
  rendered prompt followed by ``(``.
* :func:`completion_logprobs`: the total log-probability of completions given prompts
  (TruthfulQA's MC1/MC2 scoring), many completions per forward pass.

Both pad on the right: a causal model's outputs at a row's real tokens do not depend on the
padding after them, so batching changes nothing (tested against one item at a time).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steerlab.data import ContrastiveSet, Renderer
from steerlab.errors import DataError
from steerlab.models import LoadedModel
from steerlab.runtime import Steer, steering


def _letter(text: str) -> str:
    s = text.strip().lstrip("(").strip()
    if not s or not ("A" <= s[0] <= "Z"):
        raise DataError(f"expected a lettered answer such as '(A)', got {text!r}")
    return s[0]


@dataclass(frozen=True)
class ABScores:
    """Per-item letter probabilities of a multiple-choice set, in the set's order.

    ``p_match[i] = P(pos) / (P(pos) + P(neg))``, where ``pos``/``neg`` are the letters of
    item ``i``'s positive and negative answers (the behaviour-matching and not-matching ones,
    or the correct and incorrect ones); ``p_a[i] = P(A) / (P(A) + P(B))`` whatever the
    item's letters (a letter-bias measure). ``wants[i]`` is the positive letter. Almost
    every item is lettered A/B; a few of CAA's survival-instinct items pair e.g. ``(C)``
    with ``(A)``, and are scored on their own two letters.
    """

    p_match: list[float]
    p_a: list[float]
    wants: list[str]

    def __len__(self) -> int:
        return len(self.wants)


def ab_scores(lm: LoadedModel, data: ContrastiveSet,
              steers: Steer | Sequence[Steer] | None = None, *,
              renderer: Renderer | None = None, batch_size: int = 16) -> ABScores:
    """Letter probabilities of every item of ``data`` (see :class:`ABScores`) at the answer
    position: the rendered prompt followed by ``(`` (CAA's A/B evaluation), under
    ``steers``. Scored in batches of ``batch_size`` prompts of similar length (sorted by
    token count, so padding stays short), right-padded; results in the order of ``data``."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    renderer = renderer or Renderer(lm.tokenizer)
    tok = lm.tokenizer
    letter_ids: dict[str, int] = {}

    def token(letter: str) -> int:
        if letter not in letter_ids:
            ids = tok.encode(letter, add_special_tokens=False)
            if len(ids) != 1:
                raise DataError(f"the tokenizer does not encode {letter!r} as a single token")
            letter_ids[letter] = ids[0]
        return letter_ids[letter]

    a_id, b_id = token("A"), token("B")
    add_special = renderer.mode != "chat"
    sep = "" if renderer.mode == "chat" else " "
    texts, wants, pos_ids, neg_ids = [], [], [], []
    for pair in data:
        want, other = _letter(pair.positive), _letter(pair.negative)
        if want == other:
            raise DataError(f"both answers of {pair.prompt[:60]!r} are ({want})")
        wants.append(want)
        pos_ids.append(token(want))
        neg_ids.append(token(other))
        texts.append(renderer.prompt(pair.prompt) + sep + "(")
    if not texts:
        raise DataError("no A/B pairs to evaluate")
    p_match: list[float] = [0.0] * len(texts)
    p_a: list[float] = [0.0] * len(texts)
    lengths = [len(tok(t, add_special_tokens=add_special)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda j: lengths[j])
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([texts[j] for j in idx], add_special_tokens=add_special, padding=True,
                  padding_side="right", return_tensors="pt")
        mask = enc["attention_mask"].to(lm.device)
        with torch.no_grad(), steering(lm, steers):
            logits = lm.model(input_ids=enc["input_ids"].to(lm.device),
                              attention_mask=mask, use_cache=False).logits
        last = mask.sum(dim=1) - 1
        rows = logits[torch.arange(logits.shape[0], device=logits.device), last].float()
        pos = torch.tensor([pos_ids[j] for j in idx], device=rows.device)
        neg = torch.tensor([neg_ids[j] for j in idx], device=rows.device)
        duo = torch.stack([rows.gather(1, pos[:, None])[:, 0],
                           rows.gather(1, neg[:, None])[:, 0]], dim=1)
        two = torch.softmax(rows[:, [a_id, b_id]], dim=-1)
        for k, (pm, pa) in enumerate(zip(torch.softmax(duo, dim=-1)[:, 0].cpu(),
                                         two[:, 0].cpu(), strict=True)):
            p_match[idx[k]], p_a[idx[k]] = float(pm), float(pa)
    return ABScores(p_match, p_a, wants)


def ab_match_probability(lm: LoadedModel, data: ContrastiveSet,
                         steers: Steer | Sequence[Steer] | None = None, *,
                         renderer: Renderer | None = None, batch_size: int = 16) -> float:
    """Mean over pairs of P(positive letter) / (P(A) + P(B)) at the answer position: the
    rendered prompt followed by ``(`` (CAA's evaluation of A/B behaviour sets). An item
    lettered otherwise (e.g. ``(C)`` vs ``(A)``) is normalised over its own two letters.

    Scored in batches of ``batch_size`` prompts, right-padded: a causal model's logits at a
    row's last real token do not depend on the padding after it, so batching changes nothing
    (tested against one prompt at a time)."""
    scores = ab_scores(lm, data, steers, renderer=renderer, batch_size=batch_size)
    total = 0.0
    for p in scores.p_match:
        total += p
    return total / len(scores)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def completion_logprobs(lm: LoadedModel, prompts: Sequence[str], completions: Sequence[str],
                        steers: Steer | Sequence[Steer] | None = None, *,
                        batch_size: int = 16, add_special_tokens: bool = True) -> list[float]:
    """``log P(completion | prompt)`` for each (prompt, completion), summed over the
    completion's tokens, under ``steers``.

    The text ``prompt + completion`` is tokenized whole; the completion's tokens are those
    after the longest common prefix of its tokens and the prompt's own tokens (so a
    tokenizer that merges across the boundary still scores every completion token once).
    Rows are sorted by length and scored ``batch_size`` at a time, right-padded; the steering
    runtime is told each row's prompt length, so a scope such as ``last`` or ``generated``
    treats the completion as generated tokens, as if the model had produced it.

    Raises :class:`DataError` for mismatched or empty inputs, or a completion that adds no
    token to its prompt.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if len(prompts) != len(completions) or not prompts:
        raise DataError(f"give as many completions as prompts, at least one "
                        f"({len(prompts)} prompts, {len(completions)} completions)")
    tok = lm.tokenizer
    rows: list[tuple[list[int], int]] = []
    for p, c in zip(prompts, completions, strict=True):
        p_ids = list(tok(p, add_special_tokens=add_special_tokens)["input_ids"])
        f_ids = list(tok(p + c, add_special_tokens=add_special_tokens)["input_ids"])
        n = _common_prefix(p_ids, f_ids)
        if n == 0:
            raise DataError(f"prompt {p[:60]!r} has no token of its own to condition on")
        if n >= len(f_ids):
            raise DataError(f"completion {c!r} adds no token to prompt {p[:60]!r}")
        rows.append((f_ids, n))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = max(len(rows[i][0]) for i in idx)
        ids = torch.full((len(idx), length), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        target = torch.zeros((len(idx), length - 1), dtype=torch.bool)
        for r, i in enumerate(idx):
            f_ids, n = rows[i]
            ids[r, :len(f_ids)] = torch.tensor(f_ids)
            mask[r, :len(f_ids)] = 1
            target[r, n - 1:len(f_ids) - 1] = True  # position t predicts token t + 1
        ids, mask, target = ids.to(lm.device), mask.to(lm.device), target.to(lm.device)
        with torch.no_grad(), steering(lm, steers, prompt_len=[rows[i][1] for i in idx]):
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        picked = logits[:, :-1][target].float()  # (tokens, vocab): only the scored positions
        lp = torch.log_softmax(picked, dim=-1).gather(1, ids[:, 1:][target][:, None])[:, 0]
        row_of = torch.arange(len(idx), device=lm.device)[:, None].expand_as(target)[target]
        sums = torch.zeros(len(idx), dtype=torch.float64, device=lm.device)
        sums.index_add_(0, row_of, lp.double())
        for r, i in enumerate(idx):
            out[i] = float(sums[r])
    return out
