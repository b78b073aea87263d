"""Write the golden artifacts of ``tests/golden/`` (issue 18, step 0: lock the format).

For every method in :data:`steerlab.methods.METHODS` this fits a controller on a tiny
randomly initialised llama-style model (hidden 32, 2 blocks, the byte-level tokenizer of
``tests/tiny_models.py``) with a handful of contrastive pairs written here, and writes:

* ``tests/golden/<method>.safetensors``: the artifact, as :func:`steerlab.artifacts.save`
  writes it;
* ``tests/golden/<method>.expected.safetensors``: what the artifact does to the golden model
  at strength 1 on its default scope, for a fixed left-padded batch of two prompts of
  different lengths: ``input_ids`` and ``attention_mask`` (the batch), ``logits`` (one
  forward pass of the batch under steering), ``tokens`` (4 greedy new tokens, generated under
  steering as :func:`steerlab.runtime.generate` does) and ``generate_logits`` (the logits of
  each of those 4 steps); the prompts and the texts :func:`steerlab.runtime.generate` returns
  are in the file's metadata;
* ``tests/golden/model/``: the tiny model itself (``config.json``, ``model.safetensors``, the
  state dict, ``tokenizer.json``), so that ``tests/test_golden.py`` does not depend on random
  initialisation.

Expected outputs are computed as the test computes them: on the model reloaded from
``tests/golden/model/``, with the artifact loaded back from its file; the generator checks
that the fitted controller itself gives the same tokens and logits (to the test's
tolerance), and that strength 1 changes the logits.
Seeds are fixed, everything is float32 on one CPU thread.

Regenerate only when the artifact format deliberately changes (with a ``FORMAT_VERSION``
bump), and with the code that defines the new format (see ``tests/golden/README.md``)::

    python scripts/make_golden.py            # writes tests/golden/
    python scripts/make_golden.py --out DIR  # somewhere else
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the tests' tiny configs and tokenizer

from steerlab import artifacts  # noqa: E402
from steerlab.data import ContrastivePair, ContrastiveSet  # noqa: E402
from steerlab.fitting import fit_method  # noqa: E402
from steerlab.methods import METHODS  # noqa: E402
from steerlab.models import LoadedModel, wrap_model  # noqa: E402
from steerlab.runtime import Steer, generate, steering, tokenize_prompts  # noqa: E402
from steerlab.sae import SAEConfig, SparseAutoencoder  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

ARCH = "llama"
MODEL_SEED = 0
MODEL_ID = "golden-tiny-llama"
LAYER = 1
PROMPTS = ["Hi", "Describe a river."]
MAX_NEW_TOKENS = 4
STRENGTH = 1.0
RTOL = ATOL = 1e-5  # tests/test_golden.py's tolerance on logits

PAIRS = ContrastiveSet([
    ContrastivePair(f"Tell me about day {i}.", f"It was wonderful and happy {i}.",
                    f"It was awful and sad {i}.") for i in range(10)
], name="golden-sentiment")

# Per-method fitting arguments (beyond ``layer=LAYER``): small sizes keep the files to a few
# KB; recipe "last" where the default ("ab", SAS) needs answer letters.
FIT_ARGS: dict[str, dict[str, Any]] = {
    "alqr": {"n_jacobian_prompts": 4},
    "alqr_plus": {"n_jacobian_prompts": 4},
    "odesteer": {"n_components": 128},
    "step_odesteer": {"n_components": 128},
    "innsteer": {"hidden": 16, "epochs": 5, "warmup_epochs": 1},
    "iti": {"top_k": 3},
    "sas": {"recipe": "last"},
}
NO_LAYER = {"iti", "alqr", "alqr_plus", "spid"}  # their paper's default blocks


def tiny_sae(d: int, m: int, seed: int = 0) -> SparseAutoencoder:
    """A random top-k SAE at ``resid_post.LAYER`` (as ``tests/test_sas.py`` builds one)."""
    cfg = SAEConfig(d_in=d, d_sae=m, architecture="topk", k=6, site=f"resid_post.{LAYER}",
                    jumprelu_init_threshold=0.05)
    sae = SparseAutoencoder(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(m, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae


def save_model(lm: LoadedModel, folder: Path) -> None:
    """The model as ``config.json`` + ``model.safetensors`` (state dict) + ``tokenizer.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(lm.model.config.to_json_string(use_diff=False))
    state = {k: v.detach().contiguous() for k, v in lm.model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    lm.tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))


