"""The INNSteer controller: training the flow φ, the latent steering vector, and the
steering z′ = φ(h) + λv, h′ = φ⁻¹(z′). See :mod:`steerlab.methods.inn`."""

from __future__ import annotations

import copy
import math
import time
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch
from torch import nn

from steerlab.errors import SteeringError
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.cast_cache import CastCache, cached
from steerlab.methods.checks import (
    check_batch_strengths,
    check_count,
    check_finite_strengths,
    check_positive,
    check_site_kind,
    check_width,
    splittable_rows,
)
from steerlab.methods.inn.flow import MASKS, LatentFlow, MaskKind
from steerlab.methods.reading import (
    Collected,
    ModelLayout,
    Reading,
    check_options,
    split_classes,
)
from steerlab.models import ModelInfo
from steerlab.sites import Site

Separation = Literal["logistic", "margin"]
Direction = Literal["mean_diff", "probe"]
Monitor = Literal["separation", "loss"]
MONITORS: tuple[str, ...] = ("separation", "loss")
SEPARATIONS: tuple[str, ...] = ("logistic", "margin")
DIRECTIONS: tuple[str, ...] = ("mean_diff", "probe")
# Default weight of the Gaussian NLL term (ours: the paper's loss is unknown and the recipe has
# no NLL weight; with 1 the density term slows the separation, see docs/innsteer.md).
NLL_WEIGHT = 0.1


