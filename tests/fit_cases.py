"""Fit cases for ``tests/test_fit_driver.py``: every registered method, fitted on the tiny
random models through the public fitting API (the per-method helpers and ``fit_method``),
over several recipes, scopes, blocks, presets and data kinds (contrastive and labelled).

Each case is a function of nothing that returns a fitted controller; it uses only names that
``steerlab.fitting`` exported before the one-driver refactor (issue 18, step 2), so the same
cases ran on the code before it (``scripts/make_fit_reference.py`` wrote
``tests/fit_reference/``) and run on the code after it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from steerlab.data import ContrastivePair, ContrastiveSet, LabeledSet, LabeledText
from tiny_models import tiny_model

PAIRS = ContrastiveSet([
    ContrastivePair(f"Tell me about day {i}.", f"It was wonderful and happy {i}.",
                    f"It was awful and sad {i}.") for i in range(10)
], name="fit-sentiment")
AB = ContrastiveSet([
    ContrastivePair(f"Question {i}: is day {i} good? (A) yes (B) no",
                    "(A)" if i % 2 else "(B) no it is not", "(B)" if i % 2 else "(A) yes")
    for i in range(8)
], name="fit-ab")
LABELLED = LabeledSet(
    [LabeledText(f"What a lovely thing number {i}.", 1, group=f"q{i}") for i in range(8)]
    + [LabeledText(f"What a horrible thing number {i}.", 0, group=f"q{i}") for i in range(8)],
    name="fit-labelled")
UNGROUPED = LabeledSet(
    [LabeledText(f"Great and kind {i}.", 1) for i in range(6)]
    + [LabeledText(f"Cruel and bad {i}.", 0) for i in range(6)], name="fit-ungrouped")
OTHER = ContrastiveSet([
    ContrastivePair(f"Describe place {i}.", f"A calm, safe place {i}.",
                    f"A loud, dangerous place {i}.") for i in range(6)
], name="fit-other")

Case = Callable[[], Any]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def deco(fn: Case) -> Case:
        CASES[name] = fn
        return fn
    return deco


def _lm(arch: str = "llama", chat: bool = True) -> Any:
    return tiny_model(arch, chat=chat)


def by_name(method: str, data: Any, *, arch: str = "llama", chat: bool = True,
            **kw: Any) -> Case:
    """A case fitting ``method`` with :func:`steerlab.fitting.fit_method`."""
    def run() -> Any:
        from steerlab.fitting import fit_method

        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fit_method(_lm(arch, chat), method, data, cache=False, progress=False, **kw)
    return run


def _small(method: str) -> dict[str, Any]:
    return {"odesteer": {"n_components": 64}, "step_odesteer": {"n_components": 64},
            "innsteer": {"hidden": 8, "epochs": 4, "warmup_epochs": 1},
            "alqr": {"n_jacobian_prompts": 3}, "alqr_plus": {"n_jacobian_prompts": 3},
            "iti": {"top_k": 3}}.get(method, {})


# -- fit_method over every method, recipes, blocks, scopes and data kinds ----------------------
_BLOCK = ("caa", "repe", "probe", "mean_act", "linear_act", "mimic", "angular", "odesteer",
          "step_odesteer", "innsteer", "actadd_lfs")
for _m in ("caa", "repe", "probe", "mean_act", "linear_act", "mimic", "angular", "alqr",
           "alqr_plus", "spid", "actadd_lfs", "odesteer", "step_odesteer", "innsteer", "iti"):
    for _recipe in ("last", "mean"):
        _kw: dict[str, Any] = dict(_small(_m), recipe=_recipe)
        if _m in _BLOCK:
            _kw["layer"] = -1 if _recipe == "mean" else 0
        if _m == "iti" and _recipe == "mean":
            _kw["layers"] = [1]
        CASES[f"name-{_m}-{_recipe}"] = by_name(_m, PAIRS, **_kw)
    if _m not in ("repe", "angular"):  # they need pairs
        _kw = dict(_small(_m), recipe="last")
        if _m in _BLOCK:
            _kw["layer"] = 1
        CASES[f"name-{_m}-labelled"] = by_name(_m, LABELLED, **_kw)

for _m in ("caa", "repe", "probe", "mean_act", "linear_act", "mimic", "angular"):
    CASES[f"name-{_m}-ab"] = by_name(_m, AB, layer=1, recipe="ab", scope="all")
    CASES[f"name-{_m}-qwen3-plain"] = by_name(_m, PAIRS, arch="qwen3", chat=False, layer=0,
                                              recipe="mean", scope="from:-1")

CASES["name-caa-resid_pre-two-blocks"] = by_name("caa", PAIRS, layers=[1, 0], site="resid_pre",
                                                 recipe="mean", scope="last")
CASES["name-caa-normalize"] = by_name("caa", PAIRS, layer=1, normalize=2.0)
CASES["name-caa-paper"] = by_name("caa", AB, preset="paper", layers=1)
CASES["name-caa-labelled-mean"] = by_name("caa", LABELLED, layer=1, recipe="mean")
CASES["name-repe-center"] = by_name("repe", PAIRS, layers=[0, 1], variant="pca_center")
CASES["name-angular-adaptive"] = by_name("angular", PAIRS, layers=[0, 1], adaptive=True,
                                         angle=30.0)
CASES["name-mimic-reg"] = by_name("mimic", PAIRS, layer=0, reg=0.5)
CASES["name-actadd"] = by_name("actadd", None, layer=1)
CASES["name-actadd-positional"] = by_name("actadd", None, layer=0, mode="positional",
                                          positive="Love and joy", negative="Hate")
CASES["name-actadd-neg-block"] = by_name("actadd", None, layer=-1, scope="last")
CASES["name-alqr-paper"] = by_name("alqr", PAIRS, preset="paper", n_jacobian_prompts=2)
CASES["name-alqr_plus-paper"] = by_name("alqr_plus", PAIRS, preset="paper",
                                        n_jacobian_prompts=2)
CASES["name-spid-paper"] = by_name("spid", LABELLED, preset="paper")
CASES["name-odesteer-paper"] = by_name("odesteer", PAIRS, preset="paper", layer=1,
                                       n_components=64)
CASES["name-step_odesteer-paper"] = by_name("step_odesteer", LABELLED, preset="paper",
                                            layer=0, n_components=64)
CASES["name-odesteer-rff"] = by_name("odesteer", PAIRS, layer=1, n_components=64,
                                     features="rff")
CASES["name-innsteer-probe"] = by_name("innsteer", PAIRS, layer=1, hidden=8, epochs=4,
                                       warmup_epochs=1, direction="probe")
CASES["name-iti-paper"] = by_name("iti", LABELLED, preset="paper", top_k=2)
CASES["name-iti-ungrouped"] = by_name("iti", UNGROUPED, top_k=2, direction="probe")
CASES["name-iti-qwen3"] = by_name("iti", PAIRS, arch="qwen3", chat=False, top_k=4)
CASES["name-iti-gpt2"] = by_name("iti", PAIRS, arch="gpt2", chat=False, top_k=2, layers=[-1])


def _sae(d: int, m: int, site: str) -> Any:
    from steerlab.sae import SAEConfig, SparseAutoencoder

    cfg = SAEConfig(d_in=d, d_sae=m, architecture="topk", k=6, site=site,
                    jumprelu_init_threshold=0.05)
    sae = SparseAutoencoder(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(m, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae


for _name, _layer, _kw2, _data in (
        ("name-sas-last", 1, {"recipe": "last"}, PAIRS),
        ("name-sas-ab", 1, {"recipe": "ab", "tau": 0.2, "scope": "all"}, AB),
        ("name-sas-mean", 0, {"recipe": "mean", "embed_sae": False}, PAIRS)):
    def _run(layer: int = _layer, kw: dict[str, Any] = _kw2, data: Any = _data) -> Any:
        from steerlab.fitting import fit_method

        lm = _lm()
        d = lm.info.hidden_size
        torch.manual_seed(0)
        return fit_method(lm, "sas", data, layer=layer, cache=False, progress=False,
                          sae=_sae(d, 4 * d, f"resid_post.{layer}"), **kw)
    CASES[_name] = _run


# -- the per-method helpers, with their own keyword arguments ----------------------------------
@case("helper-caa-default")
def _caa_default() -> Any:
    from steerlab.fitting import fit_caa

    return fit_caa(_lm(), PAIRS, cache=False, progress=False)


@case("helper-caa-labelled")
def _caa_labelled() -> Any:
    from steerlab.fitting import fit_caa
    from steerlab.methods import CAA

    return fit_caa(_lm(), LABELLED, CAA(layers=[-1, 0], recipe="mean"), batch_size=3,
                   cache=False, progress=False)


@case("helper-caa-renderer")
def _caa_renderer() -> Any:
    from steerlab.data import Renderer
    from steerlab.fitting import fit_caa
    from steerlab.methods import CAA

    lm = _lm()
    return fit_caa(lm, PAIRS, CAA(layers=1, recipe="mean"),
                   renderer=Renderer(lm.tokenizer, mode="plain"), cache=False, progress=False)


@case("helper-actadd-default")
def _actadd_default() -> Any:
    from steerlab.fitting import fit_actadd

    return fit_actadd(_lm("qwen3", chat=False))


@case("helper-actadd-positional")
def _actadd_positional() -> Any:
    from steerlab.fitting import fit_actadd
    from steerlab.methods import ActAdd

    return fit_actadd(_lm(), ActAdd(layer=-1, mode="positional", positive="Good day",
                                    negative="Bad"))


@case("helper-alqr-concepts")
def _alqr_concepts() -> Any:
    from steerlab.fitting import fit_alqr
    from steerlab.methods import ALQR

    return fit_alqr(_lm(), [PAIRS, LABELLED], ALQR(n_jacobian_prompts=2, max_tokens=8),
                    cache=False, progress=False)


@case("helper-alqr-jacobian-data")
def _alqr_jacobian_data() -> Any:
    from steerlab.fitting import fit_alqr
    from steerlab.methods import ALQRPlus

    return fit_alqr(_lm(), [OTHER, PAIRS], ALQRPlus(recipe="mean", lambdas=[0.5, 1.0]),
                    jacobian_data=["a short text", "another text here"], batch_size=4,
                    cache=False, progress=False)


@case("helper-alqr-default")
def _alqr_default() -> Any:
    from steerlab.fitting import fit_alqr
    from steerlab.methods import ALQR

    return fit_alqr(_lm("qwen3", chat=False), LABELLED, ALQR(n_jacobian_prompts=3),
                    cache=False, progress=False)


@case("helper-spid-concepts")
def _spid_concepts() -> Any:
    from steerlab.fitting import fit_lfs_baseline
    from steerlab.methods import SPID

    return fit_lfs_baseline(_lm(), [PAIRS, OTHER], SPID(recipe="mean"), cache=False,
                            progress=False)


@case("helper-actadd_lfs")
def _actadd_lfs() -> Any:
    from steerlab.fitting import fit_lfs_baseline
    from steerlab.methods import ActAddLFS

    return fit_lfs_baseline(_lm(), LABELLED, ActAddLFS(layers=[0, 1]), cache=False,
                            progress=False)


@case("helper-odesteer-fraction")
def _ode_fraction() -> Any:
    from steerlab.fitting import fit_odesteer
    from steerlab.methods import ODESteer

    return fit_odesteer(_lm(), PAIRS, ODESteer(layer=1, n_components=64), test_fraction=0.3,
                        seed=3, cache=False, progress=False)


@case("helper-odesteer-zero")
def _ode_zero() -> Any:
    from steerlab.fitting import fit_odesteer
    from steerlab.methods import StepODESteer

    return fit_odesteer(_lm(), LABELLED, StepODESteer(layer=-1, n_components=64),
                        test_fraction=0.0, cache=False, progress=False)


@case("helper-odesteer-default")
def _ode_default() -> Any:
    from steerlab.fitting import fit_odesteer
    from steerlab.methods import ODESteer

    return fit_odesteer(_lm(), PAIRS, ODESteer(layer=0, n_components=32), cache=False,
                        progress=False)


@case("helper-innsteer")
def _inn() -> Any:
    from steerlab.fitting import fit_innsteer
    from steerlab.methods import INNSteer

    torch.manual_seed(0)
    return fit_innsteer(_lm(), LABELLED, INNSteer(layer=1, hidden=8, epochs=3,
                                                  warmup_epochs=1),
                        test_fraction=0.25, seed=2, cache=False, progress=False)


@case("helper-innsteer-no-heldout")
def _inn_small() -> Any:
    from steerlab.fitting import fit_innsteer
    from steerlab.methods import INNSteer

    torch.manual_seed(0)
    small = ContrastiveSet(list(PAIRS)[:4], PAIRS.name)
    return fit_innsteer(_lm(), small, INNSteer(layer=0, hidden=8, epochs=3, warmup_epochs=1,
                                               direction="probe"), cache=False, progress=False)


@case("helper-sas")
def _sas() -> Any:
    from steerlab.fitting import fit_sas
    from steerlab.methods import SAS

    lm = _lm()
    d = lm.info.hidden_size
    return fit_sas(lm, PAIRS, SAS(1, sae=_sae(d, 4 * d, "resid_post.1"), recipe="last",
                                  tau=0.05), batch_size=4, cache=False, progress=False)


def _iti(data: Any, **kw: Any) -> Case:
    def run() -> Any:
        from steerlab.fitting import fit_iti
        from steerlab.methods import ITI

        hp = kw.pop("hp", {"top_k": 3})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fit_iti(_lm(), data, ITI(**hp), cache=False, progress=False, **kw)
    return run


CASES["helper-iti-default"] = _iti(PAIRS)
CASES["helper-iti-tuning-pairs"] = _iti(PAIRS, tuning=OTHER)
CASES["helper-iti-tuning-labelled"] = _iti(LABELLED, tuning=UNGROUPED)
CASES["helper-iti-tuning-texts"] = _iti(PAIRS, tuning=["some text", "more text here"])
CASES["helper-iti-fraction-zero"] = _iti(LABELLED, tuning_fraction=0.0)
CASES["helper-iti-fraction"] = _iti(PAIRS, tuning_fraction=0.4,
                                    hp={"top_k": 2, "seed": 5, "layers": [0]})
CASES["helper-iti-too-few"] = _iti(ContrastiveSet(list(PAIRS)[:2], "two"), hp={"top_k": 2})
CASES["helper-iti-mean-tuning-pairs"] = _iti(PAIRS, tuning=OTHER,
                                             hp={"top_k": 2, "recipe": "mean"})


@case("helper-iti-preset")
def _iti_preset() -> Any:
    from steerlab.fitting import fit_iti
    from steerlab.methods import ITI

    return fit_iti(_lm(), PAIRS, ITI.from_preset("paper", top_k=2), cache=False,
                   progress=False)


def _contrastive(make: Callable[[], Any], data: Any = PAIRS, arch: str = "llama",
                 chat: bool = True) -> Case:
    def run() -> Any:
        from steerlab.fitting import fit_contrastive

        return fit_contrastive(_lm(arch, chat), data, make(), cache=False, progress=False)
    return run


def _methods() -> Any:
    import steerlab.methods as m

    return m


CASES["helper-contrastive-repe"] = _contrastive(lambda: _methods().RepE(layers=[-1]))
CASES["helper-contrastive-probe"] = _contrastive(
    lambda: _methods().ProbeDirection(layers=[0, 1], recipe="last"), LABELLED)
CASES["helper-contrastive-mean_act"] = _contrastive(
    lambda: _methods().MeanAcT(layers=1, recipe="ab"), AB)
CASES["helper-contrastive-linear_act"] = _contrastive(
    lambda: _methods().LinearAcT(layers=0, recipe="last"), UNGROUPED)
CASES["helper-contrastive-mimic"] = _contrastive(
    lambda: _methods().MiMiC(layers=[0, -1]), PAIRS, "qwen3", False)
CASES["helper-contrastive-caa"] = _contrastive(lambda: _methods().CAA(layers=-1, recipe="mean"))


@case("helper-angular")
def _angular() -> Any:
    from steerlab.fitting import fit_angular
    from steerlab.methods import AngularSteering

    return fit_angular(_lm(), PAIRS, AngularSteering(layers=[-1], recipe="mean"),
                       cache=False, progress=False)


@case("helper-angular-resid_pre")
def _angular_pre() -> Any:
    from steerlab.fitting import fit_angular
    from steerlab.methods import AngularSteering

    return fit_angular(_lm("qwen3", chat=False), AB, AngularSteering(
        layers=[0, 1], recipe="ab", site="resid_pre", adaptive=True), cache=False,
        progress=False)


# -- refusals: the same error, with the same message --------------------------------------------
def _refused(fn: Case) -> Case:
    def run() -> Any:
        try:
            fn()
        except Exception as exc:  # the error itself is the case result
            return exc
        raise AssertionError("the case should have been refused")
    return run


CASES["refused-actadd-data"] = _refused(by_name("actadd", PAIRS, layer=1))
CASES["refused-caa-ab-free-text"] = _refused(by_name("caa", PAIRS, layer=1, recipe="ab"))
CASES["refused-alqr-ab-free-text"] = _refused(by_name("alqr", PAIRS, recipe="ab",
                                                      n_jacobian_prompts=2))
CASES["refused-probe-labelled-mean"] = _refused(by_name("probe", LABELLED, layer=1,
                                                        recipe="mean"))
CASES["refused-iti-tuning-and-fraction"] = _refused(_iti(PAIRS, tuning=OTHER,
                                                         tuning_fraction=0.3))
CASES["refused-iti-bad-fraction"] = _refused(_iti(PAIRS, tuning_fraction=1.5))
CASES["refused-iti-tuning-texts-mean"] = _refused(_iti(
    PAIRS, tuning=["a text"], hp={"top_k": 2, "recipe": "mean"}))


@case("refused-ode-bad-fraction")
@_refused
def _ode_bad() -> Any:
    from steerlab.fitting import fit_odesteer
    from steerlab.methods import ODESteer

    return fit_odesteer(_lm(), PAIRS, ODESteer(layer=1, n_components=32), test_fraction=1.0,
                        cache=False, progress=False)


@case("refused-sas-width")
@_refused
def _sas_width() -> Any:
    from steerlab.fitting import fit_sas
    from steerlab.methods import SAS

    return fit_sas(_lm(), PAIRS, SAS(1, sae=_sae(8, 16, "resid_post.1"), recipe="last"),
                   cache=False, progress=False)


@case("refused-iti-labelled-mixed-groups")
@_refused
def _iti_mixed() -> Any:
    from steerlab.fitting import fit_iti
    from steerlab.methods import ITI

    mixed = LabeledSet(list(LABELLED)[:4] + list(UNGROUPED), "mixed")
    return fit_iti(_lm(), mixed, ITI(top_k=2), tuning_fraction=0.0, cache=False,
                   progress=False)


# -- what is compared -----------------------------------------------------------------------
def _no_timing(value: Any) -> Any:
    """``value`` without the timing entries (keys ending in ``_seconds``), recursively."""
    if isinstance(value, dict):
        return {k: _no_timing(v) for k, v in value.items() if not str(k).endswith("_seconds")}
    if isinstance(value, list | tuple):
        return [_no_timing(v) for v in value]
    return value


def snapshot(result: Any) -> tuple[dict[str, torch.Tensor], str]:
    """A fitted controller's state tensors and, as canonical JSON, everything else a fit
    sets (class, sites, hyper-parameters, fit_info without timings, fit options, data
    fingerprint, model); a refusal's error type and message."""
    import dataclasses
    import json

    if isinstance(result, BaseException):
        return {}, json.dumps({"error": type(result).__name__, "message": str(result)})
    info = result.model_info
    meta = {
        "class": type(result).__name__,
        "sites": [str(s) for s in result.sites],
        "hyperparameters": result.hyperparameters(),
        "fit_info": _no_timing(result.fit_info),
        "fit_options": result.fit_options,
        "data_fingerprint": result.data_fingerprint,
        "model_info": dataclasses.asdict(info) if info is not None else None,
        "default_scope": str(result.default_scope),
    }
    tensors = {k: v.detach().contiguous().clone() for k, v in result.state_dict().items()}
    return tensors, json.dumps(meta, sort_keys=True, default=repr)
