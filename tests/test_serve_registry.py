"""Loading a server's controllers from a folder, and resolving request steering specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steerlab import artifacts
from steerlab.errors import ArtifactError, SteeringError
from steerlab.methods.caa import CAA
from steerlab.models import LoadedModel
from steerlab.scope import GENERATED
from steerlab.serve.registry import ControllerRegistry, SteeringSpec
from steerlab.sites import Site
from tiny_models import tiny_model


def caa_for(lm: LoadedModel, layer: int = 1, width: int | None = None) -> CAA:
    c = CAA(layers=[layer], scope="all")
    c.set_vectors({Site("resid_post", layer): torch.randn(width or lm.info.hidden_size)})
    c.model_info = lm.info
    return c


@pytest.fixture
def lm() -> LoadedModel:
    return tiny_model("llama")


def test_stems_manifest_aliases_and_gguf(lm: LoadedModel, tmp_path: Path) -> None:
    artifacts.save(caa_for(lm), tmp_path / "mood.safetensors")
    artifacts.save(caa_for(lm, 0), tmp_path / "topic.safetensors")
    artifacts.export_gguf(caa_for(lm, 1), tmp_path / "cv.gguf")
    (tmp_path / "controllers.json").write_text(json.dumps({
        "up": {"file": "mood.safetensors", "strength": 3.0, "scope": "generated",
               "description": "more"},
        "down": {"file": "mood.safetensors", "strength": -3.0, "max_strength": 5},
        "topic": {"strength": 2.0},
    }))
    reg = ControllerRegistry.from_dir(tmp_path, lm.info, max_strength=20)
    assert reg.names == ["cv", "down", "topic", "up"]  # "mood" is claimed by up/down
    assert reg.get("up").controller is reg.get("down").controller  # loaded once
    assert reg.get("cv").controller.method == "caa"
    assert reg.get("topic").strength == 2.0 and reg.get("topic").max_strength == 20
    d = reg.get("up").describe()
    assert d["default_scope"] == "generated" and d["description"] == "more"
    assert d["fitted_on"]["model_id"] == lm.info.model_id
    steers = reg.resolve([SteeringSpec("up"), SteeringSpec("down", -4.5, "all")])
    assert steers[0].strength == 3.0 and steers[0].resolved_scope() == GENERATED
    assert steers[1].strength == -4.5 and str(steers[1].resolved_scope()) == "all"
    assert reg.resolve(None) == [] and reg.resolve([]) == []
    assert reg.describe_steers([SteeringSpec("up")]) == [
        {"controller": "up", "method": "caa", "strength": 3.0, "scope": "generated"}]


def test_resolve_refuses_bad_specs(lm: LoadedModel, tmp_path: Path) -> None:
    artifacts.save(caa_for(lm), tmp_path / "mood.safetensors")
    reg = ControllerRegistry.from_dir(tmp_path, lm.info, max_strength=8, max_steers=2)
    with pytest.raises(SteeringError, match=r"unknown controller 'x'.*mood"):
        reg.resolve([SteeringSpec("x")])
    with pytest.raises(SteeringError, match="out of bounds"):
        reg.resolve([SteeringSpec("mood", -8.5)])
    with pytest.raises(SteeringError, match="finite"):
        reg.resolve([SteeringSpec("mood", float("nan"))])
    with pytest.raises(SteeringError, match="at most 2"):
        reg.resolve([SteeringSpec("mood")] * 3)
    with pytest.raises(SteeringError, match="scope"):
        reg.resolve([SteeringSpec("mood", 1.0, "middle")])


def test_folder_errors_name_the_problem(lm: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        ControllerRegistry.from_dir(tmp_path / "absent", lm.info)
    with pytest.raises(ArtifactError, match="no controllers"):
        ControllerRegistry.from_dir(tmp_path, lm.info)
    artifacts.save(caa_for(lm), tmp_path / "mood.safetensors")
    manifest = tmp_path / "controllers.json"
    for text, needle in (("{bad", "not valid JSON"), ("[1]", "JSON object"),
                         ('{"a": {"file": "nope.safetensors"}}', "not in"),
                         ('{"a": {"strength": 1}}', "has no 'file'"),
                         ('{"mood": {"colour": "red"}}', "unknown option"),
                         ('{"mood": {"strength": "big"}}', "finite number"),
                         ('{"mood": {"scope": "up"}}', "scope"),
                         ('{"mood": {"strength": 9, "max_strength": 5}}', "exceeds")):
        manifest.write_text(text)
        with pytest.raises(ArtifactError, match=needle):
            ControllerRegistry.from_dir(tmp_path, lm.info)
    manifest.unlink()
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="broken"):
        ControllerRegistry.from_dir(tmp_path, lm.info, strict_controllers=True)
    # by default a file that cannot be served is skipped, with the reason
    reg = ControllerRegistry.from_dir(tmp_path, lm.info)
    assert reg.names == ["mood"]
    assert [(p.name, "not a safetensors" in why) for p, why in reg.skipped] == [
        ("broken.safetensors", True)]


def test_artifacts_from_another_model_fail_at_load(lm: LoadedModel, tmp_path: Path) -> None:
    gpt2 = tiny_model("gpt2")  # hidden 32 too: same shapes, another model id
    artifacts.save(caa_for(gpt2), tmp_path / "other.safetensors")
    with pytest.raises(ArtifactError, match=f"{gpt2.info.model_id}.*{lm.info.model_id}"):
        ControllerRegistry.from_dir(tmp_path, lm.info, strict_controllers=True)
    skipping = ControllerRegistry.from_dir(tmp_path, lm.info)
    assert skipping.names == [] and gpt2.info.model_id in skipping.skipped[0][1]
    assert ControllerRegistry.from_dir(tmp_path, lm.info, strict=False).names == ["other"]
    wide = tmp_path / "wide"
    wide.mkdir()
    c = caa_for(lm, width=48)
    c.model_info = type(lm.info)("big-model", "LlamaForCausalLM", 48, 2, True)
    artifacts.save(c, wide / "w.safetensors")
    with pytest.raises(ArtifactError, match="hidden size"):
        ControllerRegistry.from_dir(wide, lm.info, strict=False, strict_controllers=True)