# -- training ----------------------------------------------------------------------------------
def _split(n: int, fraction: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(n, generator=g)
    n_val = max(1, round(n * fraction)) if n >= 4 and fraction > 0 else 0
    return idx[n_val:], idx[:n_val]


class INNSteer(Controller):
    """INNSteer: z′ = φ(h) + λv, h′ = φ⁻¹(z′) (see the module docstring for the equations).

    steerlab's reconstruction: no official code exists, and the loss, the training and the
    defaults below are ours or a third-party recipe's, not the paper's.

    Args:
        layer: block whose output (``site="resid_post"``) or input (``"resid_pre"``) is steered.
        n_layers, hidden, hidden_layers, masks: the flow (4 couplings, 512-wide, 2 hidden
            layers, alternating halves).
        separation: ``"logistic"`` (joint linear probe) or ``"margin"``.
        direction: ``"mean_diff"`` (latent class-mean difference) or ``"probe"``.
        nll_weight, sep_weight, logdet_weight: loss weights (0.1, 1, 0.5).
        epochs, batch_size, lr, weight_decay, warmup_epochs, clip: optimisation (300, 64, 1e-3,
            1e-3, 60, 1.0).
        val_fraction, patience: early stopping on a seeded validation split.
        seed: seeds masks, initial weights, splits and batches.
        scope: default token scope.
    """

    method: ClassVar[str] = "innsteer"

    def __init__(
        self,
        layer: int = 15,
        *,
        site: Literal["resid_post", "resid_pre"] = "resid_post",
        n_layers: int = 4,
        hidden: int = 512,
        hidden_layers: int = 2,
        masks: MaskKind = "halves",
        separation: Separation = "logistic",
        direction: Direction = "mean_diff",
        nll_weight: float = NLL_WEIGHT,
        sep_weight: float = 1.0,
        logdet_weight: float = 0.5,
        epochs: int = 300,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        warmup_epochs: int = 60,
        clip: float = 1.0,
        val_fraction: float = 0.1,
        patience: int = 30,
        monitor: Monitor = "separation",
        seed: int = 0,
        scope: str = "last",
    ) -> None:
        super().__init__()
        check_site_kind(site, "innsteer steers")
        if masks not in MASKS:
            raise SteeringError(f"unknown masks {masks!r}; use halves or random")
        if separation not in SEPARATIONS:
            raise SteeringError(f"unknown separation {separation!r}; use logistic or margin")
        if direction not in DIRECTIONS:
            raise SteeringError(f"unknown direction {direction!r}; use mean_diff or probe")
        if direction == "probe" and separation != "logistic":
            raise SteeringError('direction="probe" needs separation="logistic" (the probe)')
        self.layer = check_count("layer", layer, 0)
        self.site = site
        self.n_layers = check_count("n_layers", n_layers)
        self.hidden = check_count("hidden", hidden)
        self.hidden_layers = check_count("hidden_layers", hidden_layers)
        self.masks: MaskKind = masks
        self.separation: Separation = separation
        self.direction: Direction = direction
        self.nll_weight = check_positive("nll_weight", nll_weight, allow_zero=True)
        self.sep_weight = check_positive("sep_weight", sep_weight, allow_zero=True)
        self.logdet_weight = check_positive("logdet_weight", logdet_weight, allow_zero=True)
        if self.nll_weight + self.sep_weight + self.logdet_weight == 0:
            raise SteeringError("at least one loss weight must be positive")
        self.epochs = check_count("epochs", epochs)
        self.batch_size = check_count("batch_size", batch_size)
        self.lr = check_positive("lr", lr)
        self.weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        self.warmup_epochs = check_count("warmup_epochs", warmup_epochs, 0)
        self.clip = check_positive("clip", clip)
        self.val_fraction = check_positive("val_fraction", val_fraction, allow_zero=True)
        if self.val_fraction >= 1:
            raise SteeringError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.patience = check_count("patience", patience)
        if monitor not in MONITORS:
            raise SteeringError(f"unknown monitor {monitor!r}; use separation or loss")
        self.monitor: Monitor = monitor
        self.seed = int(seed)
        self._set_scope(scope)
        # learned state
        self.flow: LatentFlow | None = None
        self.steering_vector: torch.Tensor | None = None  # v (d,)
        self.mean_diff: torch.Tensor | None = None  # mean φ(h₊) − mean φ(h₋) (d,)
        self.probe_weight: torch.Tensor | None = None  # (d,), logistic separation only
        self.probe_bias: torch.Tensor | None = None  # (1,)
        self.history: dict[str, list[float]] = {}
        self._on_device: CastCache[tuple[LatentFlow, torch.Tensor]] = {}

    # -- estimator -----------------------------------------------------------------------------
    def make_flow(self, features: int) -> LatentFlow:
        return LatentFlow(features, self.n_layers, self.hidden, self.hidden_layers, self.masks,
                          self.seed)

    def fit_sites(self) -> list[Site]:
        """The one site whose activations :meth:`fit` expects (and :meth:`steer` steers)."""
        return [Site(self.site, self.layer)]

    def _separation_loss(self, z: torch.Tensor, y: torch.Tensor,
                         probe: nn.Linear | None) -> torch.Tensor:
        if self.separation == "logistic":
            assert probe is not None
            return nn.functional.binary_cross_entropy_with_logits(probe(z).squeeze(-1), y)
        pos, neg = z[y == 1], z[y == 0]
        if pos.shape[0] == 0 or neg.shape[0] == 0:
            return z.new_zeros(())
        mp, mn = pos.mean(0), neg.mean(0)
        u = (mp - mn).detach()
        u = u / (u.norm() + 1e-12)
        proj = (z - 0.5 * (mp + mn)) @ u
        sign = 2 * y - 1
        return torch.relu(1 - sign * proj).mean()

    def _loss(self, flow: LatentFlow, probe: nn.Linear | None, x: torch.Tensor,
              y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, separation term) on rows ``x`` with labels ``y``."""
        z0 = (x - flow.mean) / flow.std
        z, ladj = flow.coupling_transform().call_and_ladj(z0)
        d = x.shape[1]
        sep = self._separation_loss(z, y, probe)
        loss = self.sep_weight * sep
        if self.nll_weight:
            loss = loss + self.nll_weight * ((0.5 * z.pow(2).sum(1) - ladj) / d).mean()
        if self.logdet_weight:
            loss = loss + self.logdet_weight * (ladj / d).pow(2).mean()
        return loss, sep

    # -- the fit side --------------------------------------------------------------------------
    def reading(self, model: ModelLayout, data: Any, *, test_fraction: float = 0.2,
                seed: int = 0, **options: Any) -> Reading:
        """Last-token activations of both classes at the site. Fit options: the flow is
        trained on a train split seeded with ``seed``; on the rest (``test_fraction`` of each
        class) ``fit_info`` records held-out probe accuracies on the raw activations, on the
        latents z = φ(h) and of the jointly trained latent probe."""
        check_options(self.method, options, ("test_fraction", "seed"))
        return Reading(sites=self.bind_sites(model, write_back=False), recipe="last",
                       data="labelled", options={"test_fraction": test_fraction, "seed": seed})

    def fit_collected(self, collected: Collected) -> Self:
        """``fit`` on the train rows; the held-out figures go to ``figures``."""
        site = collected.reading.sites[0]
        seed = collected.reading.options["seed"]
        (pos_tr, pos_te), (neg_tr, neg_te) = split_classes(
            collected.positive[site], collected.negative[site],
            collected.reading.options["test_fraction"], seed)
        t0 = time.perf_counter()
        self.fit(pos_tr, neg_tr, progress=collected.progress)
        collected.seconds["estimator"] = time.perf_counter() - t0
        fi = collected.figures
        fi["n_train"] = [int(pos_tr.shape[0]), int(neg_tr.shape[0])]
        if pos_te.shape[0] and neg_te.shape[0]:
            fi["n_heldout"] = [int(pos_te.shape[0]), int(neg_te.shape[0])]
            fi["heldout_raw_probe_accuracy"] = round(
                linear_probe_accuracy(pos_tr, neg_tr, pos_te, neg_te, seed=seed), 4)
            zs = [self.encode(x) for x in (pos_tr, neg_tr, pos_te, neg_te)]
            fi["heldout_latent_probe_accuracy"] = round(linear_probe_accuracy(*zs, seed=seed),
                                                        4)
            if self.probe_weight is not None:
                fi["heldout_joint_probe_accuracy"] = round(self.probe_accuracy(pos_te, neg_te),
                                                           4)
        return self

    def record_fit(self, info: ModelInfo, collected: Collected,
                   estimator_seconds: float) -> None:
        self.record_data(info, collected,
                         collect_seconds=round(collected.seconds.get("collect", 0.0), 3),
                         flow_fit_seconds=round(estimator_seconds, 3))
        self.fit_info.update(collected.figures)

    def fit(self, positive: torch.Tensor, negative: torch.Tensor, *,  # noqa: C901
            progress: bool = False) -> Self:
        """Train φ on positive (N₊, d) and negative (N₋, d) activations at the site."""
        start = time.perf_counter()
        pos, neg = splittable_rows(positive, negative, "INNSteer")
        x_all = torch.cat([pos, neg])
        y_all = torch.cat([torch.ones(pos.shape[0]), torch.zeros(neg.shape[0])])
        g = torch.Generator().manual_seed(self.seed)
        tr_p, va_p = _split(pos.shape[0], self.val_fraction, g)
        tr_n, va_n = _split(neg.shape[0], self.val_fraction, g)
        train = torch.cat([tr_p, tr_n + pos.shape[0]])
        val = torch.cat([va_p, va_n + pos.shape[0]])
        d = x_all.shape[1]
        flow = self.make_flow(d)
        flow.set_standardisation(x_all[train])
        probe: nn.Linear | None = None
        if self.separation == "logistic":
            probe = nn.Linear(d, 1)
            nn.init.zeros_(probe.weight)
            nn.init.zeros_(probe.bias)
        params = list(flow.parameters()) + (list(probe.parameters()) if probe else [])
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        warm, total = self.warmup_epochs, self.epochs

        def schedule(epoch: int) -> float:
            if epoch < warm:
                return (epoch + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / max(1, total - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
        best: tuple[float, int, dict[str, Any]] | None = None
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc="INNSteer flow", unit="epoch", leave=False)
        epoch = 0
        try:
            for epoch in range(total):
                flow.train()
                order = train[torch.randperm(train.shape[0], generator=g)]
                losses = []
                for i in range(0, order.shape[0], self.batch_size):
                    idx = order[i:i + self.batch_size]
                    loss, _ = self._loss(flow, probe, x_all[idx], y_all[idx])
                    if not bool(torch.isfinite(loss)):
                        raise SteeringError(
                            f"INNSteer training diverged at epoch {epoch + 1} (loss {loss.item()})"
                            f"; lower lr (now {self.lr:g}) or sep_weight, or raise weight_decay"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(params, self.clip)
                    opt.step()
                    losses.append(float(loss.detach()))
                sched.step()
                history["train_loss"].append(float(np.mean(losses)))
                if val.numel():
                    with torch.no_grad():
                        v_total, v_sep = self._loss(flow, probe, x_all[val], y_all[val])
                        vloss = float(v_sep if self.monitor == "separation" else v_total)
                    if not math.isfinite(vloss):
                        raise SteeringError(
                            f"INNSteer validation loss is {vloss} at epoch {epoch + 1}: training "
                            f"diverged; lower lr (now {self.lr:g})"
                        )
                else:
                    vloss = history["train_loss"][-1]
                history["val_loss"].append(vloss)
                if best is None or vloss < best[0]:
                    state = {"flow": copy.deepcopy(flow.state_dict()),
                             "probe": copy.deepcopy(probe.state_dict()) if probe else None}
                    best = (vloss, epoch, state)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(train=f"{history['train_loss'][-1]:.4f}", val=f"{vloss:.4f}")
                if epoch - max(best[1], warm - 1) >= self.patience:
                    break
        finally:
            if bar is not None:
                bar.close()
        assert best is not None
        flow.load_state_dict(best[2]["flow"])
        if probe is not None:
            probe.load_state_dict(best[2]["probe"])
        flow.eval()
        with torch.no_grad():
            z_train = flow(x_all[train])
        y_train = y_all[train]
        mean_diff = z_train[y_train == 1].mean(0) - z_train[y_train == 0].mean(0)
        if not bool(torch.isfinite(mean_diff).all()):
            raise SteeringError("INNSteer training produced non-finite latents; lower lr")
        self._set_state(flow, mean_diff,
                        probe.weight.detach().reshape(-1).clone() if probe else None,
                        probe.bias.detach().reshape(-1).clone() if probe else None)
        self.history = history
        self.fit_info.update(
            fit_seconds=round(time.perf_counter() - start, 3),
            epochs_run=epoch + 1,
            best_epoch=best[1] + 1,
            best_val_loss=round(best[0], 6),
            n_positive=int(pos.shape[0]),
            n_negative=int(neg.shape[0]),
            n_val=int(val.numel()),
            latent_mean_diff_norm=round(float(mean_diff.norm()), 4),
        )
        if self.probe_weight is not None:
            self.fit_info["joint_probe_train_accuracy"] = round(
                self.probe_accuracy(pos, neg), 4)
        return self

    def _set_state(self, flow: LatentFlow, mean_diff: torch.Tensor,
                   probe_weight: torch.Tensor | None, probe_bias: torch.Tensor | None) -> None:
        self.flow = flow.eval()
        for p in flow.parameters():
            p.requires_grad_(False)
        self.mean_diff = mean_diff.detach().clone()
        self.probe_weight, self.probe_bias = probe_weight, probe_bias
        if self.direction == "probe":
            if probe_weight is None or float(probe_weight.norm()) == 0:
                raise SteeringError("the probe direction needs a trained, non-zero probe")
            u = probe_weight / probe_weight.norm()
            self.steering_vector = u * (u @ self.mean_diff)
        else:
            self.steering_vector = self.mean_diff.clone()
        self.sites = self.fit_sites() if not self.sites else self.sites
        self._on_device.clear()

    def _device_state(self, device: torch.device) -> tuple[LatentFlow, torch.Tensor]:
        self.check_fitted()
        flow, v = self.flow, self.steering_vector
        assert flow is not None and v is not None
        if device == torch.device("cpu"):
            return flow, v
        return cached(self._on_device, device,
                      lambda: (copy.deepcopy(flow).to(device), v.to(device)))

    @property
    def hidden_size(self) -> int:
        self.check_fitted()
        assert self.flow is not None
        return self.flow.features

    # -- inspection ----------------------------------------------------------------------------
    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """z = φ(h) for rows (…, d), in float32."""
        flow, _ = self._device_state(h.device)
        with torch.no_grad():
            return flow(h.to(torch.float32))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """h = φ⁻¹(z) for rows (…, d), in float32."""
        flow, _ = self._device_state(z.device)
        with torch.no_grad():
            return flow.inverse(z.to(torch.float32))

    def probe_accuracy(self, positive: torch.Tensor, negative: torch.Tensor) -> float:
        """Accuracy of the jointly trained latent probe (logistic separation only)."""
        if self.probe_weight is None or self.probe_bias is None:
            raise SteeringError("this INNSteer has no probe (separation='margin')")
        zp = self.encode(positive.cpu())
        zn = self.encode(negative.cpu())
        hits = int(((zp @ self.probe_weight + self.probe_bias) > 0).sum())
        hits += int(((zn @ self.probe_weight + self.probe_bias) <= 0).sum())
        return hits / (zp.shape[0] + zn.shape[0])

    # -- run time ------------------------------------------------------------------------------
    def transport(self, rows: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """h′ = φ⁻¹(φ(h) + λv) for float32 rows (N, d) and strengths λ (N,)."""
        flow, v = self._device_state(rows.device)
        return flow.fast_inverse(flow.fast_forward(rows) + lam[:, None] * v)

    def steer(
        self, site: Site, h: torch.Tensor, strength: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        d = self.hidden_size
        check_width(f"innsteer at {site} was fitted on width", d, h)
        lam = strength.to(device=h.device, dtype=torch.float32).reshape(-1)
        check_finite_strengths(lam)
        check_batch_strengths(lam, h)
        if not bool((lam != 0).any()):
            return h
        rows = h.reshape(-1, d)
        lam_rows = lam.reshape(-1, *([1] * (h.ndim - 2))).expand(h.shape[:-1]).reshape(-1)
        moved = self.transport(rows.to(torch.float32), lam_rows)
        out = torch.where((lam_rows == 0)[:, None], rows, moved.to(h.dtype))
        return out.reshape(h.shape)

    # -- artifacts -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        self.check_fitted()
        assert self.flow is not None and self.mean_diff is not None
        out = {f"flow.{k}": v.detach().contiguous() for k, v in self.flow.state_dict().items()}
        out["mean_diff"] = self.mean_diff
        if self.probe_weight is not None and self.probe_bias is not None:
            out["probe_weight"] = self.probe_weight
            out["probe_bias"] = self.probe_bias
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        if len(sites) != 1:
            raise SteeringError(f"innsteer steers one site, got {[str(s) for s in sites]}")
        if "flow.mean" not in tensors or "mean_diff" not in tensors:
            raise SteeringError("the saved state lacks the flow or the latent mean difference")
        flow = self.make_flow(int(tensors["flow.mean"].shape[0]))
        state = {k[len("flow."):]: v for k, v in tensors.items() if k.startswith("flow.")}
        try:
            flow.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise SteeringError(
                f"the saved flow does not match the hyper-parameters (n_layers={self.n_layers}, "
                f"hidden={self.hidden}, hidden_layers={self.hidden_layers}): {exc}"
            ) from exc
        self.sites = list(sites)
        self._set_state(flow, tensors["mean_diff"].to(torch.float32),
                        tensors.get("probe_weight"), tensors.get("probe_bias"))


def linear_probe_accuracy(train_pos: torch.Tensor, train_neg: torch.Tensor,
                          test_pos: torch.Tensor, test_neg: torch.Tensor, *,
                          C: float = 1.0, seed: int = 0) -> float:
    """Held-out accuracy of a standardised logistic-regression probe (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = torch.cat([train_pos, train_neg]).double().numpy()
    y = np.r_[np.ones(train_pos.shape[0]), np.zeros(train_neg.shape[0])]
    clf = make_pipeline(StandardScaler(),
                        LogisticRegression(C=C, max_iter=2000, random_state=seed))
    clf.fit(x, y)
    xt = torch.cat([test_pos, test_neg]).double().numpy()
    yt = np.r_[np.ones(test_pos.shape[0]), np.zeros(test_neg.shape[0])]
    return float(clf.score(xt, yt))
