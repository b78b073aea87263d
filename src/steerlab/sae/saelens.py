"""SAELens's on-disk format (:func:`save_saelens`, :func:`load_saelens`).

A folder with ``cfg.json`` and ``sae_weights.safetensors`` (tensors ``W_enc``, ``b_enc``,
``W_dec``, ``b_dec`` and, for JumpReLU, ``threshold``), read from SAELens 6.18
(``sae_lens/saes/sae.py`` ``save_model``, ``sae_lens/loading/pretrained_sae_loaders.py``,
``topk_sae.py``, ``jumprelu_sae.py``). We write the format ourselves rather than depend on
``sae-lens``: its dependency tree (TransformerLens and more) is heavy and its training loop is
tied to TransformerLens hooks, while we need only the format. Published SAELens SAEs (ReLU
"standard", JumpReLU such as Gemma Scope, TopK) load where a user has their files; pre-6.0
configs (``hook_point``, TopK as ``activation_fn: topk`` with ``activation_fn_kwargs: {k}``,
boolean ``normalize_activations``) are read too. Weights are safetensors only, never pickle.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from steerlab.errors import ArtifactError, SteeringError
from steerlab.io import atomic_write
from steerlab.sae.config import Architecture, SAEConfig, _is_int
from steerlab.sae.model import SparseAutoencoder

# SAELens architecture names -> ours (and back).
SAELENS_ARCHITECTURES: dict[str, str] = {"standard": "relu", "jumprelu": "jumprelu",
                                         "topk": "topk"}
TO_SAELENS: dict[str, str] = {v: k for k, v in SAELENS_ARCHITECTURES.items()}
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
STEERLAB_FORMAT_VERSION = 1
_TINY64 = torch.finfo(torch.float64).tiny  # exp(log(tiny)) rounds to 0.0 in float32


def _save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
    """safetensors' ``save_file``, looked up on the :mod:`steerlab.sae` package at call time,
    so that replacing ``steerlab.sae.save_file`` (as the tests do to simulate a failed write,
    from when ``steerlab.sae`` was one module) reaches the writer."""
    from steerlab import sae as package

    package.save_file(tensors, path, metadata={"format": "pt"})


def _finite_json(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


def saelens_config(sae: SparseAutoencoder) -> dict[str, Any]:
    """The ``cfg.json`` contents for ``sae`` (SAELens ≥ 6 layout plus a ``steerlab`` object).

    ``hook_name`` and ``model_name`` are written both inside ``metadata`` (where SAELens ≥ 6
    reads them) and at the top level (where older readers do; SAELens ≥ 6 drops unknown
    top-level keys). No ``sae_lens_version`` is claimed.
    """
    c = sae.config
    cfg: dict[str, Any] = {
        "architecture": TO_SAELENS[c.architecture],
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if c.architecture == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["metadata"] = {"model_name": c.model_name, "hook_name": c.hook_name}
    cfg["hook_name"] = c.hook_name
    cfg["model_name"] = c.model_name
    cfg["steerlab"] = {
        "format_version": STEERLAB_FORMAT_VERSION,
        "architecture": c.architecture,
        "site": c.site,
        "tied": c.tied,
        "jumprelu_init_threshold": c.jumprelu_init_threshold,
        "jumprelu_bandwidth": c.jumprelu_bandwidth,
        "train_report": _finite_json(sae.train_report),
    }
    return cfg


def saelens_tensors(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The ``sae_weights.safetensors`` tensors: float32, CPU, W_dec materialised when tied."""
    out = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.decoder_weight(),
           "b_dec": sae.b_dec}
    if sae.config.architecture == "jumprelu":
        out["threshold"] = sae.threshold()
    return {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
            for k, v in out.items()}


def save_saelens(sae: SparseAutoencoder, folder: str | os.PathLike[str]) -> Path:
    """Write ``sae`` as a SAELens folder (``cfg.json``, ``sae_weights.safetensors``).

    A new folder is written beside the target and renamed into place; into an existing folder
    each file is replaced atomically (weights first), and other files there are left alone.
    Returns the folder.
    """
    if not isinstance(sae, SparseAutoencoder):
        raise SteeringError(f"save_saelens needs a SparseAutoencoder, got {type(sae)}")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a folder")
    tensors = saelens_tensors(sae)
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise ArtifactError(f"refusing to save an SAE with non-finite weights to {path}")
    text = json.dumps(saelens_config(sae), indent=2, allow_nan=False) + "\n"

    def write_weights(p: str) -> None:
        _save_file(tensors, p)

    def write_cfg(p: str) -> None:
        Path(p).write_text(text, encoding="utf-8")

    if path.is_dir():
        atomic_write(path / WEIGHTS_FILENAME, write_weights)
        atomic_write(path / CFG_FILENAME, write_cfg)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write_weights(str(tmp / WEIGHTS_FILENAME))
        write_cfg(str(tmp / CFG_FILENAME))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _cfg_get(cfg: dict[str, Any], key: str) -> Any:
    """A key at the top level, else in ``metadata`` (SAELens ≥ 6 keeps LM details there)."""
    if cfg.get(key) is not None:
        return cfg[key]
    meta = cfg.get("metadata")
    return meta.get(key) if isinstance(meta, dict) else None


