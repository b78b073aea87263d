"""A-LQR and A-LQR+: closed-loop steering with layer-wise Jacobians and LQR gains.

Skifstad, Yang, Chou, "Local Linearity of LLMs Enables Activation Steering via Model-Based
Linear Optimal Control", ICML 2026 (arXiv:2604.19018; reference code
trustworthyrobotics/lqr-activation-steering). Also the paper's own baselines on the same
setpoint: S-PID and ActAdd-LFS.

**System.** The layer index is time. The state z_k ∈ R^d is the residual stream entering block
k (site ``resid_pre.k``); the control u_k is added to the block's output (``resid_post.k``):
z_{k+1} = φ_k(z_k) + u_k, i.e. B = I. Every block k = 0 … L−1 is steered.

**Linear feature setpoint (LFS).** From a contrastive set, per block input k:
e_k = z̄_{k,+} − z̄_{k,−}, μ_k = ‖e_k‖, v_k = e_k/μ_k, target β*_k = λ·μ_k. Online, per row
(and per position), the error is α_k = β*_k − v_kᵀz_k; the reference state is the nearest
point on {z : v_kᵀz = β*_k}, so the deviation is δz_k = −α_k v_k.

**Where the LFS is read** (``recipe``). The reference reads every block input at the *last
token* of each text (lqr-activation-steering ``steer/data_handling.py`` L228-260:
``self.X[:, :, -1, :]`` of one prefill pass, left padding), so ``recipe="last"`` is the
default of A-LQR, A-LQR+, S-PID and ActAdd-LFS: the last token of prompt + completion for a
contrastive set, of the text for a labelled (unpaired) set, as the paper's D+ / D− prompt
sets. ``"mean"`` (the completion's mean) and ``"ab"`` (the A/B answer letter) are steerlab's
options; they change both v_k and the absolute target λμ_k, so the paper's λ does not
transfer to them. A block whose class means coincide (μ_k = 0: block 0 at the last token
when every text ends in the same token) gets v_k = 0, β*_k = 0, as in the reference.

**Linearisation.** A_k = ∂[φ_k(Z_k)]_last/∂(z_k)_last, averaged over unsteered forward passes
of positive-class texts (:mod:`steerlab.control.jacobians`; ours perturbs only the last row
against the context's cached keys/values instead of reverse mode over the whole block).

**LQR.** Finite-horizon, time-varying, Q = qI, R = rI, Q_f = q_f I:
S_L = Q_f; K_k = (S_{k+1} + rI)⁻¹ S_{k+1} A_k; S_k = qI + A_kᵀS_{k+1}A_k − A_kᵀS_{k+1}K_k
(:mod:`steerlab.control.riccati`, linear solves only). Control law (paper Eq. 19):
u_k = −K_k δz_k = α_k K_k v_k = α_k w_k. Only w_k = K_k v_k is kept (the full K on request),
so the online cost is one dot product and one scaled add per block and concept (the
reference does a d×d matvec per token and layer; identical result, proved in the tests).

**Scopes.** ``ALQR`` steers the last position of each forward pass (scope ``last``: the last
prompt token, then every generated token). ``ALQRPlus`` applies the same law at every
position (scope ``all``); unlike the reference code, left padding is never steered.

**Several concepts** share K: u_k = Σ_c α_{k,c} w_{k,c}, one (v, μ) and one λ_c per concept.

**Strength** (the rule every method follows, ``docs/strength.md``). λ is a hyper-parameter
(the setpoint β*_k = λμ_k); the runtime strength s scales the feedback and its sign picks the
side of the setpoint: u_k = |s| · K_k v_k (sign(s)·λμ_k − v_kᵀz_k). So s = 1 is the paper's
law with its λ, s = 0 is no control at all (the unsteered model), 0 < s < 1 is a softer gain,
and s = −1 tracks the mirrored target −λμ_k (steering towards the opposite behaviour with
the same closed loop). The same for S-PID (|s| times the PID output on the signed error) and
ActAdd-LFS.

Defaults (spec section 7): q = 0.1, r = 3, q_f = 0.1 (Gemma-2-2B toxicity); λ = 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from steerlab.errors import DataError, SteeringError
from steerlab.methods.base import Preset, StepContext
from steerlab.methods.checks import check_positive, check_recipe, layers_arg

# The LFS and its base class live in methods/lfs.py; they keep this import path.
from steerlab.methods.lfs import LFSController as LFSController
from steerlab.methods.lfs import jacobian_texts as jacobian_texts
from steerlab.methods.lfs import linear_feature_setpoint as linear_feature_setpoint
from steerlab.methods.reading import Collected, Jacobians, ModelLayout, Reading, check_options
from steerlab.models import ModelInfo
from steerlab.sites import Site


class ALQR(LFSController):
    """A-LQR: LQR feedback on every block towards the linear feature setpoint.

    Args:
        q, r, q_f: LQR costs (Q = qI, R = rI, Q_f = q_f I), all positive.
        lambdas: LFS scale λ per concept (target β*_k = λ·μ_k).
        n_jacobian_prompts: positive-class texts whose Jacobians are averaged (fit helper).
        max_tokens: truncation of those texts (24 as in the paper).
        recipe: where the LFS reads each text: ``last`` (the reference's), ``mean`` or ``ab``.
        keep_K: keep the full gains K (L, d, d) in memory and in artifacts.
        scope: default token scope (``last`` for A-LQR, ``all`` for A-LQR+).
    """

    method = "alqr"
    presets: ClassVar[dict[str, Preset]] = {
        "paper": Preset(
            hyperparameters={"q": 0.1, "r": 3.0, "q_f": 0.1, "lambdas": 1.0,
                             "n_jacobian_prompts": 50, "max_tokens": 24, "recipe": "last",
                             "keep_K": False, "scope": "last"},
            source="lqr-activation-steering steer/tox_eval.py L120-123 (Gemma-2-2B toxicity: "
                   "LQR_params [0.1, 3, 0.1], λ=1), steer/toxicity/tox_data_script.py L113 "
                   "(50 Jacobian prompts, max_ctx 24), steer/data_handling.py L260 (LFS at "
                   "the last token), steer/steering.py L398 (all_tokens=False)",
        ),
    }

    def __init__(
        self,
        *,
        q: float = 0.1,
        r: float = 3.0,
        q_f: float = 0.1,
        lambdas: float | Sequence[float] = 1.0,
        n_jacobian_prompts: int = 32,
        max_tokens: int = 24,
        recipe: str = "last",
        keep_K: bool = False,
        scope: str = "last",
    ) -> None:
        super().__init__(lambdas, scope)
        self.q = check_positive("q", q)
        self.r = check_positive("r", r)
        self.q_f = check_positive("q_f", q_f)
        if n_jacobian_prompts < 1 or max_tokens < 2:
            raise SteeringError("n_jacobian_prompts must be >= 1 and max_tokens >= 2")
        check_recipe(recipe)
        self.n_jacobian_prompts = int(n_jacobian_prompts)
        self.max_tokens = int(max_tokens)
        self.recipe = recipe
        self.keep_K = bool(keep_K)
        self.w = torch.empty(0)
        self.K: torch.Tensor | None = None
        self.A: torch.Tensor | None = None  # the Jacobians of the last fit (not saved)
        # per device: (cast v, cast w, per-block views of both), see _block
        self._views: dict[torch.device, tuple[torch.Tensor, torch.Tensor,
                                              list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def reading(self, model: ModelLayout, data: Any, *,
                jacobian_data: Sequence[str] | None = None, **options: Any) -> Reading:
        """The LFS reading of each concept, and the block Jacobians along ``jacobian_data``
        (default: the first concept's first ``n_jacobian_prompts`` positive texts)."""
        check_options(self.method, options, ("jacobian_data",))
        reading = super().reading(model, data)
        assert reading.sets is not None
        texts = list(jacobian_data) if jacobian_data is not None else jacobian_texts(
            reading.sets[0], self.n_jacobian_prompts)
        reading.jacobians = Jacobians(texts, self.max_tokens)
        return reading

    def fit_collected(self, collected: Collected) -> ALQR:
        return self.fit(collected.stacked_concepts(), collected.extra["jacobians"])

    def record_fit(self, info: ModelInfo, collected: Collected,
                   estimator_seconds: float) -> None:
        t_collect = collected.seconds.get("collect", 0.0)
        t_jac = collected.seconds.get("jacobians", 0.0)
        assert collected.reading.jacobians is not None
        self.record_data(
            info, collected,
            collect_seconds=round(t_collect, 3),
            jacobian_seconds=round(t_jac, 3),
            jacobian_prompts=len(collected.reading.jacobians.texts),
            fit_seconds=round(t_collect + t_jac + estimator_seconds, 3),
        )

    def fit(
        self, concepts: Sequence[tuple[torch.Tensor, torch.Tensor]], A: torch.Tensor
    ) -> ALQR:
        """Learn the setpoint(s) and the gains.

        Args:
            concepts: per concept, (positive, negative) block-input activations (N, L, d).
            A: averaged block Jacobians (L, d, d).
        """
        from steerlab.control.riccati import lqr_gains

        v, mu = self.fit_setpoint(concepts)
        if A.ndim != 3 or A.shape[0] != v.shape[1] or A.shape[1:] != (v.shape[2], v.shape[2]):
            raise DataError(
                f"Jacobians of shape {tuple(A.shape)} do not match {v.shape[1]} layers of width "
                f"{v.shape[2]}"
            )
        gains = lqr_gains(A.to(torch.float32), v, q=self.q, r=self.r, q_f=self.q_f,
                          keep_K=self.keep_K)
        self.set_setpoint(v, mu)
        self.w = gains.W.to(torch.float32)
        self.K = gains.K if self.keep_K else None
        self.A = A.to(torch.float32)
        self.fit_info.update(riccati_seconds=round(gains.seconds, 3),
                             riccati_cond_max=float(gains.cond_max),
                             mu=[[round(float(x), 4) for x in row] for row in mu])
        return self

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        # u_k = |s|·α_k w_k with α_k = sign(s)·λμ_k − v_kᵀz_k: the operations of
        # alpha() and gain(), with what depends only on the strengths (the targets of every
        # block, |s|) computed once per forward pass (:meth:`_law`) and the per-block views
        # of v and w made once (:meth:`_block`), since this runs at every block.
        self._check_width(h)
        k = site.layer
        z = self._read(ctx, k)
        target, gain = self._law(strength, z, ctx)
        v_t, w = self._block(k, z)
        alpha = target[:, k, None, :] - z.to(torch.float32) @ v_t  # (B, T, C)
        return (h.to(torch.float32) + gain * (alpha @ w)).to(h.dtype)

    def _law(self, strength: torch.Tensor, ref: torch.Tensor, ctx: StepContext
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """sign(s)·λ_c·μ_{k,c} for every block, (B, L, C), and |s| (B, 1, 1), in float32:
        the same numbers as :meth:`alpha`'s target and :meth:`gain`, kept in the pass's
        scratch for this very strength tensor."""
        key = ("alqr.law", id(self))
        hit = ctx.scratch.get(key)
        if hit is not None and hit[0] is strength and hit[1].device == ref.device:
            return hit[1], hit[2]
        s = strength.to(device=ref.device, dtype=torch.float32)
        lam = self._get("lam", torch.tensor(self.lambdas), ref)  # (C,)
        lam_mu = lam[:, None] * self._get("mu", self.mu, ref)  # (C, L)
        target = torch.sign(s)[:, None, None] * lam_mu.T[None, :, :]
        gain = s.abs()[:, None, None]
        ctx.scratch[key] = (strength, target, gain)
        return target, gain

    def _block(self, k: int, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v_kᵀ (d, C) and w_k (C, d), float32 views on ``ref``'s device, made once per
        pair of cast tensors."""
        v, w = self._get("v", self.v, ref), self._get("w", self.w, ref)
        views = self._views.get(ref.device)
        if views is None or views[0] is not v or views[1] is not w:
            views = (v, w, [(v[:, j, :].T, w[:, j, :]) for j in range(v.shape[1])])
            self._views[ref.device] = views
        return views[2][k]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {**self.base_state(), "w": self.w.contiguous()}
        if self.K is not None:
            out["K"] = self.K.contiguous()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        self.set_setpoint(tensors["v"], tensors["mu"])
        self.w = tensors["w"].to(torch.float32)
        self.K = tensors.get("K")
        if self.w.shape != self.v.shape:
            raise DataError(f"w has shape {tuple(self.w.shape)}, v {tuple(self.v.shape)}")


class ALQRPlus(ALQR):
    """A-LQR+: the A-LQR law at every real position (never padding); see the module doc."""

    method = "alqr_plus"
    presets: ClassVar[dict[str, Preset]] = {
        "paper": Preset(
            hyperparameters={"q": 0.2, "r": 7.0, "q_f": 0.2, "lambdas": 1.0,
                             "n_jacobian_prompts": 50, "max_tokens": 24, "recipe": "last",
                             "keep_K": False, "scope": "all"},
            source="lqr-activation-steering steer/refusal/ref_asr_script.py L108-111 (λ=1, "
                   "q=0.2, r=7, q_f=0.2) and L176 (all_tokens=True), "
                   "steer/refusal/ref_data_script.py L217 (50 Jacobian prompts, max_ctx 24)",
        ),
    }

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("scope", "all")
        super().__init__(**kwargs)


class SPID(LFSController):
    """S-PID, the A-LQR paper's baseline: a PID controller on the LFS error over depth.

    e_k = Σ_c α_{k,c} v_{k,c} (the LFS error vector at block input k), and
    u_k = K_p e_k + K_i I_k + K_d (e_k − e_prev), following the reference's hook
    (lqr-activation-steering ``steer/PIDsteering.py`` L166-196, state initialised per
    generate call at L371-372):

    * **integral**: I_k = I_{k−1} + e_k, except at a reset layer (k ≡ 0 mod ``reset_every``)
      where I_k = 0, so the next window starts with e_{k₀+1} (L172-175: ``e_sum += e`` then
      zeroed). Block 0 is a reset layer, so the integral never crosses forward passes.
    * **derivative**: e_prev is the error of the previous steered block; at block 0 it is the
      previous forward pass's last-block error e_{L−1} of the same row (the reference's
      ``self.e_prev`` lives across decode steps), and zero in the first pass of a generation
      (L372). The runtime carries it per row in :attr:`StepContext.carry`, which starts empty
      at every steering context (one per generate call) and, in the server, per request.

    The reference decodes one token per forward pass with the KV cache (``use_cache=True``)
    and steers ``input[0][:, -1, :]``; its ``self.e_prev`` is a (B, d) tensor, i.e. per row,
    as here. Ours keys the carried error by position so that the rule is a property of the
    tokens, not of how the passes are cut: the token at position p uses e_{L−1} of position
    p−1 when p−1 was the last steered token of an earlier pass, else 0. That is the
    reference's rule for cached decoding, and it makes generation without a KV cache (each
    pass recomputing every position) give the same tokens; in a pass that steers several
    positions (a prefill with scope ``all``), those positions start from 0.
    """

    method = "spid"
    presets: ClassVar[dict[str, Preset]] = {
        "paper": Preset(
            hyperparameters={"kp": 0.7, "ki": 0.01, "kd": 0.1, "reset_every": 10,
                             "lambdas": 1.0, "recipe": "last", "scope": "last"},
            source="A-LQR paper S-PID baseline, Gemma-2-2B gains (0.7, 0.01, 0.1), λ=1: "
                   "lqr-activation-steering steer/toxicity/test_toxicityPID.py run_trials, "
                   "steer/PIDsteering.py L174 (reset every 10 layers); LFS at the last token "
                   "(steer/data_handling.py L260)",
        ),
    }

    def __init__(
        self,
        *,
        kp: float = 0.7,
        ki: float = 0.01,
        kd: float = 0.1,
        reset_every: int = 10,
        lambdas: float | Sequence[float] = 1.0,
        recipe: str = "last",
        scope: str = "last",
    ) -> None:
        super().__init__(lambdas, scope)
        self.kp = check_positive("kp", kp, allow_zero=True)
        self.ki = check_positive("ki", ki, allow_zero=True)
        self.kd = check_positive("kd", kd, allow_zero=True)
        if reset_every < 1:
            raise SteeringError("reset_every must be >= 1")
        self.reset_every = int(reset_every)
        self.recipe = recipe

    def fit(self, concepts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> SPID:
        self.set_setpoint(*self.fit_setpoint(concepts))
        return self

    def _carried(self, ctx: StepContext, like: torch.Tensor) -> torch.Tensor:
        """e_prev at the first block, (B, T, d): for the token at position p, the last-block
        error of position p−1 when that was the last steered token of an earlier forward
        pass of the same row (decoding one token per pass, as the reference does), else 0."""
        out = torch.zeros_like(like)
        rows = ctx.carry
        if not rows or len(rows) != like.shape[0]:
            return out
        key = (id(self), "e_last")
        pos = ctx.positions
        for b, row in enumerate(rows):
            store = row.get(key)
            if not store:
                continue
            for t, p in enumerate(pos[b].tolist()):
                prev = store.get(p - 1) if p > 0 else None
                if prev is not None:
                    out[b, t] = prev.to(device=like.device, dtype=like.dtype)
        return out

    def _store_last(self, ctx: StepContext, e: torch.Tensor) -> None:
        """Keep each row's last steered token's last-block error, keyed by its position."""
        rows = ctx.carry
        if not rows or len(rows) != e.shape[0]:
            return
        key = (id(self), "e_last")
        pos = ctx.positions
        sel = pos >= 0 if ctx.steered is None else ctx.steered.to(pos.device) & (pos >= 0)
        has = sel.any(dim=1).tolist()
        last = (sel.long() * torch.arange(1, sel.shape[1] + 1, device=sel.device)).argmax(1)
        for b, row in enumerate(rows):
            if has[b]:
                t = int(last[b])
                row.setdefault(key, {})[int(pos[b, t])] = e[b, t].detach().clone()

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        self._check_width(h)
        k = site.layer
        alpha = self.alpha(k, self._read(ctx, k), strength)
        e = alpha @ self._get("v", self.v, h)[:, k, :]  # (B, T, d)
        state = ctx.scratch.setdefault(id(self), {})
        chained = state.get("k") == k - 1
        prev = state["e"] if chained else self._carried(ctx, e)
        if k % self.reset_every == 0:
            integral = torch.zeros_like(e)
        else:
            integral = state["I"] + e if chained else e
        state.update(k=k, e=e, I=integral)
        u = self.gain(strength, h) * (self.kp * e + self.ki * integral + self.kd * (e - prev))
        if k == self.num_layers - 1:
            self._store_last(ctx, e)
        return (h.to(torch.float32) + u).to(h.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.base_state()

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        self.set_setpoint(tensors["v"], tensors["mu"])


class ActAddLFS(LFSController):
    """ActAdd-LFS, the A-LQR paper's baseline: a P-controller on the LFS error at chosen
    layers, u_k = K_p Σ_c α_{k,c} v_{k,c} for k in ``layers`` (no model, no feedback across
    layers beyond what the forward pass propagates)."""

    method = "actadd_lfs"

    def __init__(
        self,
        layers: Sequence[int] | int = (8,),
        *,
        kp: float = 1.0,
        lambdas: float | Sequence[float] = 1.0,
        recipe: str = "last",
        scope: str = "last",
    ) -> None:
        super().__init__(lambdas, scope)
        self.layers = layers_arg(layers)
        self.kp = check_positive("kp", kp)
        self.recipe = recipe

    def steered_layers(self) -> list[int]:
        n = self.num_layers
        return sorted({k + n if k < 0 else k for k in self.layers}) if n else []

    def fit(self, concepts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> ActAddLFS:
        v, mu = self.fit_setpoint(concepts)
        n = v.shape[1]
        bad = [k for k in self.layers if not -n <= k < n]
        if bad:
            raise SteeringError(f"layers {bad} out of range for {n} blocks")
        self.set_setpoint(v, mu)
        return self

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        self._check_width(h)
        k = site.layer
        alpha = self.alpha(k, self._read(ctx, k), strength)
        u = self.gain(strength, h) * self.kp * (alpha @ self._get("v", self.v, h)[:, k, :])
        return (h.to(torch.float32) + u).to(h.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.base_state()

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        self.set_setpoint(tensors["v"], tensors["mu"])