def load_model(folder: Path) -> LoadedModel:
    """The golden model rebuilt from ``folder`` (the same code as ``tests/test_golden.py``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

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


def fit(lm: LoadedModel, method: str) -> Any:
    """Fit ``method`` on the golden data (ActAdd: its own prompt pair)."""
    kw = dict(FIT_ARGS.get(method, {}))
    if method not in NO_LAYER:
        kw["layer"] = LAYER
    if method == "sas":
        kw["sae"] = tiny_sae(lm.info.hidden_size, 4 * lm.info.hidden_size)
    torch.manual_seed(0)
    data = None if method == "actadd" else PAIRS
    return fit_method(lm, method, data, cache=False, progress=False, **kw)


def steered_outputs(lm: LoadedModel, controller: Any) -> dict[str, torch.Tensor]:
    """The batch, its logits and greedy tokens under ``Steer(controller, STRENGTH)``."""
    enc = tokenize_prompts(lm, PROMPTS, rendered=False)
    steer = Steer(controller, STRENGTH)
    with torch.no_grad():
        with steering(lm, steer):
            logits = lm.model(**enc).logits
        with steering(lm, steer):  # what runtime.generate does, keeping the ids and scores
            out = lm.model.generate(
                **enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, use_cache=True,
                pad_token_id=lm.tokenizer.pad_token_id, temperature=None, top_p=None,
                top_k=None, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, enc["input_ids"].shape[1]:]
    return {"input_ids": enc["input_ids"].contiguous(),
            "attention_mask": enc["attention_mask"].contiguous(),
            "logits": logits.float().contiguous(),
            "tokens": tokens.contiguous(),
            "generate_logits": torch.stack(out.logits, dim=1).float().contiguous()}


def write_expected(lm: LoadedModel, controller: Any, path: Path) -> dict[str, torch.Tensor]:
    expected = steered_outputs(lm, controller)
    texts = generate(lm, PROMPTS, steers=Steer(controller, STRENGTH),
                     max_new_tokens=MAX_NEW_TOKENS, render=False)
    decoded = lm.tokenizer.batch_decode(expected["tokens"], skip_special_tokens=True)
    if texts != decoded:
        raise SystemExit(f"runtime.generate gave {texts!r}, the kept ids decode to {decoded!r}")
    meta = {"prompts": json.dumps(PROMPTS), "texts": json.dumps(texts),
            "strength": json.dumps(STRENGTH), "max_new_tokens": json.dumps(MAX_NEW_TOKENS),
            "scope": str(controller.default_scope)}
    save_file(expected, str(path), metadata=meta)
    return expected


def check(lm: LoadedModel, fitted: Any, expected: dict[str, torch.Tensor], name: str) -> None:
    """The fitted controller gives the same outputs as its loaded artifact (tokens exactly,
    logits to the test's tolerance), and strength 1 changes the logits."""
    direct = steered_outputs(lm, fitted)
    for key, value in expected.items():
        same = torch.equal(direct[key], value) if not value.is_floating_point() else \
            torch.allclose(direct[key], value, rtol=RTOL, atol=ATOL)
        if not same:
            raise SystemExit(f"{name}: the loaded artifact's {key} differ from the fit's")
    enc = tokenize_prompts(lm, PROMPTS, rendered=False)
    with torch.no_grad():
        plain = lm.model(**enc).logits
    if torch.equal(plain, expected["logits"]):
        raise SystemExit(f"{name}: strength {STRENGTH} does not change the logits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["STEERLAB_CACHE"] = cache  # nothing written to ~/.cache
        fresh = build_tiny_model(ARCH, MODEL_SEED)
        save_model(fresh, out / "model")
        lm = load_model(out / "model")
        if lm.info.fingerprint != fresh.info.fingerprint:
            raise SystemExit("the reloaded golden model has other weights than the saved one")
        for method in sorted(METHODS):
            controller = fit(lm, method)
            path = artifacts.save(controller, out / f"{method}.safetensors")
            loaded = artifacts.load(path, lm.info)
            expected = write_expected(lm, loaded, out / f"{method}.expected.safetensors")
            check(lm, controller, expected, path.name)
            print(f"{method:14s} {path.stat().st_size:8d} B  scope {controller.default_scope}  "
                  f"tokens {expected['tokens'].tolist()}")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
