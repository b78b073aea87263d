"""Interop with the real ``sae-lens`` package (skipped where it is not installed).

Both directions, for every architecture the two share (SAELens ``standard`` = our ``relu``,
``topk``, ``jumprelu``):

1. a steerlab SAE saved with :func:`steerlab.sae.save_saelens` loads with SAELens's own
   ``SAE.load_from_disk`` and encodes/decodes the same;
2. an SAE built with SAELens's own config classes and saved with its own ``save_model`` (or
   ``save_inference_model`` for its training SAEs) loads with :func:`steerlab.sae.load_saelens`
   and encodes/decodes the same.

"The same" is to 1e-5 absolute (codes and reconstructions are O(1) here), on random inputs
and on random codes; most cases agree bit for bit, TopK with decoder-norm rescaling (folded
into the weights on load) to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from sae_lens import (  # noqa: E402
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)

from steerlab.sae import (  # noqa: E402
    SAEConfig,
    SparseAutoencoder,
    load_saelens,
    save_saelens,
    train_sae,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

D_IN, D_SAE, K = 32, 128, 8
HOOK, MODEL = "blocks.3.hook_resid_post", "tiny-model"
TOL: dict[str, float] = {"atol": 1e-5, "rtol": 0.0}  # absolute; values are O(1)
SAELENS_CLASS = {"relu": StandardSAE, "topk": TopKSAE, "jumprelu": JumpReLUSAE}


def _inputs(seed: int = 7, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) + 0.5 * torch.randn(D_IN, generator=g)


def _codes(seed: int = 8, n: int = 16) -> torch.Tensor:
    """Arbitrary non-negative codes, to compare decode beyond what encode produces."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, D_SAE, generator=g))


def _compare(ours: SparseAutoencoder, theirs: Any, x: torch.Tensor) -> None:
    """encode, decode (of our codes and of random codes) and the full pass agree."""
    theirs.eval()
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        assert f_ours.shape == f_theirs.shape == (x.shape[0], D_SAE)
        assert bool((f_ours != 0).any()), "degenerate test: no feature fires"
        torch.testing.assert_close(f_theirs, f_ours, **TOL)
        torch.testing.assert_close(theirs.decode(f_ours), ours.decode(f_ours), **TOL)
        c = _codes()
        torch.testing.assert_close(theirs.decode(c), ours.decode(c), **TOL)
        torch.testing.assert_close(theirs(x), ours(x), **TOL)
        if ours.config.architecture == "topk":
            assert int((f_ours != 0).sum(-1).max()) <= ours.config.k


def _gate_bites(pre: torch.Tensor, theta: torch.Tensor) -> None:
    """The JumpReLU threshold matters for these inputs: some positive pre-activations are
    gated off and some pass (otherwise a JumpReLU and a ReLU would look alike)."""
    gated = (pre > 0) & (pre <= theta)
    assert bool(gated.any()) and bool((pre > theta).any()), "degenerate JumpReLU test"


