"""SAS: sparse activation steering in a sparse autoencoder's feature space.

Bayat, Rahimi-Kalahroudi, Pezeshki, Chandar, Vincent, "Steering Large Language Model
Activations in Sparse Spaces" (arXiv 2503.00177); spec ``specs/methods.md`` §c.

**This is steerlab's reconstruction: no official code exists** (the authors' repository
``chandar-lab/SAS`` holds only a README, "Code: Coming soon"). The algorithm below follows
the paper's figure-1 caption and Algorithms 1/2 as quoted by two independent
re-implementations; τ and the steered position are ours. Results of this controller are
results of steerlab's reconstruction.

**Vector (Algorithm 1).** With the SAE encoder f, encode the positive and negative examples'
layer-ℓ activations (one row each, at the recipe's position: the answer letter for A/B sets,
as CAA) into S⁺ (N⁺ × m) and S⁻ (N⁻ × m). For each side and feature c, let R[c] be the rows
where S[·, c] ≠ 0; keep c if |R[c]|/N ≥ τ and set v[c] = mean of S[R[c], c] (the mean over the
non-zero rows only), else 0. Features kept on both sides are dropped from both
(C = {c : v⁺[c] ≠ 0 ∧ v⁻[c] ≠ 0}, v⁺[C] = v⁻[C] = 0), and v = v⁺ − v⁻: positive on features
to reinforce, negative on features to suppress. ``feature_ids``/``feature_values`` list the
non-zero entries.

**Steering (Algorithm 2).** At every steered token, s = f(a), Δ = a − â(s) (the
reconstruction error, kept), a′ = â(σ(s + λv)) + Δ, with σ the SAE's activation function
(ReLU, the JumpReLU gate, or TopK), so λ = 0 leaves the model exactly unchanged (those rows
are returned bit for bit) and λ < 0 suppresses the behaviour.

**Faster, same result (ours).** The decoder is affine, so
a′ = a + (σ(s + λv) − s)·W_dec: one encode and one decode of a difference instead of two
decodes. For ReLU and JumpReLU SAEs, σ(s) = s where v = 0 (s is already an activation), so the
difference is zero outside the support of v and only those columns of W_enc and rows of W_dec
are used: the cost is O(d·|supp v|) per token instead of O(d·m). TopK SAEs need the full
encoder (the top k depends on every feature), but σ(s + λv) − s is non-zero on at most 2k
features per row, so only the decoder rows of the features it touches are read. A test checks
every architecture against the literal formula.

**Composition.** :meth:`SAS.compose` adds several SAS vectors of the same SAE in sparse space
(with weights), giving one controller: σ(s + Σ λᵢvᵢ).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar, Literal, Self

import torch

from steerlab.errors import DataError, SteeringError
from steerlab.methods.additive import Recipe as Recipe
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.cast_cache import CastCache, cached
from steerlab.methods.checks import RECIPES as RECIPES
from steerlab.methods.checks import (
    check_finite_strengths,
    check_recipe,
    check_sae_site,
    check_site_kind,
    check_tau,
    check_width,
)
from steerlab.methods.reading import Collected, ModelLayout, Reading, check_options
from steerlab.models import ModelInfo
from steerlab.sae import SAEConfig, SparseAutoencoder, load_saelens
from steerlab.sites import Site


def sas_vector(S_pos: torch.Tensor, S_neg: torch.Tensor,
               tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v, v⁺, v⁻) from sparse codes S⁺ (N⁺, m) and S⁻ (N⁻, m) with frequency threshold τ."""
    check_tau(tau)

    def side(S: torch.Tensor) -> torch.Tensor:
        nz = S != 0
        count = nz.sum(0)
        keep = count.to(torch.float64) / S.shape[0] >= tau
        keep &= count > 0
        mean_nz = torch.where(nz, S, torch.zeros_like(S)).sum(0) / count.clamp_min(1)
        return torch.where(keep, mean_nz, torch.zeros_like(mean_nz))

    v_pos, v_neg = side(S_pos.to(torch.float32)), side(S_neg.to(torch.float32))
    shared = (v_pos != 0) & (v_neg != 0)
    v_pos = torch.where(shared, torch.zeros_like(v_pos), v_pos)
    v_neg = torch.where(shared, torch.zeros_like(v_neg), v_neg)
    return v_pos - v_neg, v_pos, v_neg


