"""The exception classes the native module raises: every one a ``MergekittyError`` whose
message names the file and the tensor, and still the builtin its callers catch."""

from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pytest

from mergekitty import _native
from mergekitty.errors import (
    FileIOError,
    InvalidArgumentError,
    MergekittyError,
    MissingFileError,
    ModelFormatError,
    OutputError,
    SafetensorsError,
    ShardWriterError,
    TensorNotFoundError,
)


def _write(path, header: bytes, data: bytes = b"") -> str:
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def test_file_io_error_picks_the_errno_subclass():
    e = FileIOError(errno.ENOENT, "No such file or directory", "/m/x.safetensors")
    assert type(e) is MissingFileError
    assert isinstance(e, FileNotFoundError) and isinstance(e, MergekittyError)
    assert (e.errno, e.filename) == (errno.ENOENT, "/m/x.safetensors")
    assert str(e) == "[Errno 2] No such file or directory: '/m/x.safetensors'"
    assert isinstance(FileIOError(errno.EACCES, "Permission denied", "/x"), PermissionError)
    assert type(FileIOError(errno.ENOSPC, "No space left on device", "/x")) is FileIOError
    assert type(FileIOError("no errno")) is FileIOError
    assert type(pickle.loads(pickle.dumps(e))) is MissingFileError


def test_tensor_not_found_prints_its_message_unquoted():
    e = TensorNotFoundError("tensor 'w' not found in /m/x.safetensors")
    assert isinstance(e, KeyError)
    assert str(e) == "tensor 'w' not found in /m/x.safetensors"


def test_missing_and_unreadable_files(tmp_path):
    p = str(tmp_path / "missing.safetensors")
    with pytest.raises(MissingFileError) as ei:
        _native.SafetensorsFile(p)
    assert ei.value.filename == p and ei.value.errno == errno.ENOENT
    with pytest.raises(FileIOError) as ei:
        _native.SafetensorsFile(str(tmp_path))  # a directory
    assert isinstance(ei.value, OSError) and str(tmp_path) in str(ei.value)


def test_malformed_file(tmp_path):
    path = _write(
        tmp_path / "x.safetensors", b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', bytes(8)
    )
    with pytest.raises(SafetensorsError) as ei:
        _native.SafetensorsFile(path)
    assert isinstance(ei.value, ModelFormatError)
    assert path in str(ei.value) and '"w"' in str(ei.value)


def test_missing_tensor(tmp_path):
    path = _write(tmp_path / "x.safetensors", b'{"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}', bytes(2))
    with pytest.raises(TensorNotFoundError) as ei:
        _native.SafetensorsFile(path).view("v")
    assert isinstance(ei.value, KeyError)
    assert path in str(ei.value) and '"v"' in str(ei.value)


def test_bad_arguments():
    a = np.zeros(8, dtype=np.uint8)
    with pytest.raises(InvalidArgumentError, match="Q8"):
        _native.weighted_sum([a], ["Q8"], [1.0], np.zeros(8, dtype=np.uint8), "F16")
    with pytest.raises(InvalidArgumentError, match="inputs"):
        _native.weighted_sum([a], ["F16", "F16"], [1.0], np.zeros(8, dtype=np.uint8), "F16")
    with pytest.raises(InvalidArgumentError, match="overlaps"):
        _native.convert(a, "F16", a, "F16")
    with pytest.raises(ValueError, match="float32"):
        _native.magnitude(bytearray(6), 0.5)


def test_shard_writer_misuse(tmp_path):
    w = _native.ShardWriter(str(tmp_path), [("a", "U8", [2])], 0)
    with pytest.raises(ShardWriterError, match='"zz"') as ei:
        w.write("zz", np.zeros(2, dtype=np.uint8))
    assert isinstance(ei.value, OutputError) and isinstance(ei.value, ValueError)
    with pytest.raises(TensorNotFoundError, match="zz"):
        w.shard_of("zz")
    with pytest.raises(ShardWriterError, match='"a"'):
        w.finalize()
    w.abort()
    assert os.listdir(tmp_path) == []
