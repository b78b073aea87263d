"""Calibrated defaults (``steerlab fit --auto``, ``fit_method(..., auto=True)``): the block,
scope and strength of any method, chosen on validation data drawn from its training data under
a fluency budget. One rule, one function, for every registered method.

**Data.** A seeded split of the training set (``val_fraction``, default 0.2, at least one
row): the controller is fitted on the rest, never on the validation rows, and nothing here
reads evaluation prompts.

**Objective** (``objective``; ``"auto"`` picks ``"generate"`` for a contrastive set of
free-text completions, ``"teacher"`` for labelled texts, A/B letters and ``recipe="ab"``):

* ``"generate"``: what the user will do with the controller. Greedy answers
  (``new_tokens``, default 32) to the validation prompts, steered as in generation.
  *Behaviour* is the mean :class:`steerlab.evals.judges.ContrastJudge` lean of the answers
  (MiniLM cosine to the centroid of the training part's positive completions minus that to
  its negative ones: the data's own judge, no task-specific one); the *change* is steered
  minus unsteered. *Fluency*: the perplexity of the answers given their prompts under the
  unsteered model, as a ratio to the unsteered answers' (the results pages' measure); a
  candidate is admissible when the ratio is at most ``budget`` (default 1.5) and no answer
  is degenerate (:func:`steerlab.evals.fluency.degenerate_fraction`).
* ``"teacher"``: teacher-forced on the validation rows, steering applied as in generation
  (the row's prompt length is given to the runtime, so scopes select the same tokens they
  would while generating). For a contrastive set, the mean over pairs of
  ``logp(positive completion) − logp(negative completion)`` (token-mean log-probabilities
  given the rendered prompt); for a labelled set, the mean token log-probability of the
  positive texts minus that of the negative texts; the change is steered minus unsteered.
  Fluency: the mean next-token KL(p_unsteered ‖ p_steered) over the same positions (every
  token predicted after the prompt), admissible when at most ``budget`` nats (default
  0.25). One pass per candidate, but a poor guide to free generation: on the built-in
  sentiment set it ranks CAA at block 18 from the prompt's end first (+0.43 nats, KL 0.19)
  where generation moves held-out VADER by −0.03 at ×1.14 perplexity, and block 10 on every
  position (+0.26 VADER at ×1.44) ninth of fourteen (block, scope) candidates
  (docs/results-peers.md), which is why free text is scored by generating.

**Search.** Block candidates: ``layers`` if given, else five blocks at 25, 33, 40, 50 and
60 % of the depth for methods that take a block (methods that steer every block, A-LQR and
S-PID, have one candidate). Scope candidates: the method's own default scope (its paper's,
``docs/strength.md``) and ``all`` (every position, prompt included, as steering-vectors and
repeng steer), unless ``scope`` is given, which is then the only one; a method whose scope is
fixed by its mode (positional ActAdd) keeps it. The scope changes nothing in the fit, so each
block is fitted once and measured under each scope. Per (block, scope), strengths
``start·2^i`` (i = 0 … ``max_doublings``) in each direction, stopping at the first one over
the budget (fluency degrades with |s|); the chosen (block, scope, strength) has the largest
change among admissible candidates, and the negative direction's best strength *at that
block and scope* is kept too. The controller of the chosen block is returned with the chosen
scope as its ``scope`` hyper-parameter (so artifacts, ``generate`` and the server use it),
and ``fit_info["auto"]`` holding the choice, the objective, the budget and every measured
point; ``steerlab generate`` uses ``auto.strength`` when no strength is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from steerlab.data import ContrastiveSet, LabeledSet, Renderer
from steerlab.errors import DataError
from steerlab.models import LoadedModel
from steerlab.scope import parse_scope

DEPTH_FRACTIONS = (0.25, 1 / 3, 0.4, 0.5, 0.6)
OBJECTIVES = ("auto", "generate", "teacher")
DEFAULT_BUDGET = {"generate": 1.5, "teacher": 0.25}
"""Fluency budget per objective: perplexity ratio, next-token KL in nats."""


@dataclass
class AutoChoice:
    """What :func:`auto_fit` chose and measured (stored as ``fit_info["auto"]``)."""

    layer: int | None
    scope: str
    strength: float
    strength_negative: float | None
    change: float
    change_negative: float | None
    objective: str
    fluency_metric: str
    fluency: float
    budget: float
    val_rows: int
    baseline_score: float
    points: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Rows:
    """Tokenised validation rows: ids, prompt length, class (+1 / −1), pair index."""

    ids: list[list[int]]
    prompt_len: list[int]
    sign: list[int]
    pair: list[int]
    contrastive: bool


def validation_split(data: ContrastiveSet | LabeledSet, val_fraction: float,
                     seed: int) -> tuple[Any, Any]:
    """(train, validation) parts: the set's own seeded split."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return data.split(test_fraction=val_fraction, seed=seed)


