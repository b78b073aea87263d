"""Tests for steerlab.gguf_vectors (llama.cpp GGUF control-vector export/import)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from steerlab.errors import ArtifactError
from steerlab.gguf_vectors import (
    ControlVectorFile,
    export_control_vector,
    import_control_vector,
)

WIDTH = 16


def _dirs(blocks: tuple[int, ...] = (1, 5, 12), width: int = WIDTH) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {b: torch.randn(width, generator=gen, dtype=torch.float32) for b in blocks}


def _write_raw(
    path: Path,
    tensors: dict[str, np.ndarray],
    *,
    arch: str = "controlvector",
    model_hint: str | None = "llama",
    layer_count_i32: bool = True,
) -> None:
    """Write a GGUF the way llama-cvector-generator does, with gguf.GGUFWriter directly."""
    writer = gguf.GGUFWriter(path, arch)
    if model_hint is not None:
        writer.add_string(f"{arch}.model_hint", model_hint)
    if layer_count_i32:
        writer.add_int32(f"{arch}.layer_count", len(tensors))
    else:
        writer.add_uint32(f"{arch}.layer_count", len(tensors))
    for name, arr in tensors.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --- round trip -------------------------------------------------------------------------


def test_round_trip_bit_equal(tmp_path: Path) -> None:
    dirs = _dirs()
    out = export_control_vector(tmp_path / "v.gguf", dirs, "llama")
    assert out == tmp_path / "v.gguf"
    assert _files(tmp_path) == ["v.gguf"]  # no temp file left behind

    cv = import_control_vector(out)
    assert isinstance(cv, ControlVectorFile)
    assert cv.model_hint == "llama"
    assert list(cv.directions) == [1, 5, 12]
    assert cv.n_embd == WIDTH
    for block, vec in dirs.items():
        got = cv.directions[block]
        assert got.dtype == torch.float32
        assert got.shape == (WIDTH,)
        assert torch.equal(got.view(torch.int32), vec.view(torch.int32))  # bit-equal


def test_file_layout_matches_llama_cpp(tmp_path: Path) -> None:
    """direction.{L} for key L, F32, 1-D [n_embd]; arch and metadata keys as llama.cpp."""
    dirs = _dirs((3, 1, 7))
    path = export_control_vector(str(tmp_path / "v.gguf"), dirs, "qwen2")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "qwen2"
    count = reader.fields["controlvector.layer_count"]
    assert count.types == [gguf.GGUFValueType.UINT32]
    assert count.contents() == 3
    names = [t.name for t in reader.tensors]
    assert names == ["direction.1", "direction.3", "direction.7"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(s) for s in t.shape] == [WIDTH]
        block = int(t.name.split(".")[1])
        assert np.array_equal(np.asarray(t.data), dirs[block].numpy())


def test_scale_applied(tmp_path: Path) -> None:
    dirs = _dirs()
    path = export_control_vector(tmp_path / "v.gguf", dirs, "llama", scale=-2.5)
    cv = import_control_vector(path)
    for block, vec in dirs.items():
        expected = (vec.to(torch.float64) * -2.5).to(torch.float32)
        assert torch.equal(cv.directions[block], expected)
        torch.testing.assert_close(cv.directions[block], vec * -2.5)


def test_non_float32_input_is_stored_as_float32(tmp_path: Path) -> None:
    dirs = {2: torch.arange(WIDTH, dtype=torch.bfloat16), 4: torch.ones(WIDTH).double()}
    cv = import_control_vector(export_control_vector(tmp_path / "v.gguf", dirs, "llama"))
    assert cv.directions[2].dtype == torch.float32
    assert torch.equal(cv.directions[2], torch.arange(WIDTH, dtype=torch.float32))
    assert torch.equal(cv.directions[4], torch.ones(WIDTH))


def test_overwrites_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    export_control_vector(path, _dirs((1,)), "llama")
    export_control_vector(path, _dirs((2, 3)), "gemma2")
    cv = import_control_vector(path)
    assert list(cv.directions) == [2, 3]
    assert cv.model_hint == "gemma2"


# --- files written by llama.cpp / repeng ---------------------------------------------------


def test_reads_llama_cpp_layout_written_directly(tmp_path: Path) -> None:
    """A file in llama-cvector-generator's layout (int32 layer_count, direction.1..N)."""
    n_layer = 6
    rng = np.random.default_rng(1)
    raw = {
        f"direction.{i + 1}": rng.standard_normal(WIDTH).astype(np.float32)
        for i in range(n_layer - 1)
    }
    path = tmp_path / "cvec.gguf"
    _write_raw(path, raw)
    cv = import_control_vector(path)
    # direction.N is added by llama.cpp to the output of block il == N: key N.
    assert list(cv.directions) == [1, 2, 3, 4, 5]
    for n in range(1, n_layer):
        assert np.array_equal(cv.directions[n].numpy(), raw[f"direction.{n}"])
    assert cv.model_hint == "llama"


def test_reads_repeng_layout_unsorted_uint32(tmp_path: Path) -> None:
    """repeng writes uint32 layer_count and its own (descending) layer order."""
    raw = {f"direction.{n}": np.full(WIDTH, float(n), dtype=np.float32) for n in (9, 8, 3)}
    path = tmp_path / "repeng.gguf"
    _write_raw(path, raw, model_hint="mistral", layer_count_i32=False)
    cv = import_control_vector(path)
    assert list(cv.directions) == [3, 8, 9]
    for n in (3, 8, 9):
        assert torch.equal(cv.directions[n], torch.full((WIDTH,), float(n)))
    assert cv.model_hint == "mistral"


