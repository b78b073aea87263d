"""Export and import llama.cpp's GGUF *control-vector* files.

This is the layout that ``llama-cvector-generator`` writes and that llama.cpp's
``--control-vector`` / ``--control-vector-scaled`` options read; repeng's
``ControlVector.export_gguf`` / ``import_gguf`` write and read the same layout.

The layout, as read from the sources (not assumed)
--------------------------------------------------
Metadata
    * ``general.architecture = "controlvector"`` (string).
    * ``controlvector.model_hint`` (string): the ``general.architecture`` of the model the
      vector was made for, e.g. ``"llama"``. Informational; llama.cpp never reads it.
    * ``controlvector.layer_count``: the number of ``direction.*`` tensors in the file.
      repeng writes it as uint32 (``writer.add_uint32``), ``llama-cvector-generator`` as
      int32 (``gguf_set_val_i32``); llama.cpp's loader never reads it. We write uint32 and
      ignore it on import.

Tensors
    One tensor per steered block, named ``direction.{N}``, GGML type F32, one dimension of
    ``n_embd`` elements. llama.cpp's loader refuses the whole file if any tensor is not
    named ``direction.<int>``, if ``N`` is negative or **zero**, if a tensor is not F32 or
    not 1-D, or if widths differ.

Layer mapping (the important part)
    ``direction.N`` is added to the **output of decoder block N** (0-based, llama.cpp's
    ``il``), i.e. the residual stream after block N: steerlab's site ``resid_post.{N}``.
    The mapping is the identity; there is no off-by-one in the file format:

    1. ``common/common.cpp``, ``common_control_vector_load_one`` (earlier named
       ``llama_control_vector_load_one``): parses N from the tensor name, rejects N < 0
       ("invalid/unparsable direction tensor layer index") and N == 0 ("invalid (zero)
       direction tensor layer index", the whole file is then skipped), and adds the
       tensor (times the user's strength) into a flat buffer at offset ``n_embd * (N - 1)``
       ("layer 1 at [0]"; "do not store data for layer 0 (it's not used)").
    2. ``src/llama-adapter.cpp``, ``llama_adapter_cvec::init`` / ``apply``: there is
       "never a tensor for layer 0"; for ``il`` in ``[1, n_layer)`` the buffer slice at
       ``n_embd * (il - 1)`` is copied into ``tensors[il]``, so ``tensors[il]`` holds
       ``direction.il``. ``tensor_for(il)`` returns it only when
       ``layer_start <= il <= layer_end`` (``common_init_from_params`` defaults the range
       to ``1 .. n_layer``).
    3. ``src/llama-graph.cpp``, ``llm_graph_context::build_cvec(cur, il)`` calls
       ``apply_to``, which does ``cur = cur + tensors[il]``; every model graph (e.g.
       ``src/models/llama.cpp``) calls it at the very end of block ``il``, after
       ``cur = ffn_out + ffn_inp`` and right before ``cb(cur, "l_out", il)``.

    Consequences: block 0's output cannot be steered through this format (``direction.0``
    makes llama.cpp reject the file), and ``direction.N`` with ``N >= n_layer`` is silently
    ignored by llama.cpp (this module cannot check that: it has no model).

    repeng agrees: its layer ids are 0-based indices into ``model.layers`` whose output it
    modifies (``repeng/control.py``), read from ``hidden_states[layer + 1]`` during
    training (``repeng/extract.py``, ``batched_get_hiddens``), and written as
    ``direction.{layer}`` unchanged; its default layer range ``range(-1, -n_layers, -1)``
    normalises to ``1 .. n_layers - 1``, never 0.

    Note on ``llama-cvector-generator``: it captures ``l_out-{il}`` for
    ``il = 0 .. n_layer - 2`` (the last block's ``l_out`` is row-pruned to the output token
    and skipped) and names the result for capture ``k`` ``direction.{k + 1}``
    (``tools/cvector-generator/pca.hpp`` ``run_pca`` and ``mean.hpp`` ``run``:
    ``"direction.%zu", il+1``). So a generator vector *measured* after block k is *applied*
    after block k + 1. That is a property of that tool, not of the format; this module maps
    each file index to the block where llama.cpp applies it.

Sources read: ggml-org/llama.cpp ``common/common.cpp`` (commit 00758e06b449),
``src/llama-adapter.cpp`` (0650ea8c05bc), ``src/llama-graph.cpp`` (``build_cvec``),
``src/models/llama.cpp`` (069be0ae22f3), ``tools/cvector-generator/cvector-generator.cpp``
(0704760b031d), ``tools/cvector-generator/pca.hpp`` (181a4a8fb1af),
``tools/cvector-generator/mean.hpp`` (5c5f166e8ba0); vgel/repeng ``repeng/extract.py`` and
``repeng/control.py`` (0ba7196d81f7).
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerlab.errors import ArtifactError

__all__ = [
    "CONTROL_VECTOR_ARCH",
    "ControlVectorFile",
    "export_control_vector",
    "import_control_vector",
]

CONTROL_VECTOR_ARCH = "controlvector"
_KEY_ARCH = "general.architecture"
_KEY_MODEL_HINT = f"{CONTROL_VECTOR_ARCH}.model_hint"
_KEY_LAYER_COUNT = f"{CONTROL_VECTOR_ARCH}.layer_count"
_NAME_RE = re.compile(r"direction\.([0-9]+)")
_CANONICAL_NAME_RE = re.compile(r"direction\.(0|[1-9][0-9]*)")

_BLOCK0_REASON = (
    "llama.cpp adds direction.N to the output of decoder block N and rejects a file "
    "containing direction.0 (common_control_vector_load_one: 'invalid (zero) direction "
    "tensor layer index'), so the output of block 0 cannot be steered through a GGUF "
    "control vector"
)


@dataclass(frozen=True, eq=False)
class ControlVectorFile:
    """The contents of a GGUF control-vector file.

    ``directions`` maps the 0-based decoder block whose OUTPUT the vector is added to
    (steerlab's site ``resid_post.{L}``, llama.cpp's ``il``, the file's ``direction.{L}``)
    to a 1-D float32 tensor of width ``n_embd``. Equality is identity (tensors have no
    single truth value to compare by).
    """

    directions: dict[int, torch.Tensor]
    model_hint: str

    @property
    def n_embd(self) -> int:
        """The common width of all directions."""
        return int(next(iter(self.directions.values())).shape[0])


def _prepare_directions(  # noqa: C901
    directions: Mapping[int, torch.Tensor], scale: float
) -> dict[int, np.ndarray[Any, np.dtype[np.float32]]]:
    """Validate and convert to contiguous little-endian float32 arrays, sorted by block."""
    if not isinstance(directions, Mapping):
        raise ArtifactError(
            f"directions must be a dict of block index -> 1-D tensor, got "
            f"{type(directions).__name__}"
        )
    if not directions:
        raise ArtifactError(
            "no directions to export: a control-vector file needs at least one "
            "direction.{N} tensor (llama.cpp rejects a file with none)"
        )
    width: int | None = None
    width_block: int | None = None
    out: dict[int, np.ndarray[Any, np.dtype[np.float32]]] = {}
    for key in directions:
        if isinstance(key, bool) or not isinstance(key, int):
            raise ArtifactError(
                f"direction key {key!r} is not an int; keys are 0-based decoder block "
                f"indices (the block whose output the vector is added to)"
            )
    for block in sorted(directions):
        if block < 0:
            raise ArtifactError(
                f"direction key {block} is negative; keys are 0-based decoder block "
                f"indices. Resolve negative indices against the model's layer count first"
            )
        if block == 0:
            raise ArtifactError(
                f"cannot export a direction for block 0: {_BLOCK0_REASON}. Drop block 0 "
                f"from the export, or steer block 1 instead"
            )
        vec = directions[block]
        if not isinstance(vec, torch.Tensor):
            raise ArtifactError(
                f"direction for block {block} is a {type(vec).__name__}, not a torch.Tensor"
            )
        if not vec.is_floating_point():
            raise ArtifactError(
                f"direction for block {block} has dtype {vec.dtype}; a floating-point "
                f"tensor is required (it is stored as float32)"
            )
        if vec.dim() != 1:
            raise ArtifactError(
                f"direction for block {block} has shape {tuple(vec.shape)}; control-vector "
                f"directions must be 1-D of width n_embd (squeeze or select a row first)"
            )
        n = int(vec.shape[0])
        if n == 0:
            raise ArtifactError(f"direction for block {block} is empty (width 0)")
        if width is None:
            width, width_block = n, block
        elif n != width:
            raise ArtifactError(
                f"direction widths differ: block {width_block} has {width}, block {block} "
                f"has {n}; every direction in one file must have the model's width n_embd"
            )
        v = vec.detach().to(device="cpu")
        if scale != 1.0:
            # Scale in float64 and round once to float32.
            v = v.to(torch.float64) * scale
        v32 = v.to(torch.float32).contiguous()
        if not bool(torch.isfinite(v32).all()):
            what = f"after scaling by {scale!r} " if scale != 1.0 else ""
            raise ArtifactError(
                f"direction for block {block} has non-finite values {what}(NaN or inf "
                f"in float32); fix the vector or use a smaller scale"
            )
        arr = np.ascontiguousarray(v32.numpy(), dtype="<f4")
        out[block] = arr
    return out


def export_control_vector(
    path: str | os.PathLike[str],
    directions: dict[int, torch.Tensor],
    model_hint: str,
    *,
    scale: float = 1.0,
) -> Path:
    """Write ``directions`` (times ``scale``) as a llama.cpp GGUF control vector.

    ``directions`` maps a 0-based decoder block index ``L`` (the block whose output the
    vector is added to, ``resid_post.{L}``) to a 1-D tensor; it is stored as
    ``direction.{L}`` in float32, which llama.cpp adds to the output of the same block.
    ``L`` must be >= 1 (see the module docstring). ``model_hint`` is the model's
    architecture name as llama.cpp spells it (e.g. ``"llama"``).

    The file is written to a temporary file in the same directory and moved into place
    with ``os.replace``, so on any error nothing (and no partial file) is left at
    ``path`` and an existing file there is untouched. Returns the written path.
    Raises :class:`ArtifactError` on invalid input or when the file cannot be written.
    """
    from gguf import GGUFWriter

    if not isinstance(model_hint, str):
        raise ArtifactError(f"model_hint must be a str, got {type(model_hint).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise ArtifactError(f"scale must be a number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ArtifactError(f"scale must be finite, got {scale!r}")
    arrays = _prepare_directions(directions, scale)

    dest = Path(os.fspath(path))
    parent = dest.parent
    if not parent.is_dir():
        raise ArtifactError(
            f"cannot write control vector to {dest}: directory {parent} does not exist"
        )
    if dest.is_dir():
        raise ArtifactError(f"cannot write control vector to {dest}: it is a directory")

    tmp = parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
    writer = GGUFWriter(tmp, CONTROL_VECTOR_ARCH)
    try:
        writer.add_string(_KEY_MODEL_HINT, model_hint)
        writer.add_uint32(_KEY_LAYER_COUNT, len(arrays))
        for block, arr in arrays.items():
            writer.add_tensor(f"direction.{block}", arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        raise ArtifactError(f"cannot write control vector to {dest}: {exc}") from exc
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return dest


def _string_field(reader: Any, key: str, path: Path) -> str | None:
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return None
    if list(field.types) != [GGUFValueType.STRING]:
        raise ArtifactError(f"{path}: metadata {key} is not a string (types {field.types})")
    try:
        value = field.contents()
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: metadata {key} is not valid UTF-8") from exc
    return str(value)


def _block_from_name(name: str, path: Path) -> int:
    if not _NAME_RE.fullmatch(name):
        raise ArtifactError(
            f"{path}: tensor {name!r} is not named direction.<N>; a control-vector file "
            f"holds only direction.<N> tensors (llama.cpp rejects any other tensor)"
        )
    if not _CANONICAL_NAME_RE.fullmatch(name):
        raise ArtifactError(
            f"{path}: tensor {name!r} has a zero-padded layer index; expected "
            f"direction.<N> with N written without leading zeros"
        )
    block = int(name.split(".", 1)[1])
    if block == 0:
        raise ArtifactError(f"{path}: the file contains direction.0: {_BLOCK0_REASON}")
    return block


def import_control_vector(path: str | os.PathLike[str]) -> ControlVectorFile:  # noqa: C901
    """Read a llama.cpp / repeng GGUF control vector.

    Returns a :class:`ControlVectorFile` whose keys are the 0-based decoder blocks whose
    output llama.cpp adds each vector to (``direction.{L}`` -> key ``L``), sorted, with
    float32 1-D tensors (copies, not views of the file).

    Raises :class:`ArtifactError` if the file is missing, not a GGUF, not of architecture
    ``controlvector``, has a tensor not named ``direction.<N>`` with ``N >= 1``, a
    non-F32 or non-1-D tensor, mixed widths, no tensors, or non-finite values.
    """
    from gguf import GGMLQuantizationType, GGUFReader

    p = Path(os.fspath(path))
    if not p.exists():
        raise ArtifactError(f"control vector file {p} does not exist")
    if not p.is_file():
        raise ArtifactError(f"control vector path {p} is not a regular file")
    try:
        reader = GGUFReader(p, "r")
    except Exception as exc:  # the reader raises ValueError, struct/IndexError, OSError...
        raise ArtifactError(f"{p} is not a readable GGUF file: {exc}") from exc

    arch = _string_field(reader, _KEY_ARCH, p)
    if arch is None:
        raise ArtifactError(
            f"{p}: GGUF file has no {_KEY_ARCH}; a control vector has "
            f"{_KEY_ARCH} = {CONTROL_VECTOR_ARCH!r}"
        )
    if arch != CONTROL_VECTOR_ARCH:
        raise ArtifactError(
            f"{p}: {_KEY_ARCH} is {arch!r}, not {CONTROL_VECTOR_ARCH!r}; this is not a "
            f"control-vector file (a model or LoRA GGUF cannot be imported as one)"
        )
    model_hint = _string_field(reader, _KEY_MODEL_HINT, p) or ""

    if len(reader.tensors) == 0:
        raise ArtifactError(
            f"{p}: the file has no direction tensors (llama.cpp rejects such a file)"
        )
    directions: dict[int, torch.Tensor] = {}
    width: int | None = None
    for t in reader.tensors:
        name = str(t.name)
        block = _block_from_name(name, p)
        if block in directions:
            raise ArtifactError(f"{p}: direction.{block} appears more than once")
        if t.tensor_type != GGMLQuantizationType.F32:
            raise ArtifactError(
                f"{p}: tensor {name} has type {t.tensor_type.name}; control-vector "
                f"directions must be F32"
            )
        shape = [int(s) for s in t.shape]  # ggml order: ne[0] first
        # ggml_n_dims ignores trailing dimensions of size 1, as llama.cpp does.
        if not shape or any(s != 1 for s in shape[1:]):
            raise ArtifactError(
                f"{p}: tensor {name} has shape {shape}; control-vector directions must be 1-D"
            )
        n = shape[0]
        if n == 0:
            raise ArtifactError(f"{p}: tensor {name} is empty")
        if width is None:
            width = n
        elif n != width:
            raise ArtifactError(
                f"{p}: tensor {name} has width {n} but earlier directions have "
                f"{width}; all directions must share the model's width n_embd"
            )
        data = np.asarray(t.data).reshape(-1)
        if data.size != n:
            raise ArtifactError(f"{p}: tensor {name} data is truncated")
        arr = np.array(data, dtype=np.float32, copy=True)
        if not bool(np.isfinite(arr).all()):
            raise ArtifactError(f"{p}: tensor {name} has non-finite values (NaN or inf)")
        directions[block] = torch.from_numpy(arr)

    return ControlVectorFile(
        directions={k: directions[k] for k in sorted(directions)}, model_hint=model_hint
    )
