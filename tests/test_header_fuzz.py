"""Thousands of mutated safetensors files, opened through the readers Python uses.

Each mutation (seeded, so a failure names a case that can be replayed) must give either a file
that opens and whose tensors can all be read, or a MergekittyError whose one-line message names
the file: never a panic, never another exception, never a slow open.
"""

from __future__ import annotations

import json
import math
import random
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mergekitty import _native
from mergekitty.errors import MergekittyError
from mergekitty.io.checkpoint import Checkpoint

pytestmark = pytest.mark.faults

SEED = 20240611
CASES = 3000
SLOW_OPEN_S = 0.5

DATA = bytes(range(256)) * 2


def base_header() -> dict[str, Any]:
    return {
        "__metadata__": {"format": "pt", "note": "fuzz"},
        "a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
        "b.weight": {"dtype": "BF16", "shape": [8], "data_offsets": [32, 48]},
        "c": {"dtype": "U8", "shape": [0, 3], "data_offsets": [48, 48]},
        "d": {"dtype": "I64", "shape": [4], "data_offsets": [64, 96]},
    }


def pack(header: bytes, data: bytes = DATA) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def deep(depth: int) -> str:
    """A placeholder for a value nested ``depth`` levels deep (json.dumps would recurse)."""
    return f"@deep{depth}@"


def encode(header: Any) -> bytes:
    text = json.dumps(header, separators=(",", ":"))
    for depth in {int(m) for m in re.findall(r'"@deep(\d+)@"', text)}:
        nested = '{"k":[' * (depth // 2) + "1" + "]}" * (depth // 2)
        text = text.replace(f'"@deep{depth}@"', nested)
    return text.encode()


HUGE = [2**64 - 1, 2**64, 2**63, 2**63 - 1, 2**32, 10**30, -1, -(2**63), 1.5, 1e308, "3", None, True, [], {}]
DTYPES = ["F8", "", "f32", "BF32", "F32 ", "Q4_K", 5, None, ["F32"], {"F32": 1}, "\u0000", "F16\n"]


def json_edit(rng: random.Random) -> bytes:
    h = base_header()
    names = [n for n in h if n != "__metadata__"]
    name = rng.choice(names)
    entry = h[name]
    kind = rng.randrange(14)
    if kind == 0:
        entry["data_offsets"] = [rng.choice(HUGE), rng.choice([*HUGE, 32])]
    elif kind == 1:
        entry["data_offsets"][rng.randrange(2)] = rng.choice(HUGE)
    elif kind == 2:  # overlap with another tensor, or reversed, or out of the file
        start = rng.randrange(0, 120)
        entry["data_offsets"] = [start, start + rng.choice([0, 8, 16, 32, -4, 1000])]
    elif kind == 3:
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == 4:
        if rng.random() < 0.5:
            entry = h["c"]  # the empty tensor: any shape with a zero has the right byte size
        entry["shape"] = rng.choice(
            [[-1], [0, 2**64 - 1], [2**63], [2**32, 2**32], [1.5], ["2"], [[2]], None, 3, [1] * 5000, []]
        )
    elif kind == 5:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == 6:
        h[name] = rng.choice([None, 3, "x", [], [1, 2], deep(rng.choice([10, 200, 5000]))])
    elif kind == 7:
        h["__metadata__"] = rng.choice([None, [], {"k": 1}, {"k": ["v"]}, {"k": None}, "meta", deep(300)])
    elif kind == 8:  # not an object at the top
        return encode(rng.choice([[], [h], 3, "header", None, deep(rng.choice([50, 5000]))]))
    elif kind == 9:  # a repeated tensor, field or metadata key (json.dumps cannot write them)
        text = encode(h).decode()
        dup = rng.choice([f'"{name}":{json.dumps(entry)},', '"dtype":"U8",', '"__metadata__":{},', '"format":"x",'])
        anchor = rng.choice([m.start() + 1 for m in re.finditer(r"[{,]", text)])
        return (text[:anchor] + dup + text[anchor:]).encode()
    elif kind == 10:  # odd but legal names
        h[rng.choice(["", "\n", "\u00e9\u4e2d", "x" * 100_000, "__metadata", "a\u0000b"])] = entry
        del h[name]
    elif kind == 11:
        entry[rng.choice(["extra", "offsets", "Dtype"])] = rng.choice([deep(100), "x", 1, None])
    elif kind == 12:  # many tensors
        for i in range(rng.choice([100, 2000])):
            h[f"t{i}"] = {"dtype": "U8", "shape": [1], "data_offsets": [i % 96, i % 96 + 1]}
    else:  # trailing garbage, padding, escapes
        return encode(h) + rng.choice([b" " * 7, b"\x00", b"}", b"{}", b"\\ud800", b"\n\t"])
    return encode(h)


def flip_bits(rng: random.Random, f: bytearray) -> bytes:
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(f))
        f[i] ^= 1 << rng.randrange(8)
    return bytes(f)