def test_missing_model_hint_is_empty_string(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    _write_raw(path, {"direction.1": np.ones(WIDTH, np.float32)}, model_hint=None)
    assert import_control_vector(path).model_hint == ""


# --- export errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dirs", "match"),
    [
        ({}, "no directions"),
        ({1: torch.ones(4), 2: torch.ones(5)}, "widths differ"),
        ({1: torch.tensor([1.0, float("nan")])}, "non-finite"),
        ({1: torch.tensor([1.0, float("inf")])}, "non-finite"),
        ({1: torch.tensor([1e300], dtype=torch.float64)}, "non-finite"),
        ({1: torch.ones(2, 4)}, "1-D"),
        ({1: torch.ones(())}, "1-D"),
        ({1: torch.ones(0)}, "empty"),
        ({1: torch.ones(4, dtype=torch.int64)}, "floating-point"),
        ({1: [1.0, 2.0]}, "torch.Tensor"),
        ({0: torch.ones(4)}, "block 0"),
        ({-1: torch.ones(4)}, "negative"),
        ({"1": torch.ones(4)}, "not an int"),
        ({True: torch.ones(4)}, "not an int"),
    ],
)
def test_export_rejects_bad_input(tmp_path: Path, dirs: dict, match: str) -> None:
    path = tmp_path / "v.gguf"
    with pytest.raises(ArtifactError, match=match):
        export_control_vector(path, dirs, "llama")
    assert _files(tmp_path) == []


def test_export_block0_message_explains(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as info:
        export_control_vector(tmp_path / "v.gguf", {0: torch.ones(4), 1: torch.ones(4)}, "x")
    msg = str(info.value)
    assert "direction.0" in msg
    assert "llama.cpp" in msg
    assert "Drop block 0" in msg


def test_export_scale_overflow_and_bad_scale(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="after scaling"):
        export_control_vector(tmp_path / "v.gguf", {1: torch.ones(4)}, "x", scale=1e39)
    with pytest.raises(ArtifactError, match="finite"):
        export_control_vector(tmp_path / "v.gguf", {1: torch.ones(4)}, "x", scale=float("nan"))
    with pytest.raises(ArtifactError, match="model_hint"):
        export_control_vector(tmp_path / "v.gguf", {1: torch.ones(4)}, None)  # type: ignore[arg-type]
    assert _files(tmp_path) == []


def test_export_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        export_control_vector(tmp_path / "nope" / "v.gguf", _dirs(), "llama")


def test_export_is_atomic_on_write_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing leaves neither the target nor a temp file behind."""

    def boom(self: gguf.GGUFWriter, *args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(ArtifactError, match="disk full"):
        export_control_vector(tmp_path / "v.gguf", _dirs(), "llama")
    assert _files(tmp_path) == []


def test_export_failure_keeps_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "v.gguf"
    export_control_vector(path, _dirs((1,)), "llama")
    before = path.read_bytes()

    def boom(self: gguf.GGUFWriter, *args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_control_vector(path, _dirs((2, 3)), "llama")
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["v.gguf"]


# --- import errors -----------------------------------------------------------------------


def test_import_nonexistent(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        import_control_vector(tmp_path / "missing.gguf")


def test_import_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a regular file"):
        import_control_vector(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all" * 10, b"GGUF\x03\x00"])
def test_import_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match="not a readable GGUF"):
        import_control_vector(path)


def test_import_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    _write_raw(path, {"direction.1": np.ones(WIDTH, np.float32)}, arch="llama")
    with pytest.raises(ArtifactError, match="'llama', not 'controlvector'"):
        import_control_vector(path)


def test_import_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    _write_raw(path, {})
    with pytest.raises(ArtifactError, match="no direction tensors"):
        import_control_vector(path)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("direction.0", "direction.0"),
        ("direction.-1", "not named direction"),
        ("direction.x", "not named direction"),
        ("direction.1.bias", "not named direction"),
        ("blk.1.direction", "not named direction"),
        ("direction.01", "zero-padded"),
    ],
)
def test_import_bad_tensor_names(tmp_path: Path, name: str, match: str) -> None:
    path = tmp_path / "v.gguf"
    _write_raw(path, {"direction.2": np.ones(WIDTH, np.float32), name: np.ones(WIDTH, np.float32)})
    with pytest.raises(ArtifactError, match=match):
        import_control_vector(path)


def test_import_mixed_widths(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    _write_raw(path, {"direction.1": np.ones(8, np.float32), "direction.2": np.ones(9, np.float32)})
    with pytest.raises(ArtifactError, match="width 9"):
        import_control_vector(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_import_non_finite(tmp_path: Path, bad: float) -> None:
    arr = np.ones(WIDTH, np.float32)
    arr[3] = bad
    path = tmp_path / "v.gguf"
    _write_raw(path, {"direction.1": arr})
    with pytest.raises(ArtifactError, match="non-finite"):
        import_control_vector(path)


def test_import_rejects_non_f32(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    _write_raw(path, {"direction.1": np.ones(WIDTH, np.float16)})
    with pytest.raises(ArtifactError, match="F32"):
        import_control_vector(path)


def test_import_rejects_2d(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    _write_raw(path, {"direction.1": np.ones((2, WIDTH), np.float32)})
    with pytest.raises(ArtifactError, match="1-D"):
        import_control_vector(path)


def test_import_accepts_trailing_unit_dims(tmp_path: Path) -> None:
    """ggml_n_dims (used by llama.cpp) treats ne=[n, 1] as 1-D."""
    path = tmp_path / "v.gguf"
    arr = np.arange(WIDTH, dtype=np.float32).reshape(1, WIDTH)  # numpy (1, n) == ggml ne [n, 1]
    _write_raw(path, {"direction.4": arr})
    cv = import_control_vector(path)
    assert torch.equal(cv.directions[4], torch.arange(WIDTH, dtype=torch.float32))
