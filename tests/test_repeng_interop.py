"""repeng (the real package, an optional extra: ``pip install --no-deps repeng==0.4.0``)
and steerlab read each other's GGUF control vectors exactly, and repeng's ControlModel
steers with our vector as steerlab does (logits equal).

repeng 0.4 uses ``np.float_``, removed in NumPy 2: the test restores the alias first, as a
user of repeng on NumPy 2 must."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

if not hasattr(np, "float_"):
    np.float_ = np.float64  # type: ignore[attr-defined]
repeng = pytest.importorskip("repeng")

from steerlab import artifacts  # noqa: E402
from steerlab.methods import CAA  # noqa: E402
from steerlab.runtime import Steer, steering  # noqa: E402
from steerlab.sites import Site  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _caa(width: int) -> CAA:
    g = torch.Generator().manual_seed(0)
    c = CAA(layers=[1], scope="all")
    c.set_vectors({Site("resid_post", 1): torch.randn(width, generator=g)})
    return c


def test_gguf_both_ways_and_same_logits(tmp_path: Path) -> None:
    ours_lm = build_tiny_model("llama", seed=21)
    theirs_model = build_tiny_model("llama", seed=21).model  # repeng wraps its blocks in place
    caa = _caa(ours_lm.info.hidden_size)
    caa.model_info = ours_lm.info
    # ours -> repeng
    path = artifacts.export_gguf(caa, tmp_path / "ours.gguf")
    cv = repeng.ControlVector.import_gguf(str(path))
    assert sorted(cv.directions) == [1]
    np.testing.assert_array_equal(cv.directions[1], caa.vectors[Site("resid_post", 1)].numpy())
    # repeng -> ours
    rng = np.random.default_rng(1)
    theirs = repeng.ControlVector(model_type="llama",
                                  directions={1: rng.standard_normal(32).astype(np.float32)})
    theirs.export_gguf(str(tmp_path / "theirs.gguf"))
    back = artifacts.import_gguf(tmp_path / "theirs.gguf", ours_lm.info)
    assert torch.equal(back.vectors[Site("resid_post", 1)], torch.from_numpy(theirs.directions[1]))
    assert str(back.default_scope) == "all"
    # repeng's ControlModel with our vector = steerlab's steering at every token
    control = repeng.ControlModel(theirs_model, [1])
    ids = ours_lm.tokenizer(["the cat sat on the mat"], return_tensors="pt")["input_ids"]
    for coeff in (2.0, -1.5):
        control.set_control(cv, coeff)
        with torch.no_grad():
            got = control(input_ids=ids).logits
            with steering(ours_lm, Steer(caa, coeff)):
                want = ours_lm.model(input_ids=ids).logits
            plain = ours_lm.model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - plain).abs().max() > 1e-2
    control.reset()