def _rows(lm: LoadedModel, data: ContrastiveSet | LabeledSet) -> _Rows:
    tok = lm.tokenizer
    if isinstance(data, LabeledSet):
        ids, plen, sign = [], [], []
        for t in data:
            x = list(tok(t.text, add_special_tokens=True)["input_ids"])
            if len(x) >= 2:
                ids.append(x)
                plen.append(1)
                sign.append(1 if t.label == 1 else -1)
        if 1 not in sign or -1 not in sign:
            raise DataError("the validation part needs texts of both classes")
        return _Rows(ids, plen, sign, list(range(len(ids))), contrastive=False)
    renderer = Renderer(tok)
    add_special = renderer.mode != "chat"
    sep = "" if renderer.mode == "chat" else " "
    out = _Rows([], [], [], [], contrastive=True)
    for i, p in enumerate(data):
        prompt = renderer.prompt(p.prompt)
        n = len(tok(prompt, add_special_tokens=add_special)["input_ids"])
        for completion, s in ((p.positive, 1), (p.negative, -1)):
            x = list(tok(prompt + sep + completion, add_special_tokens=add_special)["input_ids"])
            if len(x) > n:
                out.ids.append(x)
                out.prompt_len.append(n)
                out.sign.append(s)
                out.pair.append(i)
    if not out.ids:
        raise DataError("every validation completion is empty")
    return out


