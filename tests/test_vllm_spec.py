"""The vLLM plugin's request-side logic, without vLLM: the steering field's parsing and
validation (steerlab serve's schema and registry) and the prefix-cache salt."""

from __future__ import annotations

import pytest
import torch

from steerlab.errors import SteeringError
from steerlab.methods import CAA
from steerlab.serve.registry import ControllerRegistry, ServedController
from steerlab.sites import Site
from steerlab.vllm_plugin import spec


def _registry(tmp_path) -> ControllerRegistry:  # type: ignore[no-untyped-def]
    caa = CAA(layers=1)
    caa.set_vectors({Site("resid_post", 1): torch.ones(4)})
    return ControllerRegistry({
        "pos": ServedController("pos", caa, tmp_path / "a.safetensors", strength=2.0,
                                scope="all", max_strength=5.0),
        "neg": ServedController("neg", caa, tmp_path / "a.safetensors", strength=-2.0,
                                max_strength=5.0)})


def test_canonical_fills_defaults_and_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = _registry(tmp_path)
    got = spec.canonical([{"controller": "pos"}, {"controller": "neg", "scope": "last"}], reg)
    assert [(e.controller, e.strength, str(e.scope)) for e in got] == [
        ("pos", 2.0, "all"), ("neg", -2.0, "last")]
    assert spec.decode(spec.encode(got)) == got
    # the JSON-string form (vllm_xargs) and the resolved form parse the same
    assert spec.canonical(spec.encode(got), reg) == got


@pytest.mark.parametrize("bad", [
    [{"controller": "nope"}], [{"controller": "pos", "strength": 6.0}],
    [{"controller": "pos", "strength": 3.0}, {"controller": "neg", "strength": 3.0}],
    [{"controller": "pos", "scope": "sometimes"}], [{"controller": "pos", "weight": 1}],
    "not json", 5, [1], [{"controller": "pos", "strength": True}]])
def test_bad_specs_raise(tmp_path, bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SteeringError):
        spec.canonical(bad, _registry(tmp_path))


def test_cache_salt(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = _registry(tmp_path)
    alls = spec.canonical([{"controller": "pos", "scope": "all"}], reg)
    last = spec.canonical([{"controller": "pos", "scope": "last"}], reg)
    assert spec.cache_salt([], 10, None) is None
    assert spec.cache_salt([], 10, "u") == "u"
    assert spec.cache_salt(spec.canonical([{"controller": "pos", "strength": 0}], reg),
                           10, None) is None
    a = spec.cache_salt(alls, 10, None)
    assert a and a == spec.cache_salt(alls, 99, None)  # "all" does not depend on the prompt
    assert spec.cache_salt(last, 10, None) != spec.cache_salt(last, 11, None)
    assert a != spec.cache_salt(last, 10, None)
    assert a != spec.cache_salt(alls, 10, "user")
    assert a != spec.cache_salt(alls, 10, None, fingerprint="other")
