"""End-to-end tests of the native core (mergekitty._native) through its Python API."""

from __future__ import annotations

import gc
import json
import os
import struct
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekitty import _native
from mergekitty.errors import FileIOError, InvalidArgumentError, ShardWriterError, TensorNotFoundError

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def from_view(view, dtype: torch.dtype, shape) -> torch.Tensor:
    if len(view) == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer
        return torch.frombuffer(view, dtype=dtype).view(shape)


def write_raw(path, header: dict | bytes, data: bytes = b"") -> str:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
    return str(path)


# ---------------------------------------------------------------- reading


def test_version_and_exception():
    from mergekitty import errors

    assert isinstance(_native.__version__, str) and _native.__version__
    assert _native.SafetensorsError is errors.SafetensorsError
    assert issubclass(_native.SafetensorsError, errors.ModelFormatError)


def test_read_back_file_written_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(3, generator=g).to(torch.float16),
        "c": torch.randn(2, 2, 2, generator=g),
        "ids": torch.arange(10, dtype=torch.int64),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "odd": torch.tensor([1, 2, 3], dtype=torch.uint8),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "who": "test"})

    f = _native.SafetensorsFile(str(path))
    assert f.path == str(path)
    assert f.nbytes == os.path.getsize(path)
    assert f.metadata() == {"format": "pt", "who": "test"}
    infos = f.tensors()
    assert sorted(i[0] for i in infos) == sorted(tensors)
    starts = [i[3] for i in infos]
    assert starts == sorted(starts)
    raw = path.read_bytes()
    codes = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.uint8: "U8"}
    for name, dtype, shape, start, end in infos:
        t = tensors[name]
        assert dtype == codes[t.dtype]
        assert tuple(shape) == tuple(t.shape)
        assert end - start == t.numel() * t.element_size()
        view = f.view(name)
        assert len(view) == end - start
        assert bytes(memoryview(view)) == raw[start:end]
        got = from_view(view, t.dtype, t.shape)
        assert torch.equal(got, t)
        assert np.array_equal(np.frombuffer(view, dtype=np.uint8), np.frombuffer(raw[start:end], dtype=np.uint8))
        f.prefetch(name)
        f.release(name)
        assert bytes(memoryview(view)) == raw[start:end]  # still readable after MADV_DONTNEED


def test_view_outlives_file_and_is_readonly(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.arange(6, dtype=torch.float32)}, str(path))
    f = _native.SafetensorsFile(str(path))
    view = f.view("x")
    del f
    gc.collect()
    mv = memoryview(view)
    assert mv.readonly and mv.format == "B" and mv.ndim == 1 and mv.itemsize == 1
    assert np.frombuffer(view, dtype=np.float32).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises((BufferError, TypeError)):
        mv[0] = 1


def test_empty_tensor_view(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"e": torch.zeros(0)}, str(path))
    view = _native.SafetensorsFile(str(path)).view("e")
    assert len(view) == 0
    assert memoryview(view).nbytes == 0
    assert np.frombuffer(view, dtype=np.uint8).size == 0


def test_missing_tensor_is_keyerror(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    f = _native.SafetensorsFile(str(path))
    with pytest.raises(KeyError, match="nope") as ei:
        f.view("nope")
    assert "m.safetensors" in str(ei.value)
    assert isinstance(ei.value, TensorNotFoundError)


def test_missing_file_is_filenotfound(tmp_path):
    p = str(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError) as ei:
        _native.SafetensorsFile(p)
    assert p in str(ei.value)
    assert isinstance(ei.value, FileIOError) and ei.value.filename == p


def _valid_header():
    return {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "BF16", "shape": [2], "data_offsets": [8, 12]},
    }


