"""Artifacts: round trips, self-description, compatibility checks, malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steerlab import artifacts
from steerlab.errors import ArtifactError, SteeringError
from steerlab.fitting import fit_actadd, fit_caa
from steerlab.methods import CAA, ActAdd
from steerlab.runtime import Steer, generate
from steerlab.sites import Site
from test_methods import SENT
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture()
def caa() -> CAA:
    return fit_caa(tiny_model("llama", chat=True), SENT, CAA(layers=[0, 1], recipe="mean"),
                   cache=False, progress=False)


def test_round_trip_is_exact_and_self_describing(caa: CAA, tmp_path: Path) -> None:
    lm = tiny_model("llama", chat=True)
    path = artifacts.save(caa, tmp_path / "x")
    assert path.name == "x.safetensors"
    meta = artifacts.read_metadata(path)
    assert meta["method"] == "caa"
    assert meta["sites"] == ["resid_post.0", "resid_post.1"]
    assert meta["model"]["model_id"] == "tiny-llama-0"
    assert meta["model"]["hidden_size"] == 32 and meta["model"]["num_layers"] == 2
    assert meta["data_fingerprint"] == SENT.fingerprint()
    assert meta["hyperparameters"]["recipe"] == "mean"
    assert "fit_seconds" in meta["fit"] and meta["library_version"]
    back = artifacts.load(path, lm.info)
    assert isinstance(back, CAA) and back.hyperparameters() == caa.hyperparameters()
    for s in caa.sites:
        assert torch.equal(back.vectors[s], caa.vectors[s])
    a = generate(lm, ["hi", "a longer prompt"], steers=Steer(caa, 4.0), max_new_tokens=6)
    b = generate(lm, ["hi", "a longer prompt"], steers=Steer(back, 4.0), max_new_tokens=6)
    assert a == b


def test_actadd_positional_round_trip(tmp_path: Path) -> None:
    lm = tiny_model("llama")
    a = fit_actadd(lm, ActAdd(layer=1, positive="I love", negative="I hate", mode="positional"))
    back = artifacts.load(artifacts.save(a, tmp_path / "a.safetensors"), lm.info)
    assert isinstance(back, ActAdd) and back.positional is not None and a.positional is not None
    assert torch.equal(back.positional, a.positional)
    with pytest.raises(ArtifactError, match="GGUF"):
        artifacts.export_gguf(back, tmp_path / "a.gguf")


def test_wrong_model_is_refused(caa: CAA, tmp_path: Path) -> None:
    path = artifacts.save(caa, tmp_path / "x.safetensors")
    other_shape = tiny_model("gpt2").info
    with pytest.raises(ArtifactError, match="tiny-llama-0") as err:
        artifacts.load(path, other_shape)
    assert "tiny-gpt2-0" in str(err.value)
    other_id = tiny_model("llama", seed=3).info  # same shape, another model
    with pytest.raises(ArtifactError, match="strict=False"):
        artifacts.load(path, other_id)
    assert artifacts.load(path, other_id, strict=False).sites == caa.sites


def test_runtime_refuses_hidden_size_mismatch(caa: CAA) -> None:
    lm = tiny_model("qwen3")
    wide = CAA(layers=0)
    wide.set_vectors({Site("resid_post", 0): torch.ones(48)})
    with pytest.raises(SteeringError, match=r"width|hidden"):
        generate(lm, ["hi"], steers=Steer(wide, 1.0), max_new_tokens=2)


def test_malformed_files(tmp_path: Path, caa: CAA) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        artifacts.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not safetensors")
    with pytest.raises(ArtifactError, match="not a safetensors"):
        artifacts.load(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain))
    with pytest.raises(ArtifactError, match="not a steerlab artifact"):
        artifacts.load(plain)
    bad_json = tmp_path / "badjson.safetensors"
    save_file({"x": torch.zeros(3)}, str(bad_json), metadata={"steerlab": "{nope"})
    with pytest.raises(ArtifactError, match="not valid JSON"):
        artifacts.load(bad_json)
    meta = artifacts.metadata(caa)
    meta["method"] = "mystery"
    unknown = tmp_path / "unknown.safetensors"
    save_file({"x": torch.zeros(3)}, str(unknown), metadata={"steerlab": json.dumps(meta)})
    with pytest.raises(ArtifactError, match="unknown method"):
        artifacts.load(unknown)
    meta = artifacts.metadata(caa)
    missing = tmp_path / "missing_tensor.safetensors"
    save_file({"x": torch.zeros(3)}, str(missing), metadata={"steerlab": json.dumps(meta)})
    with pytest.raises(ArtifactError, match="do not match"):
        artifacts.load(missing)
    nan = tmp_path / "nan.safetensors"
    save_file({"resid_post.0": torch.full((32,), float("nan")),
               "resid_post.1": torch.zeros(32)}, str(nan),
              metadata={"steerlab": json.dumps(meta)})
    with pytest.raises(ArtifactError, match="NaN"):
        artifacts.load(nan)


def test_failed_save_leaves_nothing(tmp_path: Path, caa: CAA) -> None:
    caa.vectors[caa.sites[0]] = torch.full((32,), float("nan"))
    with pytest.raises(ArtifactError):
        artifacts.save(caa, tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SteeringError, match="not fitted"):
        artifacts.save(CAA(layers=0), tmp_path / "unfitted")


def test_gguf_round_trip_and_checks(caa: CAA, tmp_path: Path) -> None:
    lm = tiny_model("llama", chat=True)
    only1 = CAA(layers=1, scope="all")
    only1.set_vectors({Site("resid_post", 1): caa.vectors[Site("resid_post", 1)]})
    only1.model_info = caa.model_info
    out = artifacts.export_gguf(only1, tmp_path / "v.gguf", scale=2.0)
    back = artifacts.import_gguf(out, lm.info)
    torch.testing.assert_close(back.vectors[Site("resid_post", 1)],
                               2.0 * only1.vectors[Site("resid_post", 1)])
    with pytest.raises(ArtifactError, match="hidden size"):
        artifacts.import_gguf(out, tiny_model("qwen3").info.__class__(
            model_id="w", architecture="x", hidden_size=64, num_layers=2, is_chat=False))
    with pytest.raises(ArtifactError):  # block 0 cannot be expressed for llama.cpp
        artifacts.export_gguf(caa, tmp_path / "v0.gguf", force=True)
    # imported vectors steer as llama.cpp applies them, at every token, and say what they are
    assert str(back.default_scope) == "all" and back.recipe == "imported"
    assert "unknown" in back.fit_info["provenance"]
    # a controller that steers fewer tokens than llama.cpp would is refused without force
    last = CAA(layers=1, scope="last")
    last.set_vectors(dict(only1.vectors))
    with pytest.raises(ArtifactError, match="every token"):
        artifacts.export_gguf(last, tmp_path / "last.gguf")
    assert artifacts.export_gguf(last, tmp_path / "last.gguf", force=True).is_file()


def test_odesteer_artifact_round_trip(tmp_path: Path) -> None:
    from steerlab.methods import ODESteer

    lm = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(20, 32, generator=g) + 1.0
    neg = torch.randn(20, 32, generator=g) - 1.0
    c = ODESteer(layer=1, n_components=256).fit(pos, neg)
    c.model_info = lm.info
    back = artifacts.load(artifacts.save(c, tmp_path / "ode"), lm.info)
    assert isinstance(back, ODESteer)
    a = generate(lm, ["hello", "a longer prompt"], steers=Steer(c, 3.0), max_new_tokens=5,
                 render=False)
    b = generate(lm, ["hello", "a longer prompt"], steers=Steer(back, 3.0), max_new_tokens=5,
                 render=False)
    assert a == b
    with pytest.raises(ArtifactError):
        artifacts.load(tmp_path / "ode.safetensors", tiny_model("qwen3").info)


def test_artifacts_respect_the_umask_and_refuse_a_directory(tmp_path: Path) -> None:
    """Artifacts get 0666 less the umask, as GGUF exports and any new file do (they used to
    be 0600 whatever the umask); saving onto a directory fails before writing anything."""
    import os
    import stat

    from steerlab.io import atomic_write

    old = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o077)
        q = atomic_write(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("x"))
        assert stat.S_IMODE(q.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path / "d", lambda tmp: Path(tmp).write_text("x"))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt", "b.txt", "d"]


def test_models_are_identified_by_their_weights_not_their_path(tmp_path: Path) -> None:
    """An artifact fitted on a model is accepted by the same weights loaded another way (a
    folder, whose id is its path) and refused, strictly, by other weights of the same shape
    under the same id."""
    from steerlab.models import load_model, wrap_model
    from tiny_models import build_tiny_model, save_tiny_model, tiny_tokenizer

    lm = build_tiny_model("llama", seed=11)
    c = fit_caa(lm, SENT, CAA(layers=1, recipe="mean"), cache=False, progress=False)
    path = artifacts.save(c, tmp_path / "c")
    assert artifacts.read_metadata(path)["model"]["fingerprint"] == lm.info.fingerprint
    same = load_model(str(save_tiny_model("llama", 11, tmp_path / "folder", chat=False)))
    assert same.info.model_id != lm.info.model_id
    assert same.info.fingerprint == lm.info.fingerprint
    assert artifacts.load(path, same.info).sites == c.sites  # strict, and accepted
    other = wrap_model(build_tiny_model("llama", seed=12).model, tiny_tokenizer(),
                       model_id=lm.info.model_id)
    with pytest.raises(ArtifactError, match="other weights"):
        artifacts.load(path, other.info)
    assert artifacts.load(path, other.info, strict=False).sites == c.sites
