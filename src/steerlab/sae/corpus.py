"""Text corpora and token-level activations for training sparse autoencoders.

A corpus is a list of texts. :func:`load_corpus` reads one from a ``.txt`` file (one text per
non-empty line), a ``.jsonl`` file (a ``"text"`` field per line), or a folder of datasets in
the formats :mod:`steerlab.data` loads (CAA A/B JSON, TruthfulQA CSV, AdvBench CSV), whose
prompts and completions become texts. :func:`corpus_activations` runs the model over the
texts and writes every real token's activation at one site (the first token of each text, the
BOS or the template start, is skipped: its activation is an outlier of huge norm that SAEs
conventionally leave out) to safetensors shards on disk, keyed by the model fingerprint, the
texts and the site. The returned :class:`ActivationShards` is re-iterable and loads one shard
at a time, so SAE training streams from the cache instead of holding every token in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steerlab.activations import _StopForward, model_fingerprint
from steerlab.data import (
    load_advbench,
    load_caa_ab,
    load_truthfulqa,
    neutral_prompts,
    sentiment_pairs,
)
from steerlab.errors import DataError
from steerlab.hooks import HookSet, at_site
from steerlab.models import LoadedModel, cache_root
from steerlab.sites import Site, find_layers, hook_is_pre

SHARD_TOKENS = 16384


def builtin_corpus() -> list[str]:
    """The small corpus shipped with steerlab: the sentiment pairs' texts and the neutral
    prompts (about 180 texts); enough for tests and the demo, not for a good SAE."""
    texts = []
    for p in sentiment_pairs():
        texts += [f"{p.prompt} {p.positive}", f"{p.prompt} {p.negative}"]
    return texts + neutral_prompts()


def load_corpus(path: str | os.PathLike[str]) -> list[str]:
    """Texts from a ``.txt``/``.jsonl`` file or a folder of datasets (see the module doc)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"corpus {p} does not exist")
    if p.is_dir():
        texts: list[str] = []
        for f in sorted(p.rglob("*")):
            texts += _dataset_texts(f)
        if not texts:
            raise DataError(f"found no texts under {p} (looked for CAA JSON, TruthfulQA and "
                            f"AdvBench CSV, .txt and .jsonl files)")
        return texts
    texts = _dataset_texts(p, strict=True)
    if not texts:
        raise DataError(f"corpus {p} has no texts")
    return texts


