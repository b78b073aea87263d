"""The fit side of the method contract: what a method asks the fit driver to collect
(:class:`Reading`) and what the driver hands back (:class:`Collected`).

A controller's :meth:`~steerlab.methods.base.Controller.reading` looks at the model's layout
(:class:`ModelLayout`) and the data, and returns a :class:`Reading`; the driver
(:func:`steerlab.fitting.fit`) renders and runs the data through the model once, along the
one positive/negative collection path, and passes a :class:`Collected` to
:meth:`~steerlab.methods.base.Controller.fit_collected`, which calls the method's model-free
estimator (``fit`` on tensors). Nothing here runs a model: this module only describes.

Data kinds (``Reading.data``):

* ``"pairs"``: a :class:`~steerlab.data.ContrastiveSet` only (prompt + positive completion /
  prompt + negative completion, rendered; SAS);
* ``"labelled"``: two classes, from a contrastive set (read as for ``"pairs"``) or from a
  :class:`~steerlab.data.LabeledSet` (its texts as they are, at the last token);
* ``"concepts"``: one such set per concept (the A-LQR family), ``Reading.sets``;
* ``"prompts"``: the method's own prompt pair, ``Reading.prompts``, read without a chat
  template (ActAdd); no data set;
* ``"none"``: nothing is collected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from steerlab.sites import LayerMap, Site

if TYPE_CHECKING:
    from steerlab.data import ContrastiveSet, LabeledSet
    from steerlab.models import ModelInfo

DataKind = Literal["pairs", "labelled", "concepts", "prompts", "none"]
DATA_KINDS: tuple[str, ...] = ("pairs", "labelled", "concepts", "prompts", "none")
# Which token of each example is read: the recipes of methods.additive.Recipe, and "tokens"
# (every token of a prompt: ActAdd's positional mode).
ReadRecipe = Literal["ab", "last", "mean", "tokens"]
Classes = dict[Site, torch.Tensor]


@dataclass(frozen=True)
class ModelLayout:
    """What a method may know about the model when it says what to read: its description
    and its layer map (blocks, heads)."""

    info: ModelInfo
    layers: LayerMap

    @property
    def num_layers(self) -> int:
        return self.layers.num_layers

    @property
    def hidden_size(self) -> int:
        return self.layers.hidden_size

    @property
    def head_dim(self) -> int | None:
        return self.layers.head_dim

    def resolve(self, sites: Sequence[Site]) -> list[Site]:
        """The sites with negative block indices counted from the end (SiteError when out of
        range, or a ``heads`` site on a model without a recognisable attention output)."""
        return [self.layers.resolve(s) for s in sites]


@dataclass
class Jacobians:
    """Block Jacobians to average along ``texts`` (read unrendered, at most ``max_tokens``
    tokens each): :func:`steerlab.control.jacobians.block_jacobians`."""

    texts: list[str]
    max_tokens: int


@dataclass
class Reading:
    """What a method needs collected.

    Attributes:
        sites: resolved sites at which the activations are read.
        recipe: which token of each example is read (``ab``, ``last``, ``mean``; ``tokens``:
            every token, for ``"prompts"``).
        data: the data kind (module docstring).
        sets: the data sets to read (``"pairs"``/``"labelled"``: one; ``"concepts"``: one
            per concept); the driver fills it from the data given unless the method chose
            (e.g. ITI's probe part of the data).
        prompts: ``"prompts"``: the (positive, negative) texts.
        tuning_sets: further contrastive or labelled sets read like the data, by name; each
            comes back as ``Collected.extra[name] = (positive, negative)``.
        texts: further texts read as they are at the last token, by name; each comes back as
            ``Collected.extra[name] = {site: (N, d)}``.
        jacobians: block Jacobians to compute; they come back as
            ``Collected.extra["jacobians"]`` (the averaged ``A``, (L, d, d)).
        options: the fit options the method took (validated), for ``fit_collected``.
        extras: anything else the method wants to carry to ``fit_collected`` (ITI's head
            width, ...).
    """

    sites: list[Site]
    recipe: ReadRecipe = "last"
    data: DataKind = "labelled"
    sets: list[ContrastiveSet | LabeledSet] | None = None
    prompts: tuple[str, str] | None = None
    tuning_sets: dict[str, ContrastiveSet | LabeledSet] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)
    jacobians: Jacobians | None = None
    options: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Collected:
    """What the driver hands to ``fit_collected``.

    Attributes:
        reading: the :class:`Reading` it collected.
        positive, negative: per site, the positive and negative rows ((N₊, d), (N₋, d); for
            ``"prompts"``, one row per token or the last token's); for ``"concepts"``, the
            first concept's.
        concepts: ``"concepts"``: per set, its (positive, negative) per-site rows.
        extra: the tuning sets, texts and Jacobians the reading asked for, by name.
        position: the position read (``str(Position)``), where one was.
        render_mode: the renderer's mode (``chat`` or ``plain``).
        data_name: the data's name (a list for several concepts), ``None`` without data.
        fingerprint: the data's fingerprint, ``None`` without data.
        seconds: time spent collecting (``collect``) and on the Jacobians (``jacobians``).
        progress: whether the caller asked for progress bars.
        figures: fit figures ``fit_collected`` leaves for ``record_fit`` to write last.
    """

    reading: Reading
    positive: Classes = field(default_factory=dict)
    negative: Classes = field(default_factory=dict)
    concepts: list[tuple[Classes, Classes]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    position: str | None = None
    render_mode: str | None = None
    data_name: str | list[str] | None = None
    fingerprint: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    progress: bool = False
    figures: dict[str, Any] = field(default_factory=dict)

    def stacked_concepts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per concept, (positive, negative) stacked over the reading's sites in order:
        each ``(N, len(sites), d)`` (the A-LQR family's block-input tensors)."""
        sites = self.reading.sites
        return [(torch.stack([p[s] for s in sites], dim=1),
                 torch.stack([n[s] for s in sites], dim=1)) for p, n in self.concepts]


def check_options(method: str, options: dict[str, Any], allowed: Sequence[str] = ()) -> None:
    """Refuse fit options a method does not take (one-line :class:`SteeringError`)."""
    from steerlab.errors import SteeringError

    unknown = sorted(k for k in options if k not in allowed)
    if unknown:
        takes = ", ".join(allowed) if allowed else "none"
        raise SteeringError(f"{method} takes no fit option {', '.join(unknown)}; its fit "
                            f"options: {takes}")


def concept_sets(data: Any) -> list[ContrastiveSet | LabeledSet]:
    """One set per concept: a single contrastive or labelled set, or a sequence of them."""
    from steerlab.data import ContrastiveSet, LabeledSet
    from steerlab.errors import DataError

    sets = [data] if isinstance(data, (ContrastiveSet, LabeledSet)) else list(data)
    if not sets:
        raise DataError("give at least one contrastive or labelled set")
    for s in sets:
        if not isinstance(s, (ContrastiveSet, LabeledSet)):
            raise DataError(f"expected contrastive or labelled sets, got {type(s).__name__}")
    return sets


def split_classes(positive: torch.Tensor, negative: torch.Tensor, test_fraction: float,
                  seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                      tuple[torch.Tensor, torch.Tensor]]:
    """Seeded (train, test) parts of each class's rows, ``((pos_tr, pos_te), (neg_tr,
    neg_te))``: one ``torch.Generator`` seeded with ``seed`` permutes the positive rows, then
    the negative rows; round(n · test_fraction) rows of a class are held out (none for a
    class under 5 rows)."""
    g = torch.Generator().manual_seed(seed)

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(x.shape[0], generator=g)
        n_test = round(x.shape[0] * test_fraction) if x.shape[0] >= 5 else 0
        return x[idx[n_test:]], x[idx[:n_test]]

    return split(positive), split(negative)


def check_fraction(name: str, value: Any) -> float:
    """A held-out fraction in [0, 1) as a float (DataError otherwise)."""
    from steerlab.errors import DataError

    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0.0 <= float(value) < 1.0:
        raise DataError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)
