"""Training sparse autoencoders (:func:`train_sae`; ours where not attributed).

Activations are scaled by a constant c so that the centred data have unit mean squared norm,
E‖c(x − x̄)‖² = 1 (the JumpReLU paper normalises to unit mean squared norm; centring makes the
scale independent of the residual stream's mean). In those units the reconstruction loss of a
batch, L_rec = mean‖x − x̂‖², is about its fraction of variance unexplained, and all
coefficients and the JumpReLU threshold/bandwidth are read in those units. After training c is
folded back (b_enc, b_dec and θ divided by c, the codes scale with the input), so the returned
SAE reads raw activations and its decoder rows keep unit norm. Initialisation (standard): W_dec
rows random unit vectors, W_enc = W_decᵀ, b_enc = 0, b_dec = the data mean (the mean, not the
geometric median: it streams), log θ = log ``jumprelu_init_threshold``. Adam (β = 0.9, 0.999),
learning rate warmed up linearly over the first 5 % of steps and decayed linearly to 0 over the
last 20 %; the decoder rows are renormalised to unit norm after every step (Bricken et al.). The
log-thresholds get 10 × the learning rate: Adam moves log θ by about the learning rate per step,
so at a rate of 1e-3 θ could grow only e-fold per thousand steps, while our CPU-sized runs take
hundreds to a few thousand steps (the paper's take hundreds of thousands). Losses:

* relu: L = L_rec + λ₁·mean Σᵢ fᵢ (L1; the decoder has unit-norm rows, so this is Anthropic's
  Σᵢ fᵢ‖W_dec,ᵢ‖); λ₁ warmed up linearly over the first 5 % of steps.
* jumprelu: L = L_rec + λ₀·mean Σᵢ H(preᵢ − θᵢ) (L0). H and the jump of σ have zero derivative
  in θ almost everywhere; as in the paper, the backward pass uses straight-through estimators
  with the rectangle kernel K(u) = 1[|u| < ½] and bandwidth ε:
  ∂H(z − θ)/∂θ := −(1/ε)·K((z − θ)/ε) and ∂σ(z)/∂θ := −(θ/ε)·K((z − θ)/ε), while
  ∂σ(z)/∂z = H(z − θ). λ₀ warmed up as λ₁.
* topk: L = L_rec + α·L_aux with the AuxK loss of Gao et al.: e = x − x̂ (detached), ê the
  decoding (no bias) of the k_aux largest pre-activations among the dead features only, and
  L_aux = Σ‖e − ê‖²/Σ‖e‖² over the batch, scaled by min(n_dead/k_aux, 1) as SAELens does;
  α = 1/32 and k_aux = d/2 (Gao et al.'s choices).

Dead features: a feature is dead when it has not fired (a non-zero code) on the last
``dead_tokens`` training tokens. TopK SAEs get the AuxK loss on them. ReLU and JumpReLU SAEs
are *resampled* (Bricken et al.): every ``dead_tokens`` tokens, until 70 % of training, each
dead feature gets a decoder row equal to a normalised centred input (x − b_dec)/‖x − b_dec‖ drawn
from the current batch with probability ∝ its squared reconstruction error, an encoder column
equal to that direction times 0.2 × the mean norm of the live encoder columns, b_enc = 0,
θ = its initial value, and fresh Adam moments.

**Per architecture.** Everything that differs between architectures is one strategy object
each, in :data:`steerlab.sae.strategies.STRATEGIES` (keyed by architecture): its optimiser
parameter groups, the term it adds to the reconstruction loss, whether its dead features are
resampled and what resampling resets beyond the shared weights. The training loop itself has
no per-architecture branch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch

from steerlab.errors import DataError, SteeringError
from steerlab.sae.config import SAEConfig, _is_int
from steerlab.sae.evaluate import evaluate_sae
from steerlab.sae.model import SparseAutoencoder, _unit_rows
from steerlab.sae.sources import Activations, _chunks, _Moments, _reader
from steerlab.sae.strategies import (
    STRATEGIES,
    ArchitectureTraining,
    Coefficients,
    DeadFeatures,
    Forward,
    JumpReLUTraining,
    ReLUTraining,
    TopKTraining,
    resample_dead,
)

THRESHOLD_LR_FACTOR = 10.0  # default JumpReLU log-threshold learning rate = this × lr


# -- report, settings, batches and schedule ----------------------------------------------------
@dataclass
class TrainReport:
    """How training went. ``fvu``, ``mean_l0`` and ``dead_fraction`` are measured on the
    evaluation data (``eval_on``: ``"eval"`` when ``eval_activations`` was given, else
    ``"train"``); ``history`` holds the mean training loss of each epoch and ``recon_history``
    its reconstruction part (normalised units, about the training FVU). ``steps`` counts
    optimiser steps, ``n_resampled`` resampled features (relu, jumprelu) and ``input_scale`` is
    the factor c of the normalisation E‖c(x − x̄)‖² = 1 (already folded into the SAE)."""

    fvu: float
    mean_l0: float
    dead_fraction: float
    train_seconds: float
    tokens_seen: int
    history: list[float] = field(default_factory=list)
    recon_history: list[float] = field(default_factory=list)
    steps: int = 0
    eval_on: str = "train"
    n_resampled: int = 0
    input_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if not _is_int(value) or cast(int, value) < minimum:
        raise SteeringError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return cast(int, value)


def _check_number(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SteeringError(f"{name} must be a number, got {value!r}")
    f = float(value)
    if not math.isfinite(f) or f < 0 or (f == 0 and not allow_zero):
        need = "non-negative" if allow_zero else "positive"
        raise SteeringError(f"{name} must be a finite, {need} number, got {value!r}")
    return f


def _batches(read: Callable[[], Iterator[torch.Tensor]], d_in: int, batch_size: int,
             g: torch.Generator, name: str) -> Iterator[torch.Tensor]:
    """One epoch of shuffled batches: rows permuted within each chunk, a partial batch at the
    end of a chunk completed from the next one, the last partial batch of the epoch kept."""
    carry: torch.Tensor | None = None
    for chunk in _chunks(read, d_in, name):
        n = chunk.shape[0]
        perm = torch.randperm(n, generator=g).to(chunk.device)
        pos = 0
        if carry is not None:
            need = batch_size - carry.shape[0]
            carry = torch.cat([carry, chunk[perm[:need]].to(carry.device)])
            pos = min(need, n)
            if carry.shape[0] < batch_size:
                continue
            yield carry
            carry = None
        while n - pos >= batch_size:
            yield chunk[perm[pos:pos + batch_size]]
            pos += batch_size
        if pos < n:
            carry = chunk[perm[pos:]]
    if carry is not None:
        yield carry


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5 % of steps, linear decay to 0 over the last 20 %."""
    warm = max(1, total // 20)
    decay = max(1, total // 5)
    f = min(1.0, (step + 1) / warm)
    return max(0.0, min(f, (total - step) / decay))


# -- training ----------------------------------------------------------------------------------
def _statistics(read: Callable[[], Iterator[torch.Tensor]],
                d_in: int) -> tuple[int, float, torch.Tensor]:
    """The statistics pass: row count, the scale c with E‖c(x − x̄)‖² = 1, and the float32
    mean x̄ on the CPU."""
    moments = _Moments()
    for chunk in _chunks(read, d_in, "activations"):
        moments.add(chunk)
    if moments.n == 0 or moments.mean is None:
        raise DataError("the activations are empty")
    if moments.m2 <= 0:
        raise DataError("the activations have zero variance; there is nothing to encode")
    c = math.sqrt(moments.n / moments.m2)
    return moments.n, c, moments.mean.to(torch.float32).cpu()


def _initial_sae(config: SAEConfig, init: SparseAutoencoder | None, mean: torch.Tensor,
                 c: float, g: torch.Generator) -> SparseAutoencoder:
    """The starting SAE in normalised units, on the CPU, decoder rows of unit norm: a copy of
    ``init`` rescaled, else random unit decoder rows from ``g``, W_enc = W_decᵀ, b_dec = the
    scaled mean (b_enc cancelling it when the SAE does not subtract b_dec from its input)."""
    if init is not None:
        sae = copy.deepcopy(init).cpu()
        sae._rescale_input_(1.0 / c)
    else:
        sae = SparseAutoencoder(config, seed=None)
        with torch.no_grad():
            rows = _unit_rows(torch.randn(config.d_sae, config.d_in, generator=g))
            sae.W_enc.copy_(rows.T)
            if not config.tied:
                cast(torch.Tensor, sae.W_dec).copy_(rows)
            sae.b_enc.zero_()
            sae.b_dec.copy_(mean * c)
            if not config.apply_b_dec_to_input:
                sae.b_enc.copy_(-(mean * c) @ sae.W_enc)
    return sae.normalize_decoder_()


def train_sae(  # noqa: C901
    activations: Activations,
    config: SAEConfig,
    *,
    epochs: int = 3,
    batch_size: int = 1024,
    lr: float = 3e-3,
    threshold_lr: float | None = None,
    l1_coefficient: float = 0.05,
    l0_coefficient: float = 2e-3,
    aux_coefficient: float = 1 / 32,
    aux_k: int | None = None,
    resample: bool = True,
    dead_tokens: int | None = None,
    eval_activations: Activations | None = None,
    init: SparseAutoencoder | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> tuple[SparseAutoencoder, TrainReport]:
    """Train a sparse autoencoder on ``activations`` (losses in the module docstring).

    The defaults target a small model's residual stream (d_in ≈ 576, d_sae = 4–8 × d_in) and
    100k–500k tokens on a CPU: 3 epochs of 1024-row batches give hundreds to ~1500 steps (one
    step at d_in = 576, d_sae = 4608 took ≈ 1 s on one busy core, so 200k tokens at 8× take
    ~10 min there; 4× or two free cores roughly halve that), hence the higher-than-usual
    learning rate 3e-3 (on synthetic data 3e-3–4e-3 beat 1e-3 for all three architectures at
    this step count). λ₁ = 0.05 and λ₀ = 2e-3 are in normalised units, where the mean token
    variance is 1: λ₁ shrinks a code of typical size 1/√L0 by λ₁/2, and λ₀ keeps a feature on
    a token only if it lowers that token's squared error by more than 0.2 % of the mean token
    variance.

    Args:
        activations: an ``(N, d_in)`` float tensor, or a source of ``(n, d_in)`` chunks that
            can be read several times (one statistics pass, one pass per epoch, one
            evaluation pass): a list of tensors, a re-iterable object such as
            :class:`steerlab.corpus.ActivationShards` (one shard in memory at a time), or a
            callable returning a fresh iterable. One-shot iterators are refused. Rows are
            shuffled within each chunk each epoch (chunk order is kept, so shuffle shards that
            are ordered by topic); a tensor is one chunk, so ``x`` and ``[x]`` train alike,
            bit for bit.
        config: the SAE's shape and architecture.
        epochs: passes over the data.
        batch_size: rows per optimiser step.
        lr: Adam learning rate (peak of the schedule).
        threshold_lr: learning rate of the JumpReLU log-thresholds; default 10 × ``lr``.
        l1_coefficient: λ₁ of the L1 penalty (relu).
        l0_coefficient: λ₀ of the L0 penalty (jumprelu).
        aux_coefficient: α of the AuxK loss (topk); 0 turns it off.
        aux_k: k_aux of the AuxK loss (topk); default d_in // 2.
        resample: resample dead features (relu, jumprelu).
        dead_tokens: a feature is dead when it has not fired on this many of the most recent
            training tokens; default min(100 000, half an epoch), at least one batch.
        eval_activations: data for the report's FVU, L0 and dead fraction (default: the
            training data).
        init: start from this SAE's weights (its config must equal ``config``); it is not
            modified.
        device: where to train; chunks are moved there a batch at a time.
        seed: seeds a private ``torch.Generator`` (initialisation, shuffling, resampling);
            the global RNG is not touched. Same seed, data and thread count: same SAE, bit
            for bit.
        progress: show a tqdm bar.

    Returns:
        the trained SAE (on ``device``, reading raw activations) and its :class:`TrainReport`.

    Raises:
        DataError: empty, malformed, non-finite or constant activations.
        SteeringError: bad settings, or a non-finite loss (training diverged; nothing is
            returned).
    """
    if not isinstance(config, SAEConfig):
        raise SteeringError(f"config must be an SAEConfig, got {type(config).__name__}")
    epochs = _check_count("epochs", epochs)
    batch_size = _check_count("batch_size", batch_size)
    lr = _check_number("lr", lr, allow_zero=False)
    lr_theta = (_check_number("threshold_lr", threshold_lr, allow_zero=False)
                if threshold_lr is not None else THRESHOLD_LR_FACTOR * lr)
    l1 = _check_number("l1_coefficient", l1_coefficient, allow_zero=True)
    l0 = _check_number("l0_coefficient", l0_coefficient, allow_zero=True)
    alpha = _check_number("aux_coefficient", aux_coefficient, allow_zero=True)
    if aux_k is not None:
        aux_k = _check_count("aux_k", aux_k)
    if dead_tokens is not None:
        dead_tokens = _check_count("dead_tokens", dead_tokens)
    if not _is_int(seed):
        raise SteeringError(f"seed must be an integer, got {seed!r}")
    if init is not None:
        if not isinstance(init, SparseAutoencoder):
            raise SteeringError(f"init must be a SparseAutoencoder, got {type(init)}")
        if init.config != config:
            raise SteeringError("init's config differs from config; pass init.config")
    dev = torch.device(device)
    start = time.perf_counter()
    read = _reader(activations, "activations")
    d = config.d_in
    n_rows, c, mean = _statistics(read, d)

    g = torch.Generator().manual_seed(seed)
    sae = _initial_sae(config, init, mean, c, g).to(dev).train()
    strategy = STRATEGIES[config.architecture](Coefficients(
        l1=l1, l0=l0, aux=alpha, aux_k=aux_k if aux_k is not None else max(1, d // 2)))
    opt = torch.optim.Adam(strategy.param_groups(sae, lr, lr_theta), betas=(0.9, 0.999))

    steps_per_epoch = math.ceil(n_rows / batch_size)
    total = epochs * steps_per_epoch
    total_tokens = epochs * n_rows
    window = dead_tokens if dead_tokens is not None else min(100_000, n_rows // 2)
    window = max(window, min(batch_size, n_rows))
    dead = DeadFeatures(config.d_sae, window, dev)
    resampling = strategy.resamples and resample
    next_check = window
    resample_until = int(0.7 * total_tokens)
    n_resampled = 0
    tokens = 0
    step = 0
    history: list[float] = []
    recon_history: list[float] = []

    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=f"SAE {config.architecture} {d}->{config.d_sae}", unit="step",
               leave=False, disable=not progress)
    try:
        for epoch in range(epochs):
            loss_sum = recon_sum = 0.0
            rows_sum = 0
            for batch in _batches(read, d, batch_size, g, "activations"):
                x = batch.to(device=dev, dtype=torch.float32) * c
                for group in opt.param_groups:
                    group["lr"] = group["peak"] * _lr_factor(step, total)
                warm = min(1.0, (step + 1) / max(1, total // 20))
                pre = sae.pre_acts(x)
                f = sae.activation(pre)
                x_hat = sae.decode(f)
                recon = ((x_hat - x) ** 2).sum(-1).mean()
                loss = recon
                penalty = strategy.penalty(sae, Forward(x, pre, f, x_hat), warm, dead)
                if penalty is not None:
                    loss = loss + penalty
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise SteeringError(
                        f"SAE training diverged at step {step + 1} of {total} (epoch "
                        f"{epoch + 1}): the loss is {value}; lower lr (now {lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sae.normalize_decoder_()
                n_b = x.shape[0]
                dead.update(f, n_b)
                tokens += n_b
                step += 1
                loss_sum += value * n_b
                recon_sum += float(recon.detach()) * n_b
                rows_sum += n_b
                if resampling and tokens >= next_check:
                    next_check = tokens + window
                    if tokens <= resample_until:
                        n_resampled += resample_dead(sae, dead.mask(), x, opt, g, strategy)
                        dead.revive()
                bar.update(1)
                if step % 10 == 0 or step == total:
                    l0_now = float((f != 0).sum(-1).float().mean())
                    dead_now = float(dead.mask().float().mean())
                    bar.set_postfix(loss=f"{value:.4f}", l0=f"{l0_now:.1f}",
                                    dead=f"{dead_now:.2f}")
            history.append(loss_sum / max(rows_sum, 1))
            recon_history.append(recon_sum / max(rows_sum, 1))
    finally:
        bar.close()

    if not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
        raise SteeringError(f"SAE training diverged: non-finite weights after {step} steps; "
                            f"lower lr (now {lr:g})")
    # back to raw units
    sae.eval()
    sae._rescale_input_(c)
    train_seconds = time.perf_counter() - start
    ev = evaluate_sae(sae, eval_activations if eval_activations is not None else activations)
    report = TrainReport(
        fvu=float(ev["fvu"]), mean_l0=float(ev["mean_l0"]),
        dead_fraction=float(ev["dead_fraction"]), train_seconds=round(train_seconds, 3),
        tokens_seen=tokens, history=history, recon_history=recon_history, steps=step,
        eval_on="eval" if eval_activations is not None else "train",
        n_resampled=n_resampled, input_scale=c)
    sae.train_report = report.to_dict()
    return sae, report


__all__ = [
    "STRATEGIES",
    "THRESHOLD_LR_FACTOR",
    "ArchitectureTraining",
    "Coefficients",
    "DeadFeatures",
    "Forward",
    "JumpReLUTraining",
    "ReLUTraining",
    "TopKTraining",
    "TrainReport",
    "train_sae",
]