def text_edit(rng: random.Random, f: bytearray) -> bytes:
    n = struct.unpack("<Q", f[:8])[0]
    i = 8 + rng.randrange(n)
    piece = rng.choice([b"", b"9", b"-", b"99999999999999999999", b'"', b"[", b"]", b"{", b",", b"\xff", b"e5"])
    f[i : i + rng.randint(0, 3)] = piece
    return bytes(f)


def length_field(rng: random.Random, f: bytearray) -> bytes:
    n = struct.unpack("<Q", f[:8])[0]
    new = rng.choice([0, 1, 2, n - 1, n + 1, n + 7, len(f), 10**8, 10**8 + 1, 2**63, 2**64 - 1, rng.randrange(2**64)])
    return struct.pack("<Q", new % 2**64) + bytes(f[8:])


def mutate(rng: random.Random) -> tuple[str, bytes]:
    base = bytearray(pack(encode(base_header())))
    kind = rng.randrange(6)
    if kind == 0:
        return "bits", flip_bits(rng, base)
    if kind == 1:
        return "truncate", bytes(base[: rng.randrange(len(base))])
    if kind == 2:
        return "length", length_field(rng, base)
    if kind == 3:
        return "text", text_edit(rng, base)
    header = json_edit(rng)
    data = DATA if kind == 4 else DATA[: rng.randrange(len(DATA))]
    return "json", pack(header, data)


def outcome(path: Path, open_and_read: Callable[[Path], None]) -> str:
    started = time.perf_counter()
    try:
        open_and_read(path)
        result = "ok"
    except MergekittyError as exc:
        message = str(exc)
        assert str(path) in message, f"{type(exc).__name__} does not name the file: {message[:300]}"
        assert "\n" not in message, f"{type(exc).__name__} spans lines: {message[:300]}"
        result = type(exc).__name__
    except BaseException as exc:  # a pyo3 PanicException is a BaseException
        raise AssertionError(f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:300]}") from exc
    elapsed = time.perf_counter() - started
    assert elapsed < SLOW_OPEN_S, f"took {elapsed:.2f}s"
    return result


def read_native(path: Path) -> None:
    f = _native.SafetensorsFile(path)
    f.metadata()
    for name, dtype, shape, start, end in f.tensors():
        assert 0 <= start <= end <= f.nbytes and isinstance(dtype, str)
        # torch and numpy index with signed 64-bit sizes, even for an empty tensor
        assert math.prod(d for d in shape if d) < 2**63 and all(d >= 0 for d in shape), shape
        assert len(bytes(memoryview(f.view(name)))) == end - start
        assert name in f
    f.check_intact()


def read_checkpoint(path: Path) -> None:
    ckpt = Checkpoint(path.parent, files=[path.name])
    for name, info in ckpt.infos.items():
        view = ckpt.view(name)
        assert view is not None and len(view) == info.nbytes


def test_mutated_headers_open_or_fail_with_a_typed_error(tmp_path):
    rng = random.Random(SEED)
    seen: dict[str, set[str]] = {}
    started = time.perf_counter()
    for case in range(CASES):
        kind, data = mutate(rng)
        path = tmp_path / f"case{case}" / "model.safetensors"
        path.parent.mkdir()
        path.write_bytes(data)
        try:
            native = outcome(path, read_native)
            checkpoint = outcome(path, read_checkpoint)
        except AssertionError as exc:
            raise AssertionError(f"case {case} ({kind}, seed {SEED}): {exc}") from None
        assert (native == "ok") == (checkpoint == "ok"), (case, kind, native, checkpoint)
        seen.setdefault(kind, set()).add(native)
    elapsed = time.perf_counter() - started
    # every kind of mutation was drawn, and the cases reach both outcomes and many error kinds
    assert set(seen) == {"bits", "truncate", "length", "text", "json"}, seen
    assert any("ok" in s for s in seen.values())
    errors = set().union(*seen.values()) - {"ok"}
    assert {"SafetensorsError"} <= errors, errors
    assert elapsed < 30, f"{CASES} cases took {elapsed:.1f}s"


def test_known_hostile_headers_are_refused(tmp_path):
    """The cases the fuzzer is there to find, pinned."""
    cases = {
        "overflowing shape": {"w": {"dtype": "U8", "shape": [0, 2**64 - 1], "data_offsets": [0, 0]}},
        "repeated field": '{"w":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}}',
        "negative offset": {"w": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}},
        "deep nesting": {"w": deep(100_000)},
    }
    for what, header in cases.items():
        path = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        text = header.encode() if isinstance(header, str) else encode(header)
        path.write_bytes(pack(text))
        assert outcome(path, read_native) == "SafetensorsError", what