# -- 1. steerlab -> SAELens --------------------------------------------------------------------
def _random_steerlab(config: SAEConfig, seed: int = 1) -> SparseAutoencoder:
    """A steerlab SAE with all parameters random: non-zero biases, unnormalised decoder rows,
    JumpReLU thresholds spread over the range of the pre-activations."""
    sae = SparseAutoencoder(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "log_threshold":
                p.copy_(torch.log(torch.rand(p.shape, generator=g, dtype=torch.float64) * 1.5
                                  + 0.02))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return sae


STEERLAB_CASES = [
    SAEConfig(D_IN, D_SAE, "relu", hook_name=HOOK, model_name=MODEL),
    SAEConfig(D_IN, D_SAE, "relu", apply_b_dec_to_input=False, site="resid_pre.2"),
    SAEConfig(D_IN, D_SAE, "topk", k=K, hook_name=HOOK, model_name=MODEL),
    SAEConfig(D_IN, D_SAE, "topk", k=K, tied=True),
    SAEConfig(D_IN, D_SAE, "jumprelu", hook_name=HOOK, model_name=MODEL),
    SAEConfig(D_IN, D_SAE, "jumprelu", apply_b_dec_to_input=False),
]
STEERLAB_IDS = ["relu", "relu-no-bdec-in", "topk", "topk-tied", "jumprelu",
                "jumprelu-no-bdec-in"]


def _check_loaded_by_saelens(ours: SparseAutoencoder, folder: Path) -> Any:
    theirs = SAE.load_from_disk(folder)
    c = ours.config
    assert type(theirs) is SAELENS_CLASS[c.architecture]
    assert (theirs.cfg.d_in, theirs.cfg.d_sae) == (D_IN, D_SAE)
    assert theirs.cfg.apply_b_dec_to_input is c.apply_b_dec_to_input
    assert theirs.cfg.normalize_activations == "none"
    assert theirs.cfg.reshape_activations == "none"
    assert theirs.cfg.metadata.hook_name == c.hook_name
    assert theirs.cfg.metadata.model_name == c.model_name
    if c.architecture == "topk":
        assert theirs.cfg.k == c.k
        assert theirs.cfg.rescale_acts_by_decoder_norm is False
    x = _inputs()
    if c.architecture == "jumprelu":
        torch.testing.assert_close(theirs.threshold.detach(), ours.threshold(), atol=0, rtol=0)
        _gate_bites(ours.pre_acts(x).detach(), ours.threshold().detach())
    _compare(ours, theirs, x)
    return theirs


@pytest.mark.parametrize("config", STEERLAB_CASES, ids=STEERLAB_IDS)
def test_steerlab_sae_loads_in_saelens(config: SAEConfig, tmp_path: Path) -> None:
    ours = _random_steerlab(config)
    theirs = _check_loaded_by_saelens(ours, save_saelens(ours, tmp_path / "sae"))
    # and back: SAELens re-saves it, steerlab reads that as the SAE it started from
    theirs.save_model(tmp_path / "resaved")
    back = load_saelens(tmp_path / "resaved")
    assert back.config.architecture == config.architecture
    assert back.config.hook_name == config.hook_name
    _compare(back, theirs, _inputs(seed=9))


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_briefly_trained_steerlab_sae_loads_in_saelens(arch: str, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(64, D_IN, generator=g), dim=1)
    codes = torch.relu(torch.randn(1024, 64, generator=g) - 1.0) * 3
    acts = codes @ dirs + 0.5 + 0.05 * torch.randn(1024, D_IN, generator=g)
    config = SAEConfig(D_IN, D_SAE, arch, k=K if arch == "topk" else None,  # type: ignore[arg-type]
                       hook_name=HOOK, model_name=MODEL)
    ours, _ = train_sae(acts, config, epochs=2, batch_size=256, progress=False)
    assert bool(ours.b_dec.detach().abs().max() > 0) and bool(ours.b_enc.detach().abs().max() > 0)
    theirs = SAE.load_from_disk(save_saelens(ours, tmp_path / "sae"))
    _compare(ours, theirs, acts[:64])


# -- 2. SAELens -> steerlab --------------------------------------------------------------------
def _randomise_saelens(sae: Any, seed: int = 2, threshold_low: float = 0.05) -> Any:
    """Random values in every tensor of a SAELens SAE (biases non-zero, decoder rows of
    varied norms); JumpReLU thresholds uniform in [threshold_low, threshold_low + 1.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + threshold_low)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return sae


def _meta() -> Any:
    return sae_lens.saes.sae.SAEMetadata(hook_name=HOOK, model_name=MODEL)


# id -> (a SAELens SAE factory, our architecture). Inference SAEs are saved with save_model,
# training SAEs (TopK's defaults to rescale_acts_by_decoder_norm=True) with save_inference_model.
SAELENS_CASES: dict[str, tuple[Any, str]] = {
    "standard": (lambda: StandardSAE(StandardSAEConfig(D_IN, D_SAE, metadata=_meta())),
                 "relu"),
    "standard-no-bdec-in": (lambda: StandardSAE(StandardSAEConfig(
        D_IN, D_SAE, apply_b_dec_to_input=False)), "relu"),
    "topk": (lambda: TopKSAE(TopKSAEConfig(D_IN, D_SAE, k=K, metadata=_meta())), "topk"),
    "topk-rescaled": (lambda: TopKSAE(TopKSAEConfig(
        D_IN, D_SAE, k=K, rescale_acts_by_decoder_norm=True)), "topk"),
    "topk-training": (lambda: TopKTrainingSAE(TopKTrainingSAEConfig(D_IN, D_SAE, k=K)),
                      "topk"),
    "jumprelu": (lambda: JumpReLUSAE(JumpReLUSAEConfig(D_IN, D_SAE, metadata=_meta())),
                 "jumprelu"),
    "jumprelu-no-bdec-in": (lambda: JumpReLUSAE(JumpReLUSAEConfig(
        D_IN, D_SAE, apply_b_dec_to_input=False)), "jumprelu"),
    "jumprelu-training": (lambda: JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(D_IN, D_SAE)),
                          "jumprelu"),
}


@pytest.mark.parametrize("case_id", list(SAELENS_CASES))
def test_saelens_sae_loads_in_steerlab(case_id: str, tmp_path: Path) -> None:
    make, arch = SAELENS_CASES[case_id]
    theirs = _randomise_saelens(make())
    folder = tmp_path / "sae"
    trained = None
    if hasattr(theirs, "save_inference_model"):  # a TrainingSAE
        theirs.save_inference_model(folder)
        trained, theirs = theirs, SAE.load_from_disk(folder)  # the inference SAE of its files
    else:
        theirs.save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"] == sae_lens.__version__
    ours = load_saelens(folder)
    c = ours.config
    assert (c.architecture, c.d_in, c.d_sae) == (arch, D_IN, D_SAE)
    assert c.apply_b_dec_to_input is theirs.cfg.apply_b_dec_to_input
    assert c.hook_name == (theirs.cfg.metadata.hook_name or "")
    assert c.model_name == (theirs.cfg.metadata.model_name or "")
    if c.hook_name:
        assert c.site == "resid_post.3"
    if arch == "topk":
        assert c.k == K
    x = _inputs()
    if arch == "jumprelu":
        _gate_bites(ours.pre_acts(x).detach(), ours.threshold().detach())
    _compare(ours, theirs, x)
    if trained is not None:
        _compare(ours, trained, x)


def test_saelens_jumprelu_with_non_positive_thresholds(tmp_path: Path) -> None:
    """SAELens computes ReLU(z)·H(z − θ); for θ ≤ 0 that is ReLU(z), which steerlab gets by
    clamping θ to the smallest positive float."""
    theirs = _randomise_saelens(JumpReLUSAE(JumpReLUSAEConfig(D_IN, D_SAE)),
                                threshold_low=-0.75)
    assert bool((theirs.threshold <= 0).any())
    theirs.save_model(tmp_path / "sae")
    _compare(load_saelens(tmp_path / "sae"), theirs, _inputs())
