"""ITI: Inference-Time Intervention on a few attention heads.

Li, Patel, Viégas, Pfister, Wattenberg, "Inference-Time Intervention: Eliciting Truthful
Answers from a Language Model", NeurIPS 2023: §3.2 (a linear probe per head, the top K by
validation accuracy), §3.3 and Eq. (2) (the intervention x_{l+1} = x_l + Σ_h Q_l^h(Att_l^h(
P_l^h x_l) + α·σ_l^h·θ_l^h) on the K heads, θ the mass-mean shift, σ the std of the activations
along it); reference code: likenneth/honest_llama (cited below as
``v2f`` = ``validation/validate_2fold.py``, ``utils`` = ``utils.py``, at its HEAD); spec
``specs/methods.md`` § ITI. ``ITI.from_preset("paper")`` sets every value ``v2f`` runs with.

**Where.** The output of each attention head before the output projection: the site
``heads.L`` is the input of block L's ``o_proj`` (the concatenated heads, width
n_heads·head_dim; ``v2f`` L181 ``self_attn.o_proj.input``), and head h is its slice
x_{L,h} = x[h·d_h : (h+1)·d_h]. The fit reads it at the last token (``recipe="last"``;
``interveners.py`` L21 ``b[0, -1]``); steering writes it at the last prompt token and every
generated token (default scope ``last``, the reference's ``b[0, -1]`` on every forward call,
``interveners.py`` L44).

**Split** (``v2f`` L132-144, ``utils`` L687-690). With question ids (``groups=``, which
:func:`steerlab.fitting.fit_iti` fills in: a contrastive pair's prompt, a labelled item's
``group``, e.g. the TruthfulQA question), the rows are split by question, as the reference
does: the G questions are numbered in order of first appearance (positive ids, then negative
ids); ``numpy.random.RandomState(seed).choice(G, size=int(G·(1 − val_fraction)),
replace=False)`` are the training questions, in that order, and the others, in ascending
order, the validation questions; a question's rows, its positive rows then its negative rows,
all go to its side. Without ids (``groups=None``), steerlab's own row split: each class is
permuted with ``numpy.random.default_rng(seed)`` (positives, then negatives) and the last
round(val_fraction·N) rows of each (at least 1, at most N − 1) are the validation split.

**Probes** (``utils`` L692-700). The same split serves every head. For every (layer L, head h)
one ``LogisticRegression(random_state=seed, max_iter=1000)`` (sklearn defaults otherwise: L2,
C = 1, lbfgs) is fitted on x_{L,h} of the training rows (label 1 = positive), and acc_{L,h} is
its accuracy on the validation rows.

**Ranking** (``utils`` L714). The accuracies are flattened layer-major (index
i·n_heads + h for the i-th probed layer, ``utils`` L679-680) and ordered by
``np.argsort(acc)[::-1]``: highest accuracy first, and equal accuracies in the reverse of the
order numpy's argsort leaves them in. That order is numpy's introsort as the reference ran it
(numpy 1.23.4, ``environment.yaml`` L142), reproduced by :func:`reference_argsort` (for up to
16 heads an insertion sort, so ties go to the later layer, then the later head); newer numpy
on AVX-512 or AVX2 CPUs (2.4 here) sends the same call to a SIMD sort that orders ties
differently, so calling ``np.argsort`` would make the heads depend on the machine. The first K
are kept (K = ``top_k``; default 48, the paper's, capped at the number of heads available).

**Direction** (``v2f`` L152-153, L170-171, ``utils`` L768-782). For each kept head,
θ_{L,h} = mean(x⁺_{L,h}) − mean(x⁻_{L,h}) over the training and validation rows (the paper's
mass-mean shift, ``--use_center_of_mass``), or the probe's weight vector
(``direction="probe"``, ``utils`` L735, which ``v2f`` cannot run); θ̂ = θ/‖θ‖.

**Scale** (``v2f`` L126-130, L172-175). σ_{L,h} = std(t · θ̂) with ddof 1 (``torch.std``) over
the tuning activations t at that head, which the labels do not enter: ``tuning=`` given to
:meth:`ITI.fit` (``fit_iti`` holds out a slice of the data by default), else every probe row.

**Steering** (``v2f`` L175-176, ``interveners.py`` L44). The vector at ``heads.L`` is zero
except on each kept head's slice, where it is α·σ_{L,h}·θ̂_{L,h}; steering adds strength·v to
the o_proj input:

    x'_{L,h} = x_{L,h} + strength · α · σ_{L,h} · θ̂_{L,h}     for kept (L, h)

so strength 1 reproduces the paper's intervention with α (default 15): the effective α is
strength·alpha. Only blocks with a kept head are hooked.

**Deliberate differences from the reference.**

* σ's tuning rows: the reference takes them from another feature bank of the same questions
  (``tqa_gen_end_q``: "Q: … A: … Q: <random question>", every TruthfulQA question, the test
  fold's included); steerlab takes ``tuning=`` if given, else (``fit_iti``) a held-out slice
  of the questions, disjoint from the probe rows; :meth:`ITI.fit` alone, without ``tuning=``,
  uses the probe rows.
* The split is the reference's first fold's: ``v2f`` seeds numpy's global generator once
  (L76) and draws a split per fold, so its second fold's split continues that stream; the data
  given here is the development set (``v2f`` L137), any cross-validation is the caller's.
* Without question ids the split is steerlab's per-class row split (above); unpaired data
  (N₊ ≠ N₋) is allowed.
* Within a question, the rows are ordered positives first, then negatives (the reference keeps
  the ``mc2_targets`` order, correct answers first, which is the same for TruthfulQA).
* With a subset of layers probed, the ranking runs over those layers' heads only.
* Directions and σ are computed in float64 and the vector kept in float32 (the reference:
  float32, and the vector cast to float16, ``interveners.py`` L33); the write is row-wise
  over a batch (the reference's ``b[0, -1]`` steers row 0, its batches are single prompts).
* ``utils.get_interventions_dict`` (L739, which ``v2f`` imports but does not call; the legacy
  baukit scripts' copy, ``legacy/llama_utils.py`` L717) takes σ with ``np.std`` (ddof 0);
  steerlab follows ``v2f`` L174 (``torch.std``, ddof 1).

**Architectures.** Any model whose attention output projection takes the concatenated head
outputs (n_heads·head_dim, head-major), found by :func:`steerlab.sites.find_layers`. Verified
in the tests on the tiny llama, mistral, qwen2, qwen3 (head_dim 16 ≠ hidden/heads: the site is
64 wide on a 32-wide model), gemma2, gemma3_text, gpt2, gpt_neox, phi3, olmo2, starcoder2,
granite and falcon models (GQA ones included: the site holds the query heads). A model
without a recognisable projection raises :class:`~steerlab.errors.SiteError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from steerlab.errors import DataError, SiteError, SteeringError
from steerlab.methods.additive import AdditiveController
from steerlab.methods.additive import Recipe as Recipe
from steerlab.methods.base import Preset
from steerlab.methods.checks import (
    check_number,
    check_recipe,
    heads_sites,
    layers_arg,
    question_groups,
    two_class_rows,
)

# The head ranking and the splits live in methods/iti_tuning.py; they keep this import path.
from steerlab.methods.iti_tuning import (
    DEFAULT_ITI_TUNING_FRACTION as DEFAULT_ITI_TUNING_FRACTION,
)
from steerlab.methods.iti_tuning import _aheapsort as _aheapsort
from steerlab.methods.iti_tuning import hold_out_questions, question_ids, tuning_texts
from steerlab.methods.iti_tuning import rank_heads as rank_heads
from steerlab.methods.iti_tuning import reference_argsort as reference_argsort
from steerlab.methods.iti_tuning import split_questions as split_questions
from steerlab.methods.iti_tuning import split_rows as split_rows
from steerlab.methods.reading import Collected, ModelLayout, Reading, check_fraction, check_options
from steerlab.sites import Site

Direction = Literal["mass_mean", "probe"]
DEFAULT_TOP_K = 48
REFERENCE = "likenneth/honest_llama"

class ITI(AdditiveController):
    """Inference-Time Intervention; see the module docstring for the equations.

    Args:
        layers: blocks whose heads are probed (``None``: every block; the fitting helper fills
            them in before collecting).
        top_k: number of heads to steer (``None``: 48 capped at the heads available).
        alpha: the paper's α (default 15); strength multiplies it (effective α =
            strength·alpha).
        direction: ``"mass_mean"`` (mean difference, the paper's best) or ``"probe"``.
        val_fraction: fraction of the questions (without question ids: of each class's rows)
            held out to rank the heads (the reference's ``val_ratio``).
        seed: seed of the train/validation split (and of the probes; ``fit_iti`` also draws
            its held-out tuning questions with it).
        recipe: which token the fit reads: ``"last"`` (the paper's), ``"ab"`` or ``"mean"``.
        scope: default token scope when steering (``"last"``).

    Learned: ``head_dim``; ``selected_heads`` [(layer, head), …] in rank order;
    ``val_accuracy`` {layer: (n_heads,) tensor}; ``sigmas`` (K,) and ``directions`` (K,
    head_dim) aligned with ``selected_heads``; ``vectors`` {heads.L: (n_heads·head_dim,)}.
    """

    method = "iti"
    presets: ClassVar[dict[str, Preset]] = {
        "paper": Preset(
            hyperparameters={"layers": None, "top_k": 48, "alpha": 15.0,
                             "direction": "mass_mean", "val_fraction": 0.2, "seed": 42,
                             "recipe": "last", "scope": "last"},
            fit={"tuning_fraction": 0.5},
            source=f"{REFERENCE} validation/validate_2fold.py L60 (K = 48), L61 (α = 15), "
                   "L63 (val_ratio 0.2), L67 (seed 42), L64 + README.md L112 "
                   "(--use_center_of_mass), L103/L137 (the probes see one of 2 folds: "
                   "tuning_fraction 0.5 holds out the other half of the questions for σ, "
                   "steerlab's choice, the reference's σ uses every question), L143-144 "
                   "(split by question), L172-174 (σ, torch.std); utils.py L697 "
                   "(LogisticRegression(random_state=seed, max_iter=1000)), L714 (ranking), "
                   "L768-782 (centre of mass over train + val); every layer probed "
                   "(utils.py L692); the last token (interveners.py L21, L44)",
        ),
    }

    def __init__(
        self,
        layers: int | Sequence[int] | None = None,
        *,
        top_k: int | None = None,
        alpha: float = 15.0,
        direction: Direction = "mass_mean",
        val_fraction: float = 0.2,
        seed: int = 42,
        recipe: Recipe = "last",
        scope: str = "last",
    ) -> None:
        super().__init__()
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
                raise SteeringError(f"top_k must be a positive integer (or None), got {top_k!r}")
            top_k = int(top_k)
        a = check_number("alpha", alpha)
        if direction not in ("mass_mean", "probe"):
            raise SteeringError(f"unknown ITI direction {direction!r}; use mass_mean or probe")
        try:
            vf = float(val_fraction)
        except (TypeError, ValueError) as exc:
            raise SteeringError(f"val_fraction must be a number, got {val_fraction!r}") from exc
        if not 0.0 < vf < 1.0:
            raise SteeringError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        check_recipe(recipe, "ITI")
        self.layers: list[int] | None = None if layers is None else layers_arg(layers)
        self.top_k = top_k
        self.alpha = a
        self.direction: Direction = direction
        self.val_fraction = vf
        self.seed = int(seed)
        self.recipe: Recipe = recipe
        self._set_scope(scope)
        self.head_dim: int | None = None
        self.selected_heads: list[tuple[int, int]] = []
        self.val_accuracy: dict[int, torch.Tensor] = {}
        self.sigmas = torch.zeros(0)
        self.directions = torch.zeros(0, 0)

    def fit_sites(self) -> list[Site]:
        if self.layers is None:
            raise SteeringError(
                "ITI(layers=None) probes every block: set controller.layers (e.g. "
                "list(range(num_layers))) before collecting, or use the fitting helper"
            )
        return [Site("heads", layer) for layer in self.layers]

    # -- the fit side --------------------------------------------------------------------------
    def reading(self, model: ModelLayout, data: Any, *, tuning: Any = None,
                tuning_fraction: float | None = None, **options: Any) -> Reading:
        """Per-head attention outputs (``heads.L``) of every chosen block (all blocks when
        ``layers`` is None) for both classes, and the rows σ comes from. Fit options:
        ``tuning`` (a contrastive set: both completions; a labelled set or plain strings:
        the texts as they are, at the last token) or ``tuning_fraction`` of the data's
        questions held out for σ (default: the preset's, else 0.2; see
        :func:`~steerlab.methods.iti_tuning.hold_out_questions`); ``tuning_fraction=0``, or
        data of fewer than 3 questions (with a warning), takes σ from the probe rows."""
        import warnings

        from steerlab.data import ContrastiveSet, LabeledSet

        check_options(self.method, options, ("tuning", "tuning_fraction"))
        if tuning is not None and tuning_fraction is not None:
            raise DataError("give tuning= (a tuning set) or tuning_fraction= (a held-out slice "
                            "of the data), not both")
        fraction = check_fraction("tuning_fraction", self.fit_option(
            "tuning_fraction", tuning_fraction, DEFAULT_ITI_TUNING_FRACTION))
        if isinstance(tuning, str) or (tuning is not None and not isinstance(
                tuning, (ContrastiveSet, LabeledSet, Sequence))):
            raise DataError(f"tuning must be a contrastive set, a labelled set or a list of "
                            f"texts, got {type(tuning).__name__}")
        if self.layers is None:
            self.layers = list(range(model.num_layers))
        sites = self.bind_sites(model)  # SiteError: no heads
        if model.head_dim is None:
            raise SiteError(f"{model.info.model_id}: the head width is unknown, so ITI cannot "
                            f"address single heads")
        probe_data, held, n_held = data, tuning, 0
        if tuning is None and fraction > 0.0:
            probe_data, held, n_held = hold_out_questions(data, fraction, self.seed)
            if held is None:
                warnings.warn(f"ITI: {data.name!r} has too few questions to hold out a tuning "
                              f"set for σ; σ comes from the probe rows (give tuning= to avoid "
                              f"this)", stacklevel=4)
        reading = Reading(sites=sites, recipe=self.recipe, data="labelled", sets=[probe_data],
                          extras={"head_dim": model.head_dim,
                                  "groups": question_ids(probe_data)})
        reading.extras["fit_info"] = dict(
            tuning="given" if tuning is not None else "held-out" if held is not None
            else "probe rows",
            tuning_fraction=None if tuning is not None else fraction,
            n_tuning_questions=n_held if tuning is None and held is not None else None)
        if isinstance(held, ContrastiveSet):
            reading.tuning_sets["tuning"] = held
        elif held is not None:
            reading.texts["tuning"] = tuning_texts(held, self.recipe)
        return reading

    def fit_collected(self, collected: Collected) -> ITI:
        """``fit`` with the head width, the tuning rows and the question ids; ``fit_info``
        records where σ came from."""
        tuning = collected.extra.get("tuning")
        if isinstance(tuning, tuple):
            tuning = {s: torch.cat([tuning[0][s], tuning[1][s]]) for s in collected.reading.sites}
        extras = collected.reading.extras
        self.fit(collected.positive, collected.negative, head_dim=extras["head_dim"],
                 tuning=tuning, groups=extras["groups"])
        self.fit_info.update(extras["fit_info"])
        return self

    # -- fit -----------------------------------------------------------------------------------
    def fit(  # noqa: C901
        self,
        positive: dict[Site, torch.Tensor],
        negative: dict[Site, torch.Tensor],
        *,
        head_dim: int,
        tuning: dict[Site, torch.Tensor] | None = None,
        groups: tuple[Sequence[Hashable], Sequence[Hashable]] | None = None,
        progress: bool = False,
    ) -> ITI:
        """Probe every head, keep the top K, and build the vectors.

        Args:
            positive: per ``heads.L`` site, (N₊, n_heads·head_dim) activations of the positive
                class (same rows at every site).
            negative: the same for the negative class, (N₋, n_heads·head_dim).
            head_dim: width of one head (``find_layers(model).head_dim``).
            tuning: per site, (N_t ≥ 2, n_heads·head_dim) activations for σ, rows apart from
                the probe rows (the reference's tuning set; default: every positive and
                negative row).
            groups: the question id (any hashable) of each positive row and of each negative
                row, ``(ids₊, ids₋)``: the rows are then split by question, as the reference
                does (default: steerlab's per-class row split).
            progress: show a progress bar over the probes.
        """
        from sklearn.linear_model import LogisticRegression

        start = time.perf_counter()
        if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) \
                or head_dim < 1:
            raise DataError(f"head_dim must be a positive integer, got {head_dim!r}")
        hd = int(head_dim)
        sites = heads_sites(positive, negative)
        pos: dict[Site, torch.Tensor] = {}
        neg: dict[Site, torch.Tensor] = {}
        for s in sites:
            p, n = two_class_rows(positive[s], negative[s], "ITI")
            if p.shape[1] % hd != 0:
                raise DataError(
                    f"activations at {s} have width {p.shape[1]}, not a multiple of head_dim "
                    f"{hd}: a model without separable head outputs cannot be steered per head"
                )
            pos[s], neg[s] = p, n
        n_pos = {int(pos[s].shape[0]) for s in sites}
        n_neg = {int(neg[s].shape[0]) for s in sites}
        if len(n_pos) > 1 or len(n_neg) > 1:
            raise DataError(
                f"ITI needs the same samples at every site; got {sorted(n_pos)} positive and "
                f"{sorted(n_neg)} negative row counts"
            )
        n_heads = {s: pos[s].shape[1] // hd for s in sites}
        total = sum(n_heads.values())
        if self.top_k is None:
            k, capped = min(DEFAULT_TOP_K, total), total < DEFAULT_TOP_K
        elif self.top_k > total:
            raise DataError(
                f"top_k={self.top_k} heads asked for, but only {total} heads are available at "
                f"{len(sites)} layer(s); lower top_k or probe more layers"
            )
        else:
            k, capped = self.top_k, False
        tune: dict[Site, torch.Tensor] = {}
        if tuning is not None:
            missing = [str(s) for s in sites if s not in tuning]
            if missing:
                raise DataError(f"tuning activations are missing at {missing}")
            for s in sites:
                t = tuning[s]
                if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] < 2 \
                        or t.shape[1] != pos[s].shape[1]:
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise DataError(
                        f"tuning activations at {s} must be (N ≥ 2, {pos[s].shape[1]}), got "
                        f"{shape}"
                    )
                t = t.detach().to(torch.float32).cpu()
                if not bool(torch.isfinite(t).all()):
                    raise DataError(f"tuning activations at {s} have NaN or inf values")
                tune[s] = t
        else:
            tune = {s: torch.cat([pos[s], neg[s]]) for s in sites}

        np_ = next(iter(n_pos))
        nn_ = next(iter(n_neg))
        n_questions: list[int] | None = None
        if groups is None:
            rng = np.random.default_rng(self.seed)
            tr_p, va_p = split_rows(np_, self.val_fraction, rng)
            tr_n, va_n = split_rows(nn_, self.val_fraction, rng)
            tr = np.concatenate([tr_p, np_ + tr_n])
            va = np.concatenate([va_p, np_ + va_n])
        else:
            gp, gn = question_groups(groups, np_, nn_)
            tr, va, q_tr, q_va = split_questions(gp, gn, self.val_fraction, self.seed)
            n_questions = [q_tr, q_va]
        y_all = np.concatenate([np.ones(np_), np.zeros(nn_)]).astype(np.int64)
        y_tr, y_va = y_all[tr], y_all[va]
        if len(np.unique(y_tr)) < 2:
            raise DataError(
                f"the training split holds only label {int(y_tr[0])} rows: its questions "
                f"need answers of both classes to fit the probes"
            )

        bar: Any = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="ITI probes", unit="head", leave=False)
        accuracy: dict[int, torch.Tensor] = {}
        probe_w: dict[tuple[int, int], np.ndarray] = {}
        flat_acc: list[float] = []  # layer-major, as utils.py L679-680 flattens them
        flat_head: list[tuple[int, int]] = []
        try:
            for s in sites:
                x_all = torch.cat([pos[s], neg[s]]).numpy().astype(np.float64)
                x_tr, x_va = x_all[tr], x_all[va]
                accs = np.zeros(n_heads[s])
                for h in range(n_heads[s]):
                    cols = slice(h * hd, (h + 1) * hd)
                    clf = LogisticRegression(random_state=self.seed, max_iter=1000)
                    clf.fit(x_tr[:, cols], y_tr)
                    accs[h] = float(np.mean(clf.predict(x_va[:, cols]) == y_va))
                    probe_w[(s.layer, h)] = clf.coef_[0].copy()
                    flat_acc.append(float(accs[h]))
                    flat_head.append((s.layer, h))
                    if bar is not None:
                        bar.update(1)
                accuracy[s.layer] = torch.tensor(accs, dtype=torch.float32)
        finally:
            if bar is not None:
                bar.close()
        order = rank_heads(np.array(flat_acc))[:k]
        chosen = [flat_head[i] for i in order]

        by_layer = {s.layer: s for s in sites}
        vectors: dict[Site, torch.Tensor] = {}
        sigmas: list[float] = []
        directions: list[torch.Tensor] = []
        for layer, h in chosen:
            s = by_layer[layer]
            cols = slice(h * hd, (h + 1) * hd)
            if self.direction == "mass_mean":
                theta = (pos[s][:, cols].to(torch.float64).mean(0)
                         - neg[s][:, cols].to(torch.float64).mean(0))
            else:
                theta = torch.from_numpy(probe_w[(layer, h)]).to(torch.float64)
            norm = float(theta.norm())
            if norm == 0.0 or not math.isfinite(norm):
                raise DataError(
                    f"head {h} of layer {layer} has a zero {self.direction} direction (its "
                    f"positive and negative activations have equal means); check the data"
                )
            unit = theta / norm
            sigma = float((tune[s][:, cols].to(torch.float64) @ unit).std(correction=1))
            v = vectors.setdefault(s, torch.zeros(pos[s].shape[1], dtype=torch.float32))
            v[cols] = (self.alpha * sigma * unit).to(torch.float32)
            sigmas.append(sigma)
            directions.append(unit.to(torch.float32))

        self.set_vectors(vectors)
        self.fit_info.pop("n_questions", None)
        if n_questions is not None:
            self.fit_info["n_questions"] = n_questions
        self.layers = [s.layer for s in sites]  # the probed blocks, as resolved
        self.head_dim = hd
        self.selected_heads = chosen
        self.val_accuracy = accuracy
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        self.directions = torch.stack(directions)
        best = [round(flat_acc[i], 4) for i in order]
        n_tr_pos, n_va_pos = int(y_tr.sum()), int(y_va.sum())
        self.fit_info.update(
            split="question" if n_questions is not None else "row",
            n_train=[n_tr_pos, len(y_tr) - n_tr_pos],
            n_val=[n_va_pos, len(y_va) - n_va_pos],
            n_heads_total=total,
            top_k=k,
            top_k_capped=capped,
            selected_heads=[[layer, h] for layer, h in chosen],
            selected_val_accuracy=best,
            best_val_accuracy=best[0],
            mean_val_accuracy=round(float(np.mean(flat_acc)), 4),
            sigmas=[round(x, 6) for x in sigmas],
            direction=self.direction,
            alpha=self.alpha,
            tuning="given" if tuning is not None else "probe rows",
            n_tuning=int(next(iter(tune.values())).shape[0]),
            steered_sites=[str(s) for s in self.sites],
            probe_seconds=round(time.perf_counter() - start, 3),
        )
        return self

    # -- artifacts -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        out["iti.head_dim"] = torch.tensor(self.head_dim or 0, dtype=torch.int64)
        out["iti.selected_heads"] = torch.tensor(
            self.selected_heads, dtype=torch.int64).reshape(-1, 2)
        out["iti.sigmas"] = self.sigmas.contiguous()
        out["iti.directions"] = self.directions.contiguous()
        for layer, acc in self.val_accuracy.items():
            out[f"iti.val_accuracy.{layer}"] = acc.contiguous()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        super().load_state(tensors, sites)
        self.head_dim = int(tensors["iti.head_dim"])
        self.selected_heads = [(int(a), int(b)) for a, b in tensors["iti.selected_heads"].tolist()]
        self.sigmas = tensors["iti.sigmas"].to(torch.float32)
        self.directions = tensors["iti.directions"].to(torch.float32)
        prefix = "iti.val_accuracy."
        accs = {int(name[len(prefix):]): t.to(torch.float32)
                for name, t in tensors.items() if name.startswith(prefix)}
        self.val_accuracy = dict(sorted(accs.items()))
        if len(self.selected_heads) != self.sigmas.shape[0]:
            raise ValueError(
                f"{len(self.selected_heads)} selected heads but {self.sigmas.shape[0]} sigmas"
            )