class _Scorer:
    """The ``"teacher"`` objective: unsteered log-probabilities cached once; each steered
    candidate is one pass more."""

    metric = "kl"

    def __init__(self, lm: LoadedModel, rows: _Rows, batch_size: int) -> None:
        self.lm, self.rows, self.batch_size = lm, rows, batch_size
        self.val_rows = len(rows.ids)
        self._base: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in self._batches():
            logp = self._logp(batch, None)
            self._base.append(logp)
        self.baseline = self._score([t for t, _ in self._base])

    def _batches(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]]:
        pad = self.lm.tokenizer.pad_token_id
        pad = pad if pad is not None else 0
        out = []
        n = len(self.rows.ids)
        for start in range(0, n, self.batch_size):
            idx = list(range(start, min(n, start + self.batch_size)))
            length = max(len(self.rows.ids[i]) for i in idx)
            ids = torch.full((len(idx), length), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), length), dtype=torch.long)
            target = torch.zeros((len(idx), length), dtype=torch.bool)
            for r, i in enumerate(idx):
                x = self.rows.ids[i]
                off = length - len(x)
                ids[r, off:] = torch.tensor(x)
                mask[r, off:] = 1
                target[r, off + self.rows.prompt_len[i]:] = True
            out.append((ids, mask, target, idx))
        return out

    def _logp(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]],
              steers: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: mean log-prob of its target tokens (B,), and the log-softmax at every
        predicting position of a target token (N_pos, V)."""
        from steerlab.runtime import steering

        ids, mask, target, idx = batch
        lm = self.lm
        with torch.no_grad():
            kw = {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device)}
            if steers is None:
                logits = lm.model(**kw).logits
            else:
                with steering(lm, steers, prompt_len=[self.rows.prompt_len[i] for i in idx]):
                    logits = lm.model(**kw).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
        sel = target[:, 1:]
        tok_lp = logp.gather(2, ids[:, 1:, None])[..., 0]
        per_row = (tok_lp * sel).sum(1) / sel.sum(1).clamp_min(1)
        return per_row, logp[sel]

    def _score(self, per_row_batches: Sequence[torch.Tensor]) -> float:
        per_row = torch.cat(list(per_row_batches))
        sign = torch.tensor(self.rows.sign, dtype=torch.float32)
        if self.rows.contrastive:
            by_pair: dict[int, float] = {}
            for lp, s, pr in zip(per_row.tolist(), sign.tolist(), self.rows.pair, strict=True):
                by_pair[pr] = by_pair.get(pr, 0.0) + s * lp
            return sum(by_pair.values()) / len(by_pair)
        pos, neg = per_row[sign > 0], per_row[sign < 0]
        return float(pos.mean() - neg.mean())

    def point(self, steers: Any) -> dict[str, float]:
        """The change and the fluency of one candidate (a point of ``fit_info["auto"]``)."""
        change, kl = self.measure(steers)
        return {"change": round(change, 5), "kl": round(kl, 5)}

    @staticmethod
    def admissible(point: dict[str, float], budget: float) -> bool:
        return math.isfinite(point["kl"]) and point["kl"] <= budget

    def measure(self, steers: Any) -> tuple[float, float]:
        """(behaviour change, mean next-token KL) under ``steers``."""
        per_rows, kl_sum, n = [], 0.0, 0
        for batch, (_, base_lp) in zip(self._batches(), self._base, strict=True):
            per_row, lq = self._logp(batch, steers)
            per_rows.append(per_row)
            kl_sum += float((base_lp.exp() * (base_lp - lq)).sum())
            n += int(base_lp.shape[0])
        return self._score(per_rows) - self.baseline, kl_sum / max(n, 1)


class _GenerationScorer:
    """The ``"generate"`` objective: greedy validation answers, judged by the training part's
    :class:`~steerlab.evals.judges.ContrastJudge`, fluency as the unsteered model's
    perplexity ratio (module docstring). The unsteered answers are generated once."""

    metric = "ppl_ratio"

    def __init__(self, lm: LoadedModel, train: ContrastiveSet, val: ContrastiveSet,
                 new_tokens: int, batch_size: int) -> None:
        from steerlab.evals.judges import ContrastJudge

        self.lm, self.new_tokens, self.batch_size = lm, new_tokens, batch_size
        self.prompts = [p.prompt for p in val]
        self.judge = ContrastJudge([p.positive for p in train], [p.negative for p in train])
        texts = self._answers(None)
        self.baseline = self._lean(texts)
        self.base_ppl = self._ppl(texts)
        if not math.isfinite(self.base_ppl):
            raise DataError("--auto: the unsteered model answers every validation prompt with "
                            "nothing; the generation objective cannot measure fluency")
        self.val_rows = len(self.prompts)

    def _answers(self, steers: Any) -> list[str]:
        from steerlab.runtime import generate

        return generate(self.lm, self.prompts, steers=steers, max_new_tokens=self.new_tokens,
                        batch_size=self.batch_size)

    def _lean(self, texts: Sequence[str]) -> float:
        scores = self.judge.lean(texts)
        return sum(scores) / len(scores)

    def _ppl(self, texts: Sequence[str]) -> float:
        """Perplexity of the answers under the unsteered model (NaN: every answer empty)."""
        from steerlab.evals.fluency import generation_fluency

        return generation_fluency(self.lm, self.prompts, texts, batch_size=self.batch_size)["ppl"]

    def point(self, steers: Any) -> dict[str, float | None]:
        from steerlab.evals.fluency import degenerate_fraction

        texts = self._answers(steers)
        ratio = self._ppl(texts) / self.base_ppl
        return {"change": round(self._lean(texts) - self.baseline, 5),
                "ppl_ratio": round(ratio, 5) if math.isfinite(ratio) else None,
                "degenerate": round(degenerate_fraction(texts), 5)}

    @staticmethod
    def admissible(point: dict[str, Any], budget: float) -> bool:
        """Within the perplexity ratio ``budget`` (None: every answer empty) and no
        degenerate answer."""
        ratio = point["ppl_ratio"]
        return ratio is not None and ratio <= budget and point["degenerate"] == 0


def _free_text(data: ContrastiveSet) -> bool:
    """Whether the completions are free text (median of at least three words), not answer
    letters such as CAA's "(A" / "(B"."""
    words = sorted(len(t.split()) for p in data for t in (p.positive, p.negative))
    return bool(words) and words[len(words) // 2] >= 3


def check_objective(objective: str, what: str = "--auto objective") -> None:
    """Refuse an objective that is not one of :data:`OBJECTIVES` (the CLI calls it, as
    ``--objective``, before loading a model)."""
    if objective not in OBJECTIVES:
        raise DataError(f"unknown {what} {objective!r}; use {', '.join(OBJECTIVES)}")


def resolve_objective(objective: str, data: ContrastiveSet | LabeledSet,
                      recipe: str | None) -> str:
    """The objective ``auto`` uses for ``data`` (module docstring); refuses an unknown one
    and ``"generate"`` on data without prompts and completions."""
    check_objective(objective)
    generative = isinstance(data, ContrastiveSet) and recipe != "ab" and _free_text(data)
    if objective == "generate" and not generative:
        raise DataError("the generate objective needs prompts with free-text positive and "
                        "negative completions (not labelled texts, A/B letters or "
                        "recipe ab); use objective teacher")
    if objective == "auto":
        return "generate" if generative else "teacher"
    return objective


def takes_block(method: str) -> bool:
    """Whether the method is fitted at blocks one picks (``layer``/``layers`` in its
    constructor); A-LQR and S-PID steer every block."""
    import inspect

    from steerlab.methods import METHODS

    params: set[str] = set()
    for klass in METHODS[method].__mro__:
        own = inspect.signature(klass.__init__).parameters  # type: ignore[misc]
        params |= set(own)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            break
    return "layer" in params or "layers" in params


def layer_candidates(method: str, lm: LoadedModel,
                     layers: Sequence[int] | None) -> Sequence[int | None]:
    """The blocks to try: ``layers`` if given, else a few depths for methods with a block."""
    if not takes_block(method):
        return [None]
    if layers:
        return [int(x) for x in layers]
    n = lm.info.num_layers
    return [*sorted({min(n - 1, max(0, round(f * n))) for f in DEPTH_FRACTIONS})]


AUTO_SCOPES = ("all",)
"""Scopes ``auto`` tries besides the method's own default (see the module docstring)."""


def scope_candidates(controller: Any, given: str | None) -> list[str]:
    """The scopes to try for ``controller``: ``given`` alone if the user gave one; the
    controller's own scope alone if its mode fixes what it steers (positional ActAdd); else
    its own scope followed by :data:`AUTO_SCOPES` (duplicates removed, order kept)."""
    own = str(getattr(controller, "scope", controller.default_scope))
    if given is not None:
        return [str(given)]
    if str(controller.default_scope) != str(parse_scope(own)):
        return [own]  # the method steers a scope of its own whatever it is given
    return list(dict.fromkeys([own, *AUTO_SCOPES]))


def auto_fit(
    lm: LoadedModel,
    method: str,
    data: ContrastiveSet | LabeledSet,
    *,
    layers: Sequence[int] | None = None,
    objective: str = "auto",
    budget: float | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    start: float = 0.5,
    max_doublings: int = 7,
    new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = False,
    **fit_kwargs: Any,
) -> Any:
    """Fit ``method`` at each candidate block on the training part and return the controller
    whose (block, scope, strength) changes the validation behaviour most within the fluency
    ``budget`` of the ``objective`` (module docstring; ``budget`` defaults to
    :data:`DEFAULT_BUDGET` of the objective). ``fit_kwargs`` go to
    :func:`steerlab.fitting.fit_method`."""
    from steerlab.fitting import fit_method
    from steerlab.runtime import Steer

    kind = resolve_objective(objective, data, fit_kwargs.get("recipe"))
    budget = DEFAULT_BUDGET[kind] if budget is None else budget
    floor = 1.0 if kind == "generate" else 0.0
    if not math.isfinite(budget) or budget <= floor:
        unit = ("a perplexity ratio above 1" if kind == "generate"
                else "a positive number of nats")
        raise DataError(f"the fluency budget must be {unit}, got {budget}")
    if start <= 0 or not math.isfinite(start):
        raise DataError(f"start must be a positive strength, got {start}")
    if new_tokens < 1:
        raise DataError(f"new_tokens must be at least 1, got {new_tokens}")
    t0 = time.perf_counter()
    train, val = validation_split(data, val_fraction, seed)
    scorer: Any = (_GenerationScorer(lm, train, val, new_tokens, batch_size)
                   if kind == "generate" else _Scorer(lm, _rows(lm, val), batch_size))
    points: list[dict[str, Any]] = []
    # (sign, block, scope) -> (gain, strength, fluency, controller)
    best: dict[tuple[int, int | None, str], tuple[float, float, float, Any]] = {}
    candidates = layer_candidates(method, lm, layers)
    iterator: Any = candidates
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(candidates, desc=f"auto ({kind}): blocks", unit="block")
    for layer in iterator:
        controller = fit_method(lm, method, train, layer=layer, **fit_kwargs)
        for scope in scope_candidates(controller, fit_kwargs.get("scope")):
            for sign in (1, -1):
                for i in range(max_doublings + 1):
                    s = sign * start * 2.0 ** i
                    point = scorer.point(Steer(controller, s, scope=scope))
                    points.append({"layer": layer, "scope": scope, "strength": s, **point})
                    if not scorer.admissible(point, budget):
                        break
                    gain = sign * point["change"]
                    key = (sign, layer, scope)
                    if gain > 0 and (key not in best or gain > best[key][0]):
                        best[key] = (gain, s, point[scorer.metric], controller)
    positive = [(v, k) for k, v in best.items() if k[0] == 1]
    if not positive:
        what = ("a perplexity ratio" if kind == "generate" else "a next-token KL")
        unit = "" if kind == "generate" else " nats"
        raise DataError(
            f"--auto: no strength of {method} raised the validation behaviour within "
            f"{what} of {budget:g}{unit} (objective {kind}, blocks {candidates}); raise the "
            f"budget or give the layer and strength yourself")
    (gain, s, fluency, controller), (_, layer, scope) = max(positive, key=lambda vk: vk[0][0])
    neg = best.get((-1, layer, scope))
    if scope != str(getattr(controller, "scope", controller.default_scope)):
        controller._set_scope(scope)
    choice = AutoChoice(
        layer=layer, scope=scope, strength=s, strength_negative=neg[1] if neg else None,
        change=round(gain, 5), change_negative=round(-neg[0], 5) if neg else None,
        objective=kind, fluency_metric=scorer.metric, fluency=fluency, budget=budget,
        val_rows=scorer.val_rows,
        baseline_score=round(scorer.baseline, 5), points=points,
        seconds=round(time.perf_counter() - t0, 3))
    controller.fit_info["auto"] = choice.as_dict()
    return controller


def stored_strength(controller: Any) -> float | None:
    """The strength ``--auto`` chose for this controller (None if it was not auto-fitted)."""
    auto = controller.fit_info.get("auto") if isinstance(controller.fit_info, dict) else None
    if isinstance(auto, dict):
        s = auto.get("strength")
        if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s):
            return float(s)
    return None