def _architecture(cfg: dict[str, Any], where: Path) -> tuple[str, int | None]:
    """Our architecture and k from a SAELens config (any version)."""
    name = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ArtifactError(f"{where}: activation_fn_kwargs must be an object, got {kwargs!r}")
    if name == "standard" and act == "topk":
        name = "topk"  # SAELens < 6 stored TopK SAEs this way
    if name not in SAELENS_ARCHITECTURES:
        supported = ", ".join(f"{k!r} ({v})" for k, v in SAELENS_ARCHITECTURES.items())
        raise ArtifactError(f"{where}: SAELens architecture {name!r} is not supported; "
                            f"steerlab loads {supported}")
    if name == "standard" and act not in (None, "relu"):
        raise ArtifactError(f"{where}: a standard SAE with activation_fn {act!r} is not "
                            f"supported (only relu)")
    arch = SAELENS_ARCHITECTURES[name]
    if arch != "topk":
        return arch, None
    k_top, k_kw = cfg.get("k"), kwargs.get("k")
    if k_top is not None and k_kw is not None and k_top != k_kw:
        raise ArtifactError(f"{where}: k = {k_top} but activation_fn_kwargs.k = {k_kw}")
    k = k_top if k_top is not None else k_kw
    if not _is_int(k):
        raise ArtifactError(f"{where}: a topk SAE needs an integer k (top level or in "
                            f"activation_fn_kwargs), got {k!r}")
    return arch, cast(int, k)