class SAS(Controller):
    """Sparse activation steering (see the module docstring for the equations).

    Args:
        layer: block whose output (``site="resid_post"``) is steered; must match the SAE's.
        sae: a :class:`~steerlab.sae.SparseAutoencoder`, or a path to a SAELens folder.
        tau: frequency threshold τ ∈ [0, 1].
        recipe: position of the example activations (``"ab"`` answer letter, ``"last"``,
            ``"mean"`` completion mean), as CAA's recipes.
        embed_sae: save the SAE's weights in the artifact (default); otherwise the artifact
            records ``sae_path`` and loads the SAE from there.
        scope: default token scope.
    """

    method: ClassVar[str] = "sas"

    def __init__(
        self,
        layer: int = 15,
        *,
        sae: SparseAutoencoder | str | None = None,
        sae_path: str | None = None,
        sae_config: dict[str, Any] | None = None,
        tau: float = 0.1,
        recipe: Recipe = "ab",
        site: Literal["resid_post"] = "resid_post",
        embed_sae: bool = True,
        scope: str = "from:-1",
    ) -> None:
        super().__init__()
        check_site_kind(site, "sas steers", allowed=("resid_post",))
        check_recipe(recipe)
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise SteeringError(f"layer must be a non-negative integer, got {layer!r}")
        self.layer = layer
        self.site = site
        self.tau = check_tau(tau)
        self.recipe: Recipe = recipe
        self.embed_sae = bool(embed_sae)
        self._set_scope(scope)
        if isinstance(sae, str):
            sae_path, sae = sae, None
        self.sae_path = sae_path
        self.sae: SparseAutoencoder | None = sae
        if self.sae is None and sae_path is not None and sae_config is None:
            self.sae = load_saelens(sae_path)
        self._sae_config = sae_config
        if self.sae is not None:
            check_sae_site(self.sae.config.site, Site(self.site, self.layer))
        # learned state
        self.vector: torch.Tensor | None = None  # v (m,)
        self.v_pos: torch.Tensor | None = None
        self.v_neg: torch.Tensor | None = None
        self._cache: CastCache[dict[str, Any]] = {}

    # -- estimator -----------------------------------------------------------------------------
    def fit_sites(self) -> list[Site]:
        return [Site(self.site, self.layer)]

    def _require_sae(self) -> SparseAutoencoder:
        if self.sae is None:
            raise SteeringError("SAS needs an SAE: pass sae= (an SAE or a SAELens folder)")
        return self.sae

    def reading(self, model: ModelLayout, data: Any, **options: Any) -> Reading:
        """The positive and negative examples of a contrastive set at the SAE's site, at the
        recipe's position (as CAA reads them); an SAE of another width is refused first."""
        check_options(self.method, options)
        sites = self.bind_sites(model, write_back=False)
        sae = self._require_sae()
        if sae.config.d_in != model.hidden_size:
            raise DataError(f"the SAE reads width {sae.config.d_in} but {model.info.model_id} "
                            f"has hidden size {model.hidden_size}")
        return Reading(sites=sites, recipe=self.recipe, data="pairs")

    def fit_collected(self, collected: Collected) -> Self:
        site = collected.reading.sites[0]
        return self.fit(collected.positive[site], collected.negative[site])

    def record_fit(self, info: ModelInfo, collected: Collected,
                   estimator_seconds: float) -> None:
        self.record_data(info, collected,
                         collect_seconds=round(collected.seconds.get("collect", 0.0), 3))

    def fit(self, positive: torch.Tensor, negative: torch.Tensor) -> Self:
        """Build v from positive (N⁺, d) and negative (N⁻, d) activations at the site."""
        start = time.perf_counter()
        sae = self._require_sae()
        for name, x in (("positive", positive), ("negative", negative)):
            if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] == 0:
                raise DataError(f"the {name} activations must be a non-empty (N, d) tensor")
            if not bool(torch.isfinite(x).all()):
                raise DataError(f"the {name} activations have non-finite values (NaN or inf)")
            sae.check_input(x)
        with torch.no_grad():
            S_pos = sae.encode(positive.to(torch.float32).cpu())
            S_neg = sae.encode(negative.to(torch.float32).cpu())
        v, v_pos, v_neg = sas_vector(S_pos, S_neg, self.tau)
        if not bool((v != 0).any()):
            fp = (S_pos != 0).float().mean(0).max().item()
            fn = (S_neg != 0).float().mean(0).max().item()
            raise SteeringError(
                f"no SAE feature survives τ = {self.tau:g} on one side only (the most frequent "
                f"feature fires on {fp:.0%} of positive and {fn:.0%} of negative examples); "
                f"use a lower tau"
            )
        self.vector, self.v_pos, self.v_neg = v, v_pos, v_neg
        self.sites = self.fit_sites()
        self._cache.clear()
        self.fit_info.update(
            fit_seconds=round(time.perf_counter() - start, 3),
            n_positive=int(positive.shape[0]),
            n_negative=int(negative.shape[0]),
            n_features=int((v != 0).sum()),
            n_reinforced=int((v > 0).sum()),
            n_suppressed=int((v < 0).sum()),
            sae_width=int(sae.config.d_sae),
        )
        return self

    @classmethod
    def compose(cls, parts: Sequence[tuple[SAS, float]]) -> SAS:
        """One SAS whose vector is Σ wᵢ vᵢ over fitted SAS controllers of the same SAE."""
        if not parts:
            raise SteeringError("compose needs at least one (SAS, weight) pair")
        first = parts[0][0]
        first.check_fitted()
        sae = first._require_sae()
        total = torch.zeros_like(first.vector) if first.vector is not None else None
        assert total is not None
        for c, w in parts:
            c.check_fitted()
            if c.sites != first.sites:
                raise SteeringError(f"cannot compose SAS at {c.sites} and {first.sites}")
            other = c._require_sae()
            if other is not sae and not all(
                    torch.equal(a, b) for a, b in zip(other.state_dict().values(),
                                                     sae.state_dict().values(), strict=True)):
                raise SteeringError("cannot compose SAS vectors of different SAEs")
            assert c.vector is not None
            total = total + float(w) * c.vector
        out = cls(first.layer, sae=sae, tau=first.tau, recipe=first.recipe,
                  embed_sae=first.embed_sae, scope=first.scope)
        out.sae_path = first.sae_path
        out.vector = total
        out.sites = list(first.sites)
        out.model_info = first.model_info
        out.fit_info = {"composed_of": len(parts), "n_features": int((total != 0).sum())}
        return out

    # -- inspection ----------------------------------------------------------------------------
    @property
    def feature_ids(self) -> list[int]:
        """Ids of the features v touches, by decreasing |v|."""
        self.check_fitted()
        assert self.vector is not None
        nz = torch.nonzero(self.vector).reshape(-1)
        order = torch.argsort(self.vector[nz].abs(), descending=True)
        return [int(i) for i in nz[order]]

    @property
    def feature_values(self) -> list[float]:
        assert self.vector is not None
        return [float(self.vector[i]) for i in self.feature_ids]

    # -- run time ------------------------------------------------------------------------------
    def _device_state(self, device: torch.device) -> dict[str, Any]:
        """The SAE's weights that steering reads, on ``device`` (cached per device)."""
        def make() -> dict[str, Any]:
            sae = self._require_sae()
            assert self.vector is not None
            W_enc = sae.W_enc.detach()
            W_dec = sae.decoder_weight().detach()
            st: dict[str, Any] = {
                "arch": sae.config.architecture,
                "b_dec_in": sae.b_dec.detach() if sae.config.apply_b_dec_to_input else None}
            if st["arch"] in ("relu", "jumprelu"):
                idx = torch.nonzero(self.vector).reshape(-1)
                st.update(W_enc=W_enc[:, idx].contiguous(), b_enc=sae.b_enc.detach()[idx],
                          W_dec=W_dec[idx].contiguous(), v=self.vector[idx],
                          threshold=(sae.threshold().detach()[idx]
                                     if st["arch"] == "jumprelu" else None))
            else:
                st.update(v=self.vector)
            st = {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in st.items()}
            st["sae"] = sae if device == torch.device("cpu") else copy.deepcopy(sae).to(device)
            return st

        return cached(self._cache, device, make)

    def transport(self, rows: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """a′ = a + (σ(f(a) + λv) − f(a))·W_dec for float32 rows (N, d), λ (N,)."""
        st = self._device_state(rows.device)
        if st["arch"] == "topk":
            sae: SparseAutoencoder = st["sae"]
            s = sae.encode(rows)
            diff = sae.activation(s + lam[:, None] * st["v"]) - s
            # the difference is sparse (at most 2k features per row): decode only those rows
            touched = torch.nonzero(diff.abs().amax(0)).reshape(-1)
            return rows + diff[:, touched] @ sae.decoder_weight()[touched]
        x = rows - st["b_dec_in"] if st["b_dec_in"] is not None else rows
        pre = x @ st["W_enc"] + st["b_enc"]
        if st["arch"] == "relu":
            s = torch.relu(pre)
            new = torch.relu(s + lam[:, None] * st["v"])
        else:
            thr = st["threshold"]
            s = pre * (pre > thr)
            moved = s + lam[:, None] * st["v"]
            new = moved * (moved > thr)
        return rows + (new - s) @ st["W_dec"]

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        self.check_fitted()
        sae = self._require_sae()
        d = sae.config.d_in
        check_width(f"sas at {site}: the SAE reads width", d, h)
        lam = strength.to(device=h.device, dtype=torch.float32).reshape(-1)
        check_finite_strengths(lam)
        if not bool((lam != 0).any()):
            return h
        rows = h.reshape(-1, d)
        lam_rows = lam.reshape(-1, *([1] * (h.ndim - 2))).expand(h.shape[:-1]).reshape(-1)
        with torch.no_grad():
            moved = self.transport(rows.to(torch.float32), lam_rows)
        out = torch.where((lam_rows == 0)[:, None], rows, moved.to(h.dtype))
        return out.reshape(h.shape)

    # -- artifacts -----------------------------------------------------------------------------
    def hyperparameters(self) -> dict[str, Any]:
        # Not the constructor's arguments as given: the SAE object is not JSON, so it is
        # recorded as its config (``sae_config``), and ``sae_path`` only when the weights are
        # not embedded (the artifact then loads the SAE from there).
        cfg = self._sae_config
        if self.sae is not None:
            cfg = asdict(self.sae.config)
        return {"layer": self.layer, "site": self.site, "tau": self.tau, "recipe": self.recipe,
                "embed_sae": self.embed_sae, "scope": self.scope,
                "sae_path": self.sae_path if not self.embed_sae else None, "sae_config": cfg}

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.check_fitted()
        assert self.vector is not None
        out = {"vector": self.vector}
        if self.v_pos is not None and self.v_neg is not None:
            out.update(v_pos=self.v_pos, v_neg=self.v_neg)
        if self.embed_sae:
            sae = self._require_sae()
            out.update({f"sae.{k}": v.detach().contiguous() for k, v in
                        sae.state_dict().items()})
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        if len(sites) != 1:
            raise SteeringError(f"sas steers one site, got {[str(s) for s in sites]}")
        if "vector" not in tensors:
            raise SteeringError("the saved SAS state has no vector")
        sae_state = {k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}
        if sae_state:
            if self._sae_config is None:
                raise SteeringError("the artifact embeds an SAE but records no sae_config")
            sae = SparseAutoencoder(SAEConfig(**self._sae_config))
            try:
                sae.load_state_dict(sae_state, strict=True)
            except RuntimeError as exc:
                raise SteeringError(f"the embedded SAE does not match its config: {exc}") from exc
            self.sae = sae
        elif self.sae is None:
            if self.sae_path is None:
                raise SteeringError("the artifact neither embeds an SAE nor names its folder")
            self.sae = load_saelens(self.sae_path)
        vector = tensors["vector"].to(torch.float32)
        if vector.shape != (self.sae.config.d_sae,):
            raise SteeringError(
                f"the SAS vector has shape {tuple(vector.shape)} but the SAE has "
                f"{self.sae.config.d_sae} features"
            )
        self.vector = vector
        self.v_pos, self.v_neg = tensors.get("v_pos"), tensors.get("v_neg")
        self.sites = list(sites)
        self._cache.clear()


class SAEReconstruction(Controller):
    """Replace the activation by the SAE's reconstruction â(f(a)) (strength ≠ 0 rows): used to
    measure the model's loss with the reconstruction spliced in. Not a steering method."""

    method: ClassVar[str] = "sae_reconstruction"

    def __init__(self, sae: SparseAutoencoder, site: Site) -> None:
        super().__init__()
        self.sae = sae
        self.sites = [site]

    def steer(self, site: Site, h: torch.Tensor, strength: torch.Tensor,
              ctx: StepContext) -> torch.Tensor:
        with torch.no_grad():
            recon = self.sae(h.to(torch.float32)).to(h.dtype)
        keep = (strength.to(h.device) == 0).reshape(-1, *([1] * (h.ndim - 1)))
        return torch.where(keep, h, recon)

    def hyperparameters(self) -> dict[str, Any]:
        # A measurement tool, never saved: its arguments (an SAE object and a site) are not
        # JSON hyper-parameters.
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise SteeringError("SAEReconstruction is a measurement tool, not saved as an artifact")

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        raise SteeringError("SAEReconstruction is a measurement tool, not loaded from artifacts")
