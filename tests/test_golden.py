"""Golden artifacts (issue 18, step 0): files written by an earlier steerlab still load,
steer and re-save exactly as they did.

``tests/golden/`` holds, for every registered method, an artifact fitted on a tiny llama-style
model (saved in ``tests/golden/model/``) and what it did at strength 1 on its default scope
to a fixed left-padded batch of two prompts: the logits of one forward pass, 4 greedy tokens
and the logits of those generation steps (``<method>.expected.safetensors``). They were
written by ``scripts/make_golden.py``; see ``tests/golden/README.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from steerlab import artifacts
from steerlab.cli import app
from steerlab.methods import METHODS
from steerlab.models import LoadedModel, wrap_model
from steerlab.runtime import Steer, generate, steering, tokenize_prompts

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GOLDEN = Path(__file__).parent / "golden"
MODEL_ID = "golden-tiny-llama"  # the id scripts/make_golden.py gives the model
ARTIFACTS = sorted(p for p in GOLDEN.glob("*.safetensors")
                   if not p.name.endswith(".expected.safetensors"))
RTOL = ATOL = 1e-5

# Metadata fields that legitimately differ when a loaded artifact is saved again: the time of
# writing, and the version of the steerlab that writes it. Everything else must round-trip.
ENVIRONMENT_FIELDS = frozenset({"created", "library_version"})


def _method(path: Path) -> str:
    return path.name.removesuffix(".safetensors")


def _header(path: Path) -> dict[str, Any]:
    """The artifact's raw JSON metadata document (no validation)."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {})["steerlab"]
    doc = json.loads(raw)
    assert isinstance(doc, dict)
    return doc


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def golden_lm() -> LoadedModel:
    """The golden tiny model, rebuilt from ``tests/golden/model`` (config + state dict)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = GOLDEN / "model"
    config = AutoConfig.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                             dtype=torch.float32)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = (
        config.pad_token_id, config.bos_token_id, config.eos_token_id)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                  bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.padding_side = "left"
    return wrap_model(model, tok, model_id=MODEL_ID)


def _steered(lm: LoadedModel, controller: Any, enc: dict[str, torch.Tensor],
             max_new_tokens: int, strength: float) -> dict[str, torch.Tensor]:
    """Logits of the batch, greedy new tokens and their step logits under steering (the
    controller's default scope), as scripts/make_golden.py computed them."""
    steer = Steer(controller, strength)
    with torch.no_grad():
        with steering(lm, steer):
            logits = lm.model(**enc).logits
        with steering(lm, steer):
            out = lm.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=lm.tokenizer.pad_token_id, temperature=None, top_p=None,
                top_k=None, output_logits=True, return_dict_in_generate=True)
    return {"logits": logits.float(),
            "tokens": out.sequences[:, enc["input_ids"].shape[1]:],
            "generate_logits": torch.stack(out.logits, dim=1).float()}


def test_every_registered_method_has_a_golden_artifact() -> None:
    have = {_method(p) for p in ARTIFACTS}
    missing = sorted(set(METHODS) - have)
    assert not missing, f"no golden artifact for {missing}: run scripts/make_golden.py"
    unknown = sorted(have - set(METHODS))
    assert not unknown, f"golden artifacts of methods no longer registered: {unknown}"
    for path in ARTIFACTS:
        assert (GOLDEN / f"{_method(path)}.expected.safetensors").is_file(), path.name
        assert _header(path)["method"] == _method(path)


def test_golden_model_is_the_one_the_artifacts_were_fitted_on(golden_lm: LoadedModel) -> None:
    for path in ARTIFACTS:
        assert _header(path)["model"]["fingerprint"] == golden_lm.info.fingerprint, path.name


@pytest.mark.parametrize("path", ARTIFACTS, ids=_method)
def test_golden_artifact_steers_as_recorded(path: Path, golden_lm: LoadedModel) -> None:
    lm = golden_lm
    expected_path = GOLDEN / f"{_method(path)}.expected.safetensors"
    expected = load_file(str(expected_path))
    with safe_open(str(expected_path), framework="pt") as f:
        info = f.metadata() or {}
    prompts: list[str] = json.loads(info["prompts"])
    max_new_tokens = int(json.loads(info["max_new_tokens"]))
    strength = float(json.loads(info["strength"]))

    controller = artifacts.load(path, lm.info)
    assert controller.method == _method(path)
    assert str(controller.default_scope) == info["scope"]
    enc = tokenize_prompts(lm, prompts, rendered=False)
    assert torch.equal(enc["input_ids"], expected["input_ids"])
    assert torch.equal(enc["attention_mask"], expected["attention_mask"])
    assert not bool(expected["attention_mask"].all()), "the batch should be left-padded"

    got = _steered(lm, controller, enc, max_new_tokens, strength)
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=RTOL, atol=ATOL)
    assert torch.equal(got["tokens"], expected["tokens"]), \
        f"greedy tokens {got['tokens'].tolist()} != {expected['tokens'].tolist()}"
    torch.testing.assert_close(got["generate_logits"], expected["generate_logits"],
                               rtol=RTOL, atol=ATOL)
    texts = generate(lm, prompts, steers=Steer(controller, strength),
                     max_new_tokens=max_new_tokens, render=False)
    assert texts == json.loads(info["texts"])


@pytest.mark.parametrize("path", ARTIFACTS, ids=_method)
def test_golden_artifact_resaves_to_the_same_file(path: Path, golden_lm: LoadedModel,
                                                  tmp_path: Path) -> None:
    controller = artifacts.load(path, golden_lm.info)
    again = artifacts.save(controller, tmp_path / path.name)
    old, new = _header(path), _header(again)
    for doc in (old, new):
        for name in ENVIRONMENT_FIELDS:
            doc.pop(name, None)
    assert new == old
    old_t, new_t = _tensors(path), _tensors(again)
    assert sorted(new_t) == sorted(old_t)
    for name, t in old_t.items():
        assert new_t[name].dtype == t.dtype and new_t[name].shape == t.shape, name
        assert torch.equal(new_t[name], t), name


def test_inspect_reads_a_golden_artifact() -> None:
    path = GOLDEN / "caa.safetensors"
    r = CliRunner().invoke(app, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert "caa" in r.output and "resid_post.1" in r.output
    assert _header(path)["data_fingerprint"][:8] in r.output
