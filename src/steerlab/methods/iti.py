"""ITI: Inference-Time Intervention on a few attention heads.

Li, Patel, Viégas, Pfister, Wattenberg, "Inference-Time Intervention: Eliciting Truthful
Answers from a Language Model", NeurIPS 2023 (reference code: likenneth/honest_llama);
spec ``specs/methods.md`` § ITI.

**Where.** The output of each attention head before the output projection: the site
``heads.L`` is the input of block L's ``o_proj`` (the concatenated heads, width
n_heads·head_dim), and head h is its slice x_{L,h} = x[h·d_h : (h+1)·d_h] (d_h = head_dim).
The fit reads it at the last token (``recipe="last"``, the paper's choice); steering writes it
at the last prompt token and every generated token (default scope ``last``, the reference's
``b[0, -1]`` on every forward call).

**Probes.** The positive and negative rows (N₊ ≠ N₋ allowed; row i is the same sample at every
site) are split once per class with ``numpy.random.default_rng(seed)``: a permutation of the
positives, then one of the negatives; the last n_val = round(val_fraction·N) rows of each
permutation (at least 1, at most N − 1) are the validation split, the rest the train split.
The same split serves every head. For every (layer L, head h) one
``LogisticRegression(max_iter=1000)`` (sklearn defaults otherwise: L2, C = 1, lbfgs) is fitted
on x_{L,h} of the train split (label 1 = positive), and acc_{L,h} is its accuracy on the
validation split.

**Ranking.** All (L, h) are sorted by validation accuracy, highest first, ties broken by
smaller layer, then smaller head; the first K are kept (K = ``top_k``; default 48, the
paper's, capped at the number of heads available).

**Direction.** For each kept head, θ_{L,h} = mean(x⁺_{L,h}) − mean(x⁻_{L,h}) over all rows
(train + validation: the paper's mass-mean shift, ``--use_center_of_mass``), or the probe's
weight vector (``direction="probe"``); θ̂ = θ/‖θ‖.

**Scale.** σ_{L,h} = std(t · θ̂) (population std, ddof 0) over the tuning activations t at
that head: by default every positive and negative row; the reference uses a separate tuning
set (``tuning=``).

**Steering.** The vector at ``heads.L`` is zero except on each kept head's slice, where it is
α·σ_{L,h}·θ̂_{L,h}; steering adds strength·v to the o_proj input:

    x'_{L,h} = x_{L,h} + strength · α · σ_{L,h} · θ̂_{L,h}     for kept (L, h)

so strength 1 reproduces the paper's intervention with α (default 15): the effective α is
strength·alpha. Only blocks with a kept head are hooked.

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
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from steerlab.errors import DataError, SteeringError
from steerlab.methods.base import two_class_rows
from steerlab.methods.caa import AdditiveController, _layers_arg
from steerlab.scope import parse_scope
from steerlab.sites import Site

Recipe = Literal["ab", "last", "mean"]
Direction = Literal["mass_mean", "probe"]
DEFAULT_TOP_K = 48


def split_rows(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """(train, validation) row indices of one class: a permutation from ``rng``, its last
    round(val_fraction·n) entries (clamped to 1 … n−1) for validation."""
    perm = rng.permutation(n)
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    return perm[: n - n_val], perm[n - n_val:]


class ITI(AdditiveController):
    """Inference-Time Intervention; see the module docstring for the equations.

    Args:
        layers: blocks whose heads are probed (``None``: every block; the fitting helper fills
            them in before collecting).
        top_k: number of heads to steer (``None``: 48 capped at the heads available).
        alpha: the paper's α (default 15); strength multiplies it (effective α =
            strength·alpha).
        direction: ``"mass_mean"`` (mean difference, the paper's best) or ``"probe"``.
        val_fraction: fraction of each class held out to rank the heads.
        seed: seed of the train/validation split (and of the probes).
        recipe: which token the fit reads: ``"last"`` (the paper's), ``"ab"`` or ``"mean"``.
        scope: default token scope when steering (``"last"``).

    Learned: ``head_dim``; ``selected_heads`` [(layer, head), …] in rank order;
    ``val_accuracy`` {layer: (n_heads,) tensor}; ``sigmas`` (K,) and ``directions`` (K,
    head_dim) aligned with ``selected_heads``; ``vectors`` {heads.L: (n_heads·head_dim,)}.
    """

    method = "iti"

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
        try:
            a = float(alpha)
        except (TypeError, ValueError) as exc:
            raise SteeringError(f"alpha must be a number, got {alpha!r}") from exc
        if not math.isfinite(a):
            raise SteeringError(f"alpha must be a finite number, got {alpha!r}")
        if direction not in ("mass_mean", "probe"):
            raise SteeringError(f"unknown ITI direction {direction!r}; use mass_mean or probe")
        try:
            vf = float(val_fraction)
        except (TypeError, ValueError) as exc:
            raise SteeringError(f"val_fraction must be a number, got {val_fraction!r}") from exc
        if not 0.0 < vf < 1.0:
            raise SteeringError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if recipe not in ("ab", "last", "mean"):
            raise SteeringError(f"unknown ITI recipe {recipe!r}; use ab, last or mean")
        self.layers: list[int] | None = None if layers is None else _layers_arg(layers)
        self.top_k = top_k
        self.alpha = a
        self.direction: Direction = direction
        self.val_fraction = vf
        self.seed = int(seed)
        self.recipe: Recipe = recipe
        self.scope = scope
        self.default_scope = parse_scope(scope)
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

    # -- fit -----------------------------------------------------------------------------------
    def _check_sites(
        self, positive: dict[Site, torch.Tensor], negative: dict[Site, torch.Tensor]
    ) -> list[Site]:
        if not positive:
            raise DataError("ITI needs activations at one or more heads sites")
        sites = sorted(positive)
        for s in sites:
            if s.kind != "heads":
                raise DataError(f"ITI reads attention heads (heads.L sites), not {s}")
        if set(negative) != set(positive):
            raise DataError(
                f"positive sites {[str(s) for s in sites]} != negative sites "
                f"{[str(s) for s in sorted(negative)]}"
            )
        return sites

    def fit(
        self,
        positive: dict[Site, torch.Tensor],
        negative: dict[Site, torch.Tensor],
        *,
        head_dim: int,
        tuning: dict[Site, torch.Tensor] | None = None,
        progress: bool = False,
    ) -> ITI:
        """Probe every head, keep the top K, and build the vectors.

        Args:
            positive: per ``heads.L`` site, (N₊, n_heads·head_dim) activations of the positive
                class (same rows at every site).
            negative: the same for the negative class, (N₋, n_heads·head_dim).
            head_dim: width of one head (``find_layers(model).head_dim``).
            tuning: per site, (N_t, n_heads·head_dim) activations for σ (default: all positive
                and negative rows).
            progress: show a progress bar over the probes.
        """
        from sklearn.linear_model import LogisticRegression

        start = time.perf_counter()
        if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) \
                or head_dim < 1:
            raise DataError(f"head_dim must be a positive integer, got {head_dim!r}")
        hd = int(head_dim)
        sites = self._check_sites(positive, negative)
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

        rng = np.random.default_rng(self.seed)
        np_ = next(iter(n_pos))
        nn_ = next(iter(n_neg))
        tr_p, va_p = split_rows(np_, self.val_fraction, rng)
        tr_n, va_n = split_rows(nn_, self.val_fraction, rng)
        y_tr = np.concatenate([np.ones(len(tr_p)), np.zeros(len(tr_n))]).astype(np.int64)
        y_va = np.concatenate([np.ones(len(va_p)), np.zeros(len(va_n))]).astype(np.int64)

        bar: Any = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="ITI probes", unit="head", leave=False)
        accuracy: dict[int, torch.Tensor] = {}
        probe_w: dict[tuple[int, int], np.ndarray] = {}
        ranking: list[tuple[float, int, int]] = []
        try:
            for s in sites:
                xp = pos[s].numpy().astype(np.float64)
                xn = neg[s].numpy().astype(np.float64)
                x_tr = np.concatenate([xp[tr_p], xn[tr_n]])
                x_va = np.concatenate([xp[va_p], xn[va_n]])
                accs = np.zeros(n_heads[s])
                for h in range(n_heads[s]):
                    cols = slice(h * hd, (h + 1) * hd)
                    clf = LogisticRegression(max_iter=1000, random_state=self.seed)
                    clf.fit(x_tr[:, cols], y_tr)
                    accs[h] = float((clf.predict(x_va[:, cols]) == y_va).mean())
                    probe_w[(s.layer, h)] = clf.coef_[0].copy()
                    ranking.append((-float(accs[h]), s.layer, h))
                    if bar is not None:
                        bar.update(1)
                accuracy[s.layer] = torch.tensor(accs, dtype=torch.float32)
        finally:
            if bar is not None:
                bar.close()
        ranking.sort()
        chosen = [(layer, h) for _, layer, h in ranking[:k]]

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
            sigma = float((tune[s][:, cols].to(torch.float64) @ unit).std(correction=0))
            v = vectors.setdefault(s, torch.zeros(pos[s].shape[1], dtype=torch.float32))
            v[cols] = (self.alpha * sigma * unit).to(torch.float32)
            sigmas.append(sigma)
            directions.append(unit.to(torch.float32))

        self.set_vectors(vectors)
        self.layers = [s.layer for s in sites]  # the probed blocks, as resolved
        self.head_dim = hd
        self.selected_heads = chosen
        self.val_accuracy = accuracy
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        self.directions = torch.stack(directions)
        best = [round(-a, 4) for a, _, _ in ranking[:k]]
        self.fit_info.update(
            n_train=[len(tr_p), len(tr_n)],
            n_val=[len(va_p), len(va_n)],
            n_heads_total=total,
            top_k=k,
            top_k_capped=capped,
            selected_heads=[[layer, h] for layer, h in chosen],
            selected_val_accuracy=best,
            best_val_accuracy=best[0],
            mean_val_accuracy=round(float(np.mean([-a for a, _, _ in ranking])), 4),
            sigmas=[round(x, 6) for x in sigmas],
            direction=self.direction,
            alpha=self.alpha,
            tuning="given" if tuning is not None else "positive+negative",
            steered_sites=[str(s) for s in self.sites],
            probe_seconds=round(time.perf_counter() - start, 3),
        )
        return self

    # -- artifacts -----------------------------------------------------------------------------
    def hyperparameters(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "top_k": self.top_k,
            "alpha": self.alpha,
            "direction": self.direction,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "recipe": self.recipe,
            "scope": self.scope,
        }

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