def _read_cfg(cfg_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot parse {cfg_path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def load_saelens(folder: str | os.PathLike[str], *,  # noqa: C901
                 device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load a SAELens SAE folder (``cfg.json`` + ``sae_weights.safetensors``).

    Supported: SAELens architectures ``"standard"`` (ReLU), ``"jumprelu"`` and ``"topk"``
    (``k`` at the top level or in ``activation_fn_kwargs``), with ``normalize_activations``
    ``"none"``. A TopK SAE with ``rescale_acts_by_decoder_norm`` has the decoder norms folded
    into the encoder (W_enc columns and b_enc times ‖W_dec,ᵢ‖, W_dec rows normalised), which
    computes the same codes and reconstruction. JumpReLU thresholds ≤ 0 become 0 (SAELens
    computes ReLU(z)·H(z − θ), the same thing). Weights are cast to float32.

    Raises:
        ArtifactError: a missing folder or file, an unparsable or incomplete ``cfg.json``, an
            unsupported architecture or activation normalisation, missing, unknown, misshapen
            or non-finite tensors; the message names the path and the problem.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ArtifactError(f"SAE folder {path} does not exist" if not path.exists()
                            else f"{path} is not a folder (a SAELens SAE is a folder with "
                                 f"{CFG_FILENAME} and {WEIGHTS_FILENAME})")
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise ArtifactError(f"{p} is missing: a SAELens SAE folder holds {CFG_FILENAME} "
                                f"and {WEIGHTS_FILENAME}")
    cfg = _read_cfg(cfg_path)
    for key in ("d_in", "d_sae"):
        if key not in cfg:
            raise ArtifactError(f"{cfg_path}: missing key {key!r}")
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise ArtifactError(f"{cfg_path}: {key} must be a positive integer, "
                                f"got {cfg[key]!r}")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    arch, k = _architecture(cfg, cfg_path)
    norm = cfg.get("normalize_activations", "none")
    if norm is False or norm is None:
        norm = "none"
    if norm != "none":
        raise ArtifactError(
            f"{cfg_path}: normalize_activations is {norm!r}; that SAE rescales its input at "
            f"run time by a factor kept outside its weights, which steerlab does not "
            f"reproduce (it applies SAEs to raw activations). Fold the scaling into the "
            f"weights (SAELens: fold_activation_norm_scaling_factor) and save with "
            f"normalize_activations='none'")
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in (None, "none"):
        raise ArtifactError(f"{cfg_path}: reshape_activations={reshape!r} (per-head hook_z "
                            f"SAEs) is not supported; steerlab loads residual-stream SAEs")
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ArtifactError(f"{cfg_path}: apply_b_dec_to_input must be true or false, "
                            f"got {apply_b_dec!r}")
    extra = cfg.get("steerlab") or {}
    if not isinstance(extra, dict):
        raise ArtifactError(f"{cfg_path}: the 'steerlab' entry must be an object")
    if extra.get("architecture", arch) != arch:
        raise ArtifactError(f"{cfg_path}: architecture {cfg.get('architecture')!r} but "
                            f"steerlab.architecture {extra['architecture']!r}")
    hook = _cfg_get(cfg, "hook_name") or _cfg_get(cfg, "hook_point") or ""
    model_name = _cfg_get(cfg, "model_name") or ""
    try:
        kwargs: dict[str, Any] = {}
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth"):
            if extra.get(name) is not None:
                kwargs[name] = extra[name]
        config = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=cast(Architecture, arch), k=k,
                           tied=extra.get("tied", False), hook_name=str(hook),
                           site=extra.get("site") or "", model_name=str(model_name),
                           apply_b_dec_to_input=apply_b_dec, **kwargs)
    except SteeringError as exc:
        raise ArtifactError(f"{cfg_path}: {exc}") from exc

    try:
        raw = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"cannot read {weights_path}: {exc}") from exc
    tensors = _check_weights(raw, cfg, config, weights_path)
    sae = SparseAutoencoder(config, seed=None)
    with torch.no_grad():
        sae.W_enc.copy_(tensors["W_enc"])
        sae.b_enc.copy_(tensors["b_enc"])
        sae.b_dec.copy_(tensors["b_dec"])
        if config.tied:
            if not torch.equal(tensors["W_dec"], tensors["W_enc"].T):
                raise ArtifactError(f"{weights_path}: the cfg says tied but W_dec is not "
                                    f"W_enc transposed")
        else:
            cast(torch.Tensor, sae.W_dec).copy_(tensors["W_dec"])
        if arch == "jumprelu":
            theta = tensors["threshold"].to(torch.float64).clamp_min(_TINY64)
            sae.log_threshold.copy_(torch.log(theta))
    if isinstance(extra.get("train_report"), dict):
        sae.train_report = extra["train_report"]
    return sae.to(device).eval()


def _check_weights(raw: dict[str, torch.Tensor], cfg: dict[str, Any], config: SAEConfig,
                   where: Path) -> dict[str, torch.Tensor]:
    """Validated float32 tensors W_enc, b_enc, W_dec, b_dec (+ threshold), folded as needed."""
    d, m = config.d_in, config.d_sae
    raw = dict(raw)
    if "scaling_factor" in raw:  # SAELens < 6 "finetuning scaling factor"
        sf = raw.pop("scaling_factor")
        if not torch.equal(sf.to(torch.float32), torch.ones_like(sf, dtype=torch.float32)):
            raise ArtifactError(f"{where}: a finetuning scaling_factor other than 1 is not "
                                f"supported")
    if config.architecture == "jumprelu" and "threshold" not in raw and "log_threshold" in raw:
        raw["threshold"] = torch.exp(raw.pop("log_threshold").to(torch.float64))
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d),
                                          "b_dec": (d,)}
    if config.architecture == "jumprelu":
        shapes["threshold"] = (m,)
    missing = [k for k in shapes if k not in raw]
    if missing:
        raise ArtifactError(f"{where}: missing tensor(s) {', '.join(missing)} (a "
                            f"{config.architecture} SAE needs {', '.join(shapes)})")
    unknown = sorted(set(raw) - set(shapes))
    if unknown:
        raise ArtifactError(f"{where}: unexpected tensor(s) {', '.join(unknown)} for a "
                            f"{config.architecture} SAE (expected {', '.join(shapes)})")
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        t = raw[key]
        if tuple(t.shape) != shape:
            raise ArtifactError(f"{where}: {key} has shape {tuple(t.shape)} but cfg.json "
                                f"(d_in = {d}, d_sae = {m}) needs {shape}")
        if not t.is_floating_point():
            raise ArtifactError(f"{where}: {key} must be floating point, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{where}: {key} has non-finite values (NaN or inf)")
        out[key] = t if key == "threshold" else t.to(torch.float32)
    if config.architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm") is True:
        norms = torch.linalg.vector_norm(out["W_dec"], dim=1)
        if not bool((norms > 0).all()):
            raise ArtifactError(f"{where}: rescale_acts_by_decoder_norm with a zero "
                                f"decoder row")
        out["W_enc"] = out["W_enc"] * norms
        out["b_enc"] = out["b_enc"] * norms
        out["W_dec"] = out["W_dec"] / norms[:, None]
    return out


__all__ = [
    "CFG_FILENAME",
    "SAELENS_ARCHITECTURES",
    "STEERLAB_FORMAT_VERSION",
    "TO_SAELENS",
    "WEIGHTS_FILENAME",
    "load_saelens",
    "saelens_config",
    "saelens_tensors",
    "save_saelens",
]
