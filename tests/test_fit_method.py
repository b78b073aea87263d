"""fit_method: every registered method fitted by name (the harness and the CLI rely on it)."""

from __future__ import annotations

import pytest
import torch

from steerlab.data import ContrastivePair, ContrastiveSet
from steerlab.errors import SteeringError
from steerlab.fitting import build_controller, fit_method
from steerlab.methods import METHODS
from steerlab.runtime import Steer, generate
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PAIRS = ContrastiveSet([
    ContrastivePair(f"Tell me about day {i}.", f"It was wonderful and happy {i}.",
                    f"It was awful and sad {i}.") for i in range(8)
], name="tiny-sentiment")

# Methods whose fitting needs more than a contrastive set (an SAE; ActAdd's own prompts fit
# too, but read no data) are checked by their own tests.
SKIP = {"sas"}


@pytest.mark.parametrize("method", sorted(set(METHODS) - SKIP))
def test_every_method_fits_by_name_and_steers(method: str) -> None:
    lm = tiny_model("llama", chat=True)
    hp = {"epochs": 3, "warmup_epochs": 1} if method == "innsteer" else {}
    if method == "iti":
        hp = {"top_k": 2}
    data = None if method == "actadd" else PAIRS  # ActAdd reads its own prompt pair
    c = fit_method(lm, method, data, layer=-1, recipe="mean", scope="all", **hp)
    assert c.is_fitted and c.model_info == lm.info
    assert "fit_seconds" in c.fit_info
    out = generate(lm, ["Hello there"], steers=Steer(c, 1.0), max_new_tokens=3)
    assert len(out) == 1


def test_build_controller_maps_layer_and_rejects_unknown_hyperparameters() -> None:
    lm = tiny_model("llama", chat=True)
    assert build_controller("caa", lm, layer=-1).layers == [lm.info.num_layers - 1]
    assert build_controller("odesteer", lm, layer=0).layer == 0
    with pytest.raises(SteeringError, match="no hyper-parameter bogus"):
        build_controller("caa", lm, layer=0, bogus=1)
    with pytest.raises(SteeringError, match="unknown method"):
        build_controller("nope", lm)
    probe = fit_method(lm, "probe", PAIRS, layer=0)
    assert [str(s) for s in probe.sites] == ["resid_post.0"]
    assert all(torch.isfinite(v).all() for v in probe.vectors.values())


def _fitted(method: str) -> object:
    lm = tiny_model("llama", chat=True)
    if method == "sas":
        from steerlab.methods import SAS
        from test_sas import _data, _sae

        d = lm.info.hidden_size
        c = SAS(1, sae=_sae("topk", d=d, m=4 * d), tau=0.1, scope="all")
        c.fit(*_data(d=d))
        c.model_info = lm.info
        return c
    hp: dict[str, object] = {"epochs": 3, "warmup_epochs": 1} if method == "innsteer" else {}
    if method == "iti":
        hp = {"top_k": 2}
    data = None if method == "actadd" else PAIRS
    return fit_method(lm, method, data, layer=-1, recipe="mean", scope="all", **hp)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_strength_zero_is_exactly_the_unsteered_model(method: str) -> None:
    """docs/strength.md: strength 0 is the unsteered model for every registered method,
    bit for bit (logits of a padded batch, and greedy tokens), alone or beside other rows."""
    from steerlab.runtime import steering, tokenize_prompts

    lm = tiny_model("llama", chat=True)
    c = _fitted(method)
    prompts = ["Hello there", "a much longer prompt than the first one"]
    enc = tokenize_prompts(lm, prompts, rendered=False)
    with torch.no_grad():
        plain = lm.model(**enc).logits
        with steering(lm, Steer(c, 0.0)):  # type: ignore[arg-type]
            zero = lm.model(**enc).logits
        with steering(lm, Steer(c, 1.0)):  # type: ignore[arg-type]
            one = lm.model(**enc).logits
    assert torch.equal(zero, plain)
    assert not torch.equal(one, plain), "strength 1 must steer (the test could not fail)"
    base = generate(lm, prompts, max_new_tokens=4, render=False)
    rows = generate(lm, prompts, rows=[[Steer(c, 0.0)], [Steer(c, 0.0)]],  # type: ignore[arg-type]
                    max_new_tokens=4, render=False)
    assert rows == base


def test_data_that_a_method_cannot_use_is_refused() -> None:
    """ActAdd given a data set (it reads its own prompt pair), and recipe ``ab`` on
    completions that are not answer choices, are refused instead of silently misread."""
    from steerlab.errors import DataError

    lm = tiny_model("llama", chat=True)
    with pytest.raises(DataError, match="own prompt pair"):
        fit_method(lm, "actadd", PAIRS, layer=1)
    for method in ("caa", "sas", "repe", "alqr"):
        kw: dict[str, object] = {"n_jacobian_prompts": 2} if method == "alqr" else {}
        if method == "sas":
            from test_sas import _sae

            kw["sae"] = _sae("topk", d=lm.info.hidden_size, m=4 * lm.info.hidden_size)
        with pytest.raises(DataError, match="not an answer choice"):
            fit_method(lm, method, PAIRS, layer=1, recipe="ab", **kw)
