"""Tiny randomly initialised causal LMs and an offline tokenizer for unit tests.

Nothing here touches the network: every model is built from a config with tiny sizes and
random weights (``torch.manual_seed(seed)``), and the tokenizer is a byte-level BPE built
in memory with the ``tokenizers`` library (256 byte tokens, a few merges, ``<pad>``,
``<bos>``, ``<eos>``; a ``<bos>`` is prepended when special tokens are added).

``tiny_model(arch, seed)`` is cached: tests share one instance per (arch, seed, chat) and
must not change its weights (hooks are fine; steerlab removes its own).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from steerlab.models import LoadedModel, wrap_model

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
_MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"), ("o", "n"),
    ("Ġ", "("), ("Ġ", "s"), ("r", "e"), ("a", "t"), ("e", "s"), ("Ġ", "w"), ("o", "u"),
    ("in", "g"), ("Ġ", "i"), ("Ġ", "c"), ("e", "d"), ("Ġ", "I"), (":", "Ġ"),
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Architectures the tests build, with their config overrides (beyond the common ones).
# hidden 32, 4 heads (2 KV heads where the architecture has GQA), 2 layers.
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"num_key_value_heads": 2, "head_dim": 8},
    "mistral": {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 512},
    "qwen2": {"num_key_value_heads": 2},
    # head_dim 16 != hidden/heads: the heads site is then 64 wide, not 32.
    "qwen3": {"num_key_value_heads": 2, "head_dim": 16},
    "gemma2": {
        "num_key_value_heads": 2, "head_dim": 8, "query_pre_attn_scalar": 8,
        "tie_word_embeddings": False,
        "sliding_window": 512,
    },
    "gemma3_text": {
        "num_key_value_heads": 2, "head_dim": 8, "query_pre_attn_scalar": 8,
        "tie_word_embeddings": False,
        "sliding_window": 512,
    },
    "gpt2": {},
    "gpt_neox": {},
    "phi3": {"num_key_value_heads": 2},
    "olmo2": {"num_key_value_heads": 2},
    "starcoder2": {"num_key_value_heads": 2, "sliding_window": 512},
    "granite": {"num_key_value_heads": 2},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
}


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(chat: bool = False) -> Any:
    """A byte-level BPE tokenizer (about 280 tokens) wrapped for transformers."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {PAD: 0, BOS: 1, EOS: 2}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(arch: str, *, num_layers: int = 2, vocab_size: int | None = None) -> Any:
    if arch not in ARCHS:
        raise KeyError(f"no tiny config for {arch!r}; known: {sorted(ARCHS)}")
    tok = tiny_tokenizer()
    v = vocab_size if vocab_size is not None else len(tok)
    ids = {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if arch == "gpt2":
        kw: dict[str, Any] = {
            "n_embd": 32, "n_layer": num_layers, "n_head": 4, "n_positions": 256,
            "vocab_size": v, "initializer_range": 0.2,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }
    else:
        kw = {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": num_layers,
            "num_attention_heads": 4, "vocab_size": v, "max_position_embeddings": 256,
            "initializer_range": 0.2,
        }
        if arch == "falcon":
            kw.pop("intermediate_size")
            kw["ffn_hidden_size"] = 64
    kw.update(ARCHS[arch])
    kw.update(ids)
    return AutoConfig.for_model(arch, **kw)


def build_tiny_model(
    arch: str, seed: int = 0, *, chat: bool = False, num_layers: int = 2
) -> LoadedModel:
    """A fresh tiny model (not cached) wrapped with steerlab's :func:`wrap_model`."""
    config = tiny_config(arch, num_layers=num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    gc = model.generation_config
    gc.pad_token_id = config.pad_token_id
    gc.bos_token_id = config.bos_token_id
    gc.eos_token_id = config.eos_token_id
    return wrap_model(model, tiny_tokenizer(chat), model_id=f"tiny-{arch}-{seed}")


@functools.lru_cache(maxsize=64)
def tiny_model(arch: str, seed: int = 0, *, chat: bool = False) -> LoadedModel:
    """A cached tiny model: shared between tests, do not change its weights."""
    return build_tiny_model(arch, seed, chat=chat)


def save_tiny_model(arch: str, seed: int, folder: Path, *, chat: bool = True) -> Path:
    """Save a fresh tiny model and its tokenizer as a Hugging Face folder (for the CLI)."""
    lm = build_tiny_model(arch, seed, chat=chat)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder
