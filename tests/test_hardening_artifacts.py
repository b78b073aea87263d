"""Hardening of artifact loading: a malformed header or a controller that cannot steer fails
when the file is read, with an :class:`ArtifactError` naming the field or the reason, in the
library (``read_metadata``, ``load``) and on the command line (exit status 2, one line, no
traceback), never later with a TypeError where a field is used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from steerlab import artifacts
from steerlab.cli import app
from steerlab.errors import ArtifactError
from steerlab.methods.base import Controller, StepContext
from steerlab.methods.caa import CAA
from steerlab.sites import Site
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

D = 32  # the tiny models' hidden size


def good_meta() -> dict[str, Any]:
    lm = tiny_model("llama")
    c = CAA(layers=[1])
    c.set_vectors({Site("resid_post", 1): torch.ones(D)})
    c.model_info = lm.info
    return artifacts.metadata(c)


def write(path: Path, meta: Any, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    save_file(tensors if tensors is not None else {"resid_post.1": torch.ones(D)}, str(path),
              metadata={"steerlab": json.dumps(meta)})
    return path


def _set(meta: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(meta))
    where, _, leaf = key.rpartition(".")
    target = out[where] if where else out
    if value is _DROP:
        target.pop(leaf)
    else:
        target[leaf] = value
    return out


_DROP = object()

# (field to change, its new value, the field the message must name)
MALFORMED: list[tuple[str, Any, str]] = [
    ("format_version", "abc", "format_version"),
    ("format_version", 1.5, "format_version"),
    ("format_version", True, "format_version"),
    ("format_version", -1, "format_version"),
    ("format_version", None, "format_version"),
    ("method", 5, "method"),
    ("method", "", "method"),
    ("method", _DROP, "method"),
    ("method", ["caa"], "method"),
    ("sites", 8, "sites"),
    ("sites", "resid_post.1", "sites"),
    ("sites", [], "sites"),
    ("sites", [1], "sites"),
    ("sites", ["resid_mid.1"], "sites"),
    ("sites", ["resid_post.x"], "sites"),
    ("sites", _DROP, "sites"),
    ("model", "tiny-llama", "model"),
    ("model", [1, 2], "model"),
    ("model", 3, "model"),
    ("model.hidden_size", "abc", "model.hidden_size"),
    ("model.hidden_size", True, "model.hidden_size"),
    ("model.hidden_size", 0, "model.hidden_size"),
    ("model.hidden_size", 32.0, "model.hidden_size"),
    ("model.num_layers", "2", "model.num_layers"),
    ("model.num_layers", None, "model.num_layers"),
    ("model.model_id", 5, "model.model_id"),
    ("model.architecture", None, "model.architecture"),
    ("model.is_chat", "yes", "model.is_chat"),
    ("model.model_id", _DROP, "model_id"),
    ("fit", [1, 2], "fit"),
    ("fit", "fast", "fit"),
    ("hyperparameters", [1], "hyperparameters"),
    ("hyperparameters", "layers=1", "hyperparameters"),
    ("data_fingerprint", 5, "data_fingerprint"),
    ("library_version", 1, "library_version"),
    ("created", {"y": 2026}, "created"),
]
IDS = [f"{key}={value!r}"[:40] for key, value, _ in MALFORMED]


@pytest.fixture
def malformed(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    key, value, field = request.param
    return write(tmp_path / "bad.safetensors", _set(good_meta(), key, value)), field


@pytest.mark.parametrize("malformed", MALFORMED, ids=IDS, indirect=True)
def test_read_metadata_and_load_name_the_malformed_field(malformed: tuple[Path, str]) -> None:
    path, field = malformed
    for read in (artifacts.read_metadata, artifacts.load,
                 lambda p: artifacts.load(p, tiny_model("llama").info)):
        with pytest.raises(ArtifactError) as err:
            read(path)
        assert field in str(err.value) and str(path) in str(err.value)


def one_line_error(args: list[str]) -> str:
    result = CliRunner(env={"COLUMNS": "10000"}).invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                     SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("malformed", MALFORMED, ids=IDS, indirect=True)
def test_cli_inspect_gives_one_line_errors(malformed: tuple[Path, str]) -> None:
    path, field = malformed
    assert field in one_line_error(["inspect", str(path)])


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("hyperparameters", {"layers": "abc"}, "hyper-parameters do not match"),
    ("hyperparameters", {"bogus": 1}, "hyper-parameters do not match"),
    ("hyperparameters", {"layers": [1], "scope": 5}, "hyper-parameters do not match"),
    ("model.hidden_size", 31, "shape (32,)"),
    ("sites", ["resid_post.7"], "do not match"),
])
def test_load_and_export_refuse_what_the_schema_allows_but_cannot_steer(
        tmp_path: Path, key: str, value: Any, needle: str) -> None:
    path = write(tmp_path / "odd.safetensors", _set(good_meta(), key, value))
    artifacts.read_metadata(path)  # the header's types are fine
    with pytest.raises(ArtifactError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        artifacts.load(path)
    assert needle in one_line_error(["export-gguf", str(path), str(tmp_path / "out.gguf")])
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize(("vector", "needle"), [
    (torch.ones(2, D), "shape (2, 32)"),
    (torch.tensor(1.0), "shape ()"),
    (torch.ones(D - 1), "shape (31,)"),
    (torch.ones(D + 1), "shape (33,)"),
])
def test_load_checks_vectors_against_the_model(tmp_path: Path, vector: torch.Tensor,
                                               needle: str) -> None:
    path = write(tmp_path / "v.safetensors", good_meta(), {"resid_post.1": vector})
    for info in (None, tiny_model("llama").info):  # the artifact's own record, or the model's
        with pytest.raises(ArtifactError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            artifacts.load(path, info)


def test_load_checks_sites_against_the_model(tmp_path: Path) -> None:
    meta = _set(good_meta(), "sites", ["resid_post.5"])
    path = write(tmp_path / "far.safetensors", meta, {"resid_post.5": torch.ones(D)})
    with pytest.raises(ArtifactError, match="out of range: the model has 2 blocks"):
        artifacts.load(path)


class Odd(Controller):
    """A method whose steer misbehaves as told (registered for one test)."""

    method = "odd"

    def __init__(self, how: str = "ok") -> None:
        super().__init__()
        self.how = how

    def steer(self, site: Site, h: torch.Tensor, strength: torch.Tensor,
              ctx: StepContext) -> torch.Tensor:
        if self.how == "raise":
            raise RuntimeError("The size of tensor a (575) must match the size of tensor b")
        if self.how == "shape":
            return h.sum(dim=1)
        if self.how == "inf":
            return h + float("inf")
        if self.how == "tuple":
            return (h,)  # type: ignore[return-value]
        return h

    def hyperparameters(self) -> dict[str, Any]:
        return {"how": self.how}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": torch.ones(1)}

    def load_state(self, tensors: dict[str, torch.Tensor], sites: list[Site]) -> None:
        self.sites = list(sites)


@pytest.mark.parametrize(("how", "needle"), [
    ("raise", "raised RuntimeError"), ("shape", "returned shape"), ("inf", "NaN or inf"),
    ("tuple", "not a tensor"), ("ok", None),
])
def test_load_dry_steers_the_controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        how: str, needle: str | None) -> None:
    monkeypatch.setitem(artifacts.METHODS, "odd", Odd)
    meta = {**good_meta(), "method": "odd", "hyperparameters": {"how": how}}
    path = write(tmp_path / "odd.safetensors", meta, {"w": torch.ones(1)})
    if needle is None:
        assert isinstance(artifacts.load(path), Odd)
        return
    with pytest.raises(ArtifactError, match=needle):
        artifacts.load(path)


def test_check_controller_uses_the_model_dtype() -> None:
    c = CAA(layers=[1])
    c.set_vectors({Site("resid_post", 1): torch.ones(D)})
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        artifacts.check_controller(c, num_layers=2, width=lambda s: D, dtype=dtype)
    with pytest.raises(ArtifactError, match="no sites"):
        artifacts.check_controller(CAA(layers=[1]), num_layers=2, width=lambda s: D)