def _dataset_texts(f: Path, strict: bool = False) -> list[str]:
    name = f.name.lower()
    try:
        if name.endswith(".txt"):
            return [line.strip() for line in f.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
        if name.endswith(".jsonl"):
            out = []
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise DataError(f"{f}:{i + 1}: each line needs a string 'text' field")
                out.append(row["text"])
            return out
        if name.endswith(".json") and not name.startswith("mmlu"):
            pairs = load_caa_ab(f)
            return [f"{p.prompt} {p.positive}" for p in pairs]
        if name == "truthfulqa.csv":
            return [f"{p.prompt} {p.positive}" for p in load_truthfulqa(f)]
        if name == "harmful_behaviors.csv":
            return load_advbench(f)
    except (DataError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        if strict:
            raise DataError(f"cannot read corpus {f}: {exc}") from exc
        return []
    if strict:
        raise DataError(f"{f}: unknown corpus format (use .txt, .jsonl or a dataset folder)")
    return []


@dataclass(frozen=True)
class ActivationShards:
    """Token activations on disk, one safetensors file per shard; iterate for (n, d) chunks."""

    files: tuple[Path, ...]
    n_tokens: int
    width: int

    def __iter__(self) -> Iterator[torch.Tensor]:
        for f in self.files:
            yield load_file(str(f))["activations"]

    def __len__(self) -> int:
        return len(self.files)

    def tensor(self) -> torch.Tensor:
        """Every token in one (n_tokens, d) tensor (loads all shards)."""
        return torch.cat(list(self))


def _key(lm: LoadedModel, texts: Sequence[str], site: Site, max_tokens: int,
         max_length: int) -> str:
    h = hashlib.sha256()
    h.update(model_fingerprint(lm).encode())
    h.update(json.dumps([str(site), max_tokens, max_length]).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def corpus_activations(  # noqa: C901
    lm: LoadedModel,
    texts: Sequence[str],
    site: Site | str,
    *,
    max_tokens: int = 200_000,
    max_length: int = 128,
    batch_size: int = 16,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ActivationShards:
    """Activations at ``site`` of every real token of ``texts`` (up to ``max_tokens``), as
    shards on disk. Texts are truncated to ``max_length`` tokens; the first token of each is
    skipped. With ``cache=True`` a second call with the same model, texts and site reads the
    shards already written."""
    if not texts:
        raise DataError("the corpus is empty")
    layers = find_layers(lm.model)
    s = layers.resolve(site)
    if hook_is_pre(s):
        s = Site("resid_post", s.layer - 1) if s.kind == "resid_pre" and s.layer > 0 else s
    if s.kind != "resid_post":
        raise DataError(f"corpus activations are taken at residual-stream sites, not {site}")
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "corpus"
    folder = root / _key(lm, texts, s, max_tokens, max_length)
    meta_path = folder / "meta.json"
    if cache and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        cached = tuple(folder / f for f in meta["files"])
        if all(f.is_file() for f in cached):
            return ActivationShards(cached, int(meta["n_tokens"]), int(meta["width"]))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = lm.tokenizer
    got: dict[str, torch.Tensor] = {}

    def read(h: torch.Tensor) -> None:
        got["h"] = h
        raise _StopForward

    buffer: list[torch.Tensor] = []
    buffered = 0
    files: list[str] = []
    n_tokens = 0
    width = layers.width(s)

    def flush() -> None:
        nonlocal buffer, buffered
        if not buffered:
            return
        name = f"shard{len(files):05d}.safetensors"
        save_file({"activations": torch.cat(buffer).contiguous()}, str(tmp / name))
        files.append(name)
        buffer, buffered = [], 0

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_tokens, desc=f"corpus activations {s}", unit="tok", leave=False)
    hooks = HookSet([at_site(layers, s, read)]).install()
    # right padding (per call, the tokenizer is not changed): positions then count from 0 in
    # every row without position ids
    try:
        for start in range(0, len(texts), batch_size):
            if n_tokens >= max_tokens:
                break
            enc = tok(list(texts[start:start + batch_size]), return_tensors="pt",
                      padding=True, padding_side="right", truncation=True,
                      max_length=max_length)
            mask = enc["attention_mask"].bool()
            try:
                with torch.no_grad():
                    lm.model(input_ids=enc["input_ids"].to(lm.device),
                             attention_mask=enc["attention_mask"].to(lm.device), use_cache=False)
            except _StopForward:
                pass
            h = got.pop("h").to(torch.float32).cpu()
            keep = mask.clone()
            keep[:, 0] = False  # the first token of every (right-padded) row
            rows = h[keep]
            rows = rows[: max_tokens - n_tokens]
            if not bool(torch.isfinite(rows).all()):
                raise DataError(f"the model produced non-finite activations at {s}")
            buffer.append(rows)
            buffered += rows.shape[0]
            n_tokens += rows.shape[0]
            if bar is not None:
                bar.update(rows.shape[0])
            if buffered >= SHARD_TOKENS:
                flush()
        flush()
    finally:
        hooks.remove()
        if bar is not None:
            bar.close()
    if n_tokens == 0:
        raise DataError("the corpus produced no tokens past the first of each text")
    (tmp / "meta.json").write_text(json.dumps({"files": files, "n_tokens": n_tokens,
                                               "width": width, "site": str(s),
                                               "n_texts": len(texts)}))
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    tmp.rename(folder)
    return ActivationShards(tuple(folder / f for f in files), n_tokens, width)