MALFORMED = {
    "truncated": lambda p: p.write_bytes(b"\x05\x00\x00"),
    "header_past_end": lambda p: p.write_bytes(struct.pack("<Q", 1000) + b"{}"),
    "bad_json": lambda p: write_raw(p, b'{"a": {"dtype": '),
    "not_object": lambda p: write_raw(p, b"[1, 2, 3]"),
    "bad_utf8": lambda p: write_raw(p, b"\xff\xfe\xfd"),
    "overlap": lambda p: write_raw(
        p,
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        bytes(12),
    ),
    "size_mismatch": lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
    "beyond_data": lambda p: write_raw(p, _valid_header(), bytes(10)),
    "unknown_dtype": lambda p: write_raw(p, {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, bytes(2)),
    "missing_field": lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "reversed": lambda p: write_raw(p, {"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 2]}}, bytes(8)),
    "truncated_data": lambda p: p.write_bytes(
        struct.pack("<Q", len(json.dumps(_valid_header()))) + json.dumps(_valid_header()).encode() + bytes(5)
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_raise_safetensors_error(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    MALFORMED[case](path)
    with pytest.raises(_native.SafetensorsError) as ei:
        _native.SafetensorsFile(str(path))
    assert str(path) in str(ei.value)


def test_malformed_messages_name_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    MALFORMED["size_mismatch"](path)
    with pytest.raises(_native.SafetensorsError, match='"a"'):
        _native.SafetensorsFile(str(path))


@pytest.mark.parametrize("numel", [1, 3, 5, 8])
def test_dtype_sizes_agree_with_the_native_table(tmp_path, numel):
    from mergekitty.io.dtypes import DTYPE_BITS, nbytes

    for code in DTYPE_BITS:
        size = nbytes(code, numel)
        path = tmp_path / f"{code}.safetensors"
        write_raw(path, {"t": {"dtype": code, "shape": [numel], "data_offsets": [0, size]}}, bytes(size))
        (name, dtype, shape, start, end), *_ = _native.SafetensorsFile(str(path)).tensors()
        assert (dtype, end - start) == (code, size)
        write_raw(path, {"t": {"dtype": code, "shape": [numel], "data_offsets": [0, size - 1]}}, bytes(size))
        with pytest.raises(_native.SafetensorsError):
            _native.SafetensorsFile(str(path))


def test_truncations_of_a_real_file_never_crash(tmp_path):
    src = tmp_path / "ok.safetensors"
    save_file({"w": torch.randn(4, 4).to(torch.bfloat16), "b": torch.randn(4)}, str(src))
    raw = src.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in range(0, len(raw), 3):
        bad.write_bytes(raw[:cut])
        with pytest.raises(_native.SafetensorsError):
            _native.SafetensorsFile(str(bad))


# ---------------------------------------------------------------- kernels


def reference(xs, ws, out_dtype):
    acc = ws[0] * xs[0].float()
    for x, w in zip(xs[1:], ws[1:]):
        acc = acc + w * x.float()
    return acc.to(out_dtype)


@pytest.mark.parametrize("n", [0, 1, 7, 4097, 100_003])
@pytest.mark.parametrize("out_code", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("in_code", ["F32", "F16", "BF16", "mixed"])
def test_weighted_sum_matches_torch(n, in_code, out_code):
    g = torch.Generator().manual_seed(n)
    codes = ["BF16", "F16", "F32"] if in_code == "mixed" else [in_code] * 3
    xs = [torch.randn(n, generator=g).to(FLOAT_DTYPES[c]) for c in codes]
    ws = [0.5, -0.25, 1.125]
    out = torch.empty(n, dtype=FLOAT_DTYPES[out_code])
    _native.weighted_sum([as_bytes(x) for x in xs], codes, ws, as_bytes(out), out_code)
    want = reference(xs, ws, FLOAT_DTYPES[out_code])
    assert torch.equal(out.view(torch.uint8) if n else out, want.view(torch.uint8) if n else want)


def test_weighted_sum_threads_agree():
    g = torch.Generator().manual_seed(1)
    n = 300_001
    xs = [torch.randn(n, generator=g).to(torch.bfloat16) for _ in range(4)]
    ws = [0.1, 0.2, 0.3, 0.4]
    outs = []
    for threads in (1, 2, 0):
        out = torch.empty(n, dtype=torch.bfloat16)
        _native.weighted_sum([as_bytes(x) for x in xs], ["BF16"] * 4, ws, as_bytes(out), "BF16", threads)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(outs[0], reference(xs, ws, torch.bfloat16))


def test_weighted_sum_unaligned_inputs_and_other_buffers():
    n = 1001
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g)
    # bf16 bytes at an odd address, f32 bytes at offset 2 of a bytearray.
    ba = bytearray(1) + bytes(as_bytes(a))
    bb = bytearray(2) + bytes(as_bytes(b))
    out = bytearray(n * 2 + 1)
    _native.weighted_sum(
        [memoryview(ba)[1:], memoryview(bb)[2:]], ["BF16", "F32"], [0.3, 0.7], memoryview(out)[1:], "BF16"
    )
    got = torch.frombuffer(bytearray(out[1:]), dtype=torch.bfloat16)
    assert torch.equal(got, reference([a, b], [0.3, 0.7], torch.bfloat16))
    # A float32 numpy array is accepted as raw bytes too.
    out32 = np.empty(n, dtype=np.float32)
    _native.weighted_sum([b.numpy()], ["F32"], [2.0], out32, "F32", 1)
    assert np.array_equal(out32, (2.0 * b).numpy())


def test_weighted_sum_from_tensor_views(tmp_path):
    path = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(4)
    # A U8 tensor of odd length first, so the bf16 tensors start at odd offsets.
    ts = {
        "pad": torch.zeros(3, dtype=torch.uint8),
        "x": torch.randn(513, generator=g).to(torch.bfloat16),
        "y": torch.randn(513, generator=g).to(torch.bfloat16),
    }
    save_file(ts, str(path))
    f = _native.SafetensorsFile(str(path))
    out = torch.empty(513, dtype=torch.float16)
    _native.weighted_sum([f.view("x"), f.view("y")], ["BF16", "BF16"], [0.5, 0.5], as_bytes(out), "F16")
    assert torch.equal(out, reference([ts["x"], ts["y"]], [0.5, 0.5], torch.float16))


def test_weighted_sum_nan_inf():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e38, 70000.0], dtype=torch.float32)
    for code, dt in FLOAT_DTYPES.items():
        out = torch.empty(5, dtype=dt)
        _native.weighted_sum([as_bytes(x)], ["F32"], [1.0], as_bytes(out), code)
        want = x.to(dt)
        assert torch.isnan(out[0]) and torch.equal(out[1:], want[1:])


def test_weighted_sum_errors():
    a = np.zeros(8, dtype=np.uint8)
    b = np.zeros(6, dtype=np.uint8)
    out = np.zeros(4, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"input 1"):
        _native.weighted_sum([a, b], ["F16", "F16"], [1.0, 1.0], np.zeros(8, dtype=np.uint8), "F16")
    with pytest.raises(ValueError):
        _native.weighted_sum([a], ["F16", "F16"], [1.0], out, "F16")
    with pytest.raises(InvalidArgumentError, match="I8"):
        _native.weighted_sum([a], ["I8"], [1.0], out, "F16")
    with pytest.raises(ValueError, match="XX"):
        _native.weighted_sum([a], ["F16"], [1.0], out, "XX")
    with pytest.raises(ValueError, match="overlaps"):
        _native.weighted_sum([a], ["F16"], [1.0], a, "F16")
    with pytest.raises(BufferError, match="out"):
        _native.weighted_sum([a], ["F32"], [1.0], bytes(8), "F32")
    with pytest.raises(TypeError, match=r"inputs\[0\]"):
        _native.weighted_sum([3], ["F32"], [1.0], out, "F32")
    with pytest.raises((BufferError, ValueError)):
        _native.weighted_sum(
            [np.zeros((4, 4), dtype=np.float32)[:, ::2]], ["F32"], [1.0], np.zeros(8, dtype=np.float32), "F32"
        )


@pytest.mark.parametrize("src", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("dst", ["F32", "F16", "BF16"])
def test_convert(src, dst):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(10_001, generator=g) * 100).to(FLOAT_DTYPES[src])
    out = torch.empty(x.shape, dtype=FLOAT_DTYPES[dst])
    _native.convert(as_bytes(x), src, as_bytes(out), dst)
    assert torch.equal(out, x.to(FLOAT_DTYPES[dst]))


# ---------------------------------------------------------------- writing


def specs_of(tensors):
    codes = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
    return [(k, codes[v.dtype], list(v.shape)) for k, v in tensors.items()]


def make_tensors():
    g = torch.Generator().manual_seed(11)
    return {
        "model.embed.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.w": torch.randn(8, 8, generator=g),
        "model.layers.0.b": torch.randn(8, generator=g).to(torch.float16),
        "model.layers.1.w": torch.randn(8, 8, generator=g),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 3, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
    }


def test_shard_writer_single_file(tmp_path):
    ts = make_tensors()
    w = _native.ShardWriter(str(tmp_path), specs_of(ts), 0, {"mergekitty": "yes"})
    assert w.shard_files == ["model.safetensors"]
    assert w.total_bytes == sum(t.numel() * t.element_size() for t in ts.values())
    assert os.listdir(tmp_path) == [".model.safetensors.partial"]
    for name in reversed(list(ts)):
        w.write(name, as_bytes(ts[name]))
    assert w.finalize() == ["model.safetensors"]
    assert os.listdir(tmp_path) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert list(f.keys()) == list(ts) or sorted(f.keys()) == sorted(ts)
        assert f.metadata() == {"format": "pt", "mergekitty": "yes"}
        for name, t in ts.items():
            assert torch.equal(f.get_tensor(name), t)
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] % 8 == 0


def test_shard_writer_sharded_index(tmp_path):
    ts = make_tensors()
    budget = 600
    w = _native.ShardWriter(str(tmp_path), specs_of(ts), budget, None, {"mergekitty_version": "0.1"})
    files = w.shard_files
    assert len(files) > 1
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for name, t in ts.items():
        w.write(name, as_bytes(t))
    written = w.finalize()
    assert written == files + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == w.total_bytes
    assert index["metadata"]["mergekitty_version"] == "0.1"
    assert list(index["weight_map"]) == list(ts)
    assert sorted(os.listdir(tmp_path)) == sorted(written)
    for name, t in ts.items():
        file = index["weight_map"][name]
        assert file == w.shard_of(name)
        with safe_open(str(tmp_path / file), "pt") as f:
            assert torch.equal(f.get_tensor(name), t)
    # Each shard respects the budget unless it holds a single tensor.
    for file in files:
        with safe_open(str(tmp_path / file), "pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
            assert size <= budget or len(keys) == 1


def test_shard_writer_loads_with_transformers_conventions(tmp_path):
    # transformers resolves a sharded checkpoint via the index's weight_map.
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

    ts = make_tensors()
    w = _native.ShardWriter(str(tmp_path), specs_of(ts), 300)
    for name, t in ts.items():
        w.write(name, as_bytes(t))
    w.finalize()
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    loaded = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(tmp_path / file), "pt") as f:
            for k in f.keys():
                loaded[k] = f.get_tensor(k)
    assert set(loaded) == set(ts)


def test_shard_writer_errors(tmp_path):
    ts = {"a": torch.zeros(4), "b": torch.zeros(2)}
    w = _native.ShardWriter(str(tmp_path), specs_of(ts), 0)
    with pytest.raises(ValueError, match="planned 16"):
        w.write("a", np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="zz"):
        w.write("zz", np.zeros(3, dtype=np.uint8))
    w.write("a", as_bytes(ts["a"]))
    with pytest.raises(ShardWriterError, match="already written"):
        w.write("a", as_bytes(ts["a"]))
    with pytest.raises(ValueError, match='"b"'):
        w.finalize()
    with pytest.raises(TensorNotFoundError, match="zz"):
        w.shard_of("zz")
    w.abort()
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="a"):
        _native.ShardWriter(str(tmp_path), [("a", "F32", [1]), ("a", "F32", [1])], 0)
    with pytest.raises(ValueError, match="Q8"):
        _native.ShardWriter(str(tmp_path), [("a", "Q8", [1])], 0)
    assert os.listdir(tmp_path) == []


def test_shard_writer_drop_cleans_up(tmp_path):
    ts = make_tensors()
    w = _native.ShardWriter(str(tmp_path), specs_of(ts), 300)
    w.write("scalar", as_bytes(ts["scalar"]))
    assert len(os.listdir(tmp_path)) == len(w.shard_files)
    assert all(n.startswith(".") and n.endswith(".partial") for n in os.listdir(tmp_path))
    del w
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_shard_writer_context_manager(tmp_path):
    ts = {"a": torch.ones(2)}
    with pytest.raises(RuntimeError):
        with _native.ShardWriter(str(tmp_path), specs_of(ts), 0) as w:
            w.write("a", as_bytes(ts["a"]))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with _native.ShardWriter(str(tmp_path), specs_of(ts), 0) as w:
        w.write("a", as_bytes(ts["a"]))
        w.finalize()
    assert os.listdir(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize("direct", ["on", "off"])
def test_large_tensor_merges_are_exact_with_and_without_direct_io(direct, tmp_path, monkeypatch):
    """Tensors over 1 MiB at unaligned offsets take the O_DIRECT path (aligned interior pages
    direct, edge pages buffered) where the file system allows; MERGEKITTY_NO_DIRECT_IO=1 turns
    it off. Either way the output is the plain torch average, byte for byte."""
    from mergekitty.api import run_merge

    if direct == "off":
        monkeypatch.setenv("MERGEKITTY_NO_DIRECT_IO", "1")
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (1031, 517), "layers.0.a.weight": (700, 1003), "layers.0.b.bias": (5,),
              "layers.1.a.weight": (700, 1003), "layers.1.b.bias": (5,), "head.weight": (257, 4099)}  # fmt: skip
    models = []
    for m in range(2):
        d = tmp_path / f"m{m}"
        d.mkdir()
        save_file(
            {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()},
            str(d / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (d / "config.json").write_text(json.dumps({"architectures": ["Blob"], "model_type": "blob", "n_blocks": 2}))
        models.append(d)
    layout = tmp_path / "layout.json"
    layout.write_text(
        json.dumps({"layer_prefix": "layers", "num_layers_key": "n_blocks", "pre": ["embed.*"], "post": ["head.*"]})
    )
    config = f"merge_method: linear\nmodels:\n  - model: {models[0]}\n    parameters: {{weight: 0.25}}\n  - model: {models[1]}\n    parameters: {{weight: 0.75}}\n"
    out = tmp_path / "out"
    run_merge(config, out, quiet=True, layout_override=str(layout))
    with (
        safe_open(str(out / "model.safetensors"), "pt") as got,
        safe_open(str(models[0] / "model.safetensors"), "pt") as a,
        safe_open(str(models[1] / "model.safetensors"), "pt") as b,
    ):
        assert sorted(got.keys()) == sorted(shapes)
        for k in shapes:
            want = (0.25 * a.get_tensor(k).float() + 0.75 * b.get_tensor(k).float()).to(torch.bfloat16)
            assert torch.equal(got.get_tensor(k).view(torch.int16), want.view(torch.int16)), k
