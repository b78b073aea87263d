"""The per-method fitting functions, each a one-line call of the fit driver
(:func:`steerlab.fitting.fit`) with the method's default controller and fit options; their
names and signatures are the ones steerlab had before the driver."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from steerlab.data import ContrastiveSet, LabeledSet, Renderer
from steerlab.fitting.driver import fit, fit_with
from steerlab.methods.actadd import ActAdd
from steerlab.methods.alqr import ALQR, SPID, ActAddLFS
from steerlab.methods.base import Controller
from steerlab.methods.caa import CAA
from steerlab.models import LoadedModel

if TYPE_CHECKING:
    from steerlab.methods.angular import AngularSteering
    from steerlab.methods.inn import INNSteer
    from steerlab.methods.iti import ITI
    from steerlab.methods.ode import ODESteer, StepODESteer
    from steerlab.methods.sas import SAS

Concepts = ContrastiveSet | LabeledSet | Sequence[ContrastiveSet | LabeledSet]


def fit_caa(lm: LoadedModel, data: ContrastiveSet | LabeledSet, controller: CAA | None = None,
            *, renderer: Renderer | None = None, batch_size: int = 16, cache: bool = True,
            progress: bool = True) -> CAA:
    """Fit a CAA controller (default: at the middle block) on a contrastive set; a labelled
    set gives mean(positive) − mean(negative) of its texts' last tokens."""
    return fit(lm, data, controller or CAA(layers=lm.info.num_layers // 2), renderer=renderer,
               batch_size=batch_size, cache=cache, progress=progress)


def fit_actadd(lm: LoadedModel, controller: ActAdd | None = None) -> ActAdd:
    """Fit ActAdd (default: at block L/5) from its prompt pair, read without a chat template
    as in the paper."""
    return fit(lm, None, controller or ActAdd(layer=lm.info.num_layers // 5), cache=False,
               progress=False)


def fit_alqr(lm: LoadedModel, data: Concepts, controller: ALQR | None = None, *,
             jacobian_data: Sequence[str] | None = None, renderer: Renderer | None = None,
             batch_size: int = 16, cache: bool = True, progress: bool = True) -> ALQR:
    """Fit A-LQR (or A-LQR+): LFS per concept, block Jacobians, Riccati gains.

    ``data`` is one set per concept, contrastive pairs or labelled (unpaired) texts; the
    Jacobians are taken along ``jacobian_data`` (default: the first concept's positive
    texts). ``fit_info`` records the time of each step.
    """
    return fit(lm, data, controller or ALQR(), jacobian_data=jacobian_data, renderer=renderer,
               batch_size=batch_size, cache=cache, progress=progress)


def fit_lfs_baseline(lm: LoadedModel, data: Concepts, controller: SPID | ActAddLFS, *,
                     renderer: Renderer | None = None, cache: bool = True,
                     progress: bool = True) -> SPID | ActAddLFS:
    """Fit S-PID or ActAdd-LFS: the LFS only (no Jacobians); sets as in :func:`fit_alqr`."""
    return fit(lm, data, controller, renderer=renderer, cache=cache, progress=progress)


def fit_odesteer(lm: LoadedModel, data: ContrastiveSet | LabeledSet,
                 controller: ODESteer | StepODESteer | None = None, *,
                 test_fraction: float | None = None, seed: int = 0,
                 renderer: Renderer | None = None, cache: bool = True,
                 progress: bool = True) -> ODESteer | StepODESteer:
    """Fit ODESteer (or StepODESteer; default: ODESteer at the middle block) on last-token
    activations; report held-out accuracy.

    ``test_fraction`` (default: the controller's preset's, else 0.2) of each class is held
    out by a seeded split, the barrier is fitted on the rest and
    ``fit_info["heldout_accuracy"]`` is the classifier's accuracy on the held-out rows. With
    ``test_fraction=0`` (the ``paper`` preset's: the reference fits the barrier on all of its
    training activations) every row is used, in order, and no held-out accuracy is reported.
    ``fit_info`` records ``test_fraction``, ``n_train`` (positive, negative rows fitted on)
    and ``train_accuracy`` (the classifier on those same rows, not a held-out figure).
    """
    from steerlab.methods.ode import ODESteer

    return fit(lm, data, controller or ODESteer(layer=lm.info.num_layers // 2),
               test_fraction=test_fraction, seed=seed, renderer=renderer, cache=cache,
               progress=progress)


def fit_innsteer(lm: LoadedModel, data: ContrastiveSet | LabeledSet,
                 controller: INNSteer | None = None, *, test_fraction: float = 0.2,
                 seed: int = 0, renderer: Renderer | None = None, cache: bool = True,
                 progress: bool = True) -> INNSteer:
    """Fit INNSteer (default: at the middle block) on last-token activations; report
    held-out separability raw vs latent.

    The flow is trained on a seeded train split (it holds out its own validation part for
    early stopping); on the rest (``test_fraction`` of each class), ``fit_info`` records the
    held-out accuracy of the same scikit-learn logistic-regression probe fitted on the raw
    activations (``heldout_raw_probe_accuracy``) and on the latents z = φ(h)
    (``heldout_latent_probe_accuracy``), and of the jointly trained latent probe
    (``heldout_joint_probe_accuracy``).
    """
    from steerlab.methods.inn import INNSteer

    return fit(lm, data, controller or INNSteer(layer=lm.info.num_layers // 2),
               test_fraction=test_fraction, seed=seed, renderer=renderer, cache=cache,
               progress=progress)


def fit_sas(lm: LoadedModel, data: ContrastiveSet, controller: SAS, *,
            renderer: Renderer | None = None, batch_size: int = 16, cache: bool = True,
            progress: bool = True) -> SAS:
    """Fit an SAS vector: the positive and negative examples' activations at the controller's
    site (at its recipe's position, as CAA), encoded by its SAE."""
    return fit(lm, data, controller, renderer=renderer, batch_size=batch_size, cache=cache,
               progress=progress)


def fit_contrastive(lm: LoadedModel, data: ContrastiveSet | LabeledSet, controller: Any, *,
                    renderer: Renderer | None = None, batch_size: int = 16, cache: bool = True,
                    progress: bool = True) -> Any:
    """Fit any controller whose ``fit(positive, negative)`` takes per-site class activations
    read at its ``recipe``'s position (RepE, probe directions, Mean-/Linear-AcT, MiMiC, and
    CAA), with the base class's generic fit side whatever the method overrides. Records
    collection and estimator times."""
    return fit_with(Controller, lm, data, controller, renderer=renderer,
                    batch_size=batch_size, cache=cache, progress=progress)


def fit_iti(lm: LoadedModel, data: ContrastiveSet | LabeledSet, controller: ITI | None = None,
            *, tuning: ContrastiveSet | LabeledSet | Sequence[str] | None = None,
            tuning_fraction: float | None = None, renderer: Renderer | None = None,
            batch_size: int = 16, cache: bool = True, progress: bool = True) -> ITI:
    """Fit ITI: per-head attention outputs (``heads.L``, before the output projection) of
    every chosen layer (all layers when ``layers`` is None), one probe per head, top-K heads.

    The rows are split by question (a pair's prompt; a labelled item's ``group``, which
    :func:`~steerlab.data.load_truthfulqa_labeled` sets), as the reference does. σ comes from
    tuning rows apart from the probe rows (honest_llama ``validate_2fold.py`` L126-130,
    L172-174): the activations of ``tuning`` (a contrastive set: both completions; a labelled
    set or plain strings: the texts as they are, read at the last token; labels unused) at the
    same position, else of a held-out slice of ``data``: ``tuning_fraction`` (default: the
    controller's preset's, else 0.2) of its questions, drawn with the controller's seed (see
    :func:`~steerlab.methods.iti_tuning.hold_out_questions`), which the probes never see.
    ``tuning_fraction=0``, or data of fewer than 3 questions (with a warning), takes σ from
    the probe rows instead. ``fit_info`` records ``tuning`` (``"given"``, ``"held-out"`` or
    ``"probe rows"``), ``tuning_fraction``, ``n_tuning_questions`` and ``n_tuning`` (rows).

    Raises :class:`~steerlab.errors.SiteError` for a model whose attention output projection
    cannot be found or does not take the concatenated heads.
    """
    from steerlab.methods.iti import ITI

    return fit(lm, data, controller or ITI(), tuning=tuning, tuning_fraction=tuning_fraction,
               renderer=renderer, batch_size=batch_size, cache=cache, progress=progress)


def fit_angular(lm: LoadedModel, data: ContrastiveSet | LabeledSet,
                controller: AngularSteering, *, renderer: Renderer | None = None,
                batch_size: int = 16, cache: bool = True,
                progress: bool = True) -> AngularSteering:
    """Fit angular steering: the feature direction at the controller's sites, and the plane's
    second axis from the mean differences of every layer (read in the same pass)."""
    return fit(lm, data, controller, renderer=renderer, batch_size=batch_size, cache=cache,
               progress=progress)
