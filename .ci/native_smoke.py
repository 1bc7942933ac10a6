"""Check the native module of an installed wheel without torch (which some platforms have no
wheels for): write a sharded checkpoint with ShardWriter, read every tensor back through
SafetensorsFile, once with the platform's IO and once with MERGEKITTY_PORTABLE_IO=1 (in a child
process), and check that both runs wrote the same bytes.

    python .ci/native_smoke.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Sizes that cross page boundaries, one large enough for the fast path's direct writes.
SIZES = {"a": 3_000_001, "b": 5, "c": 0, "d": 2_500_000, "e": 4096 * 300}
MAX_SHARD_BYTES = 4_000_000


def payload(name: str, n: int) -> bytes:
    seed = ord(name)
    return bytes((i * 31 + seed) % 251 for i in range(n))


def write_and_check(out: Path) -> str:
    from mergekitty import _native

    specs = [(name, "U8", [n]) for name, n in SIZES.items()]
    with _native.ShardWriter(out, specs, MAX_SHARD_BYTES, {"k": "v"}) as w:
        for name in reversed(SIZES):
            w.write(name, payload(name, SIZES[name]))
        files = w.finalize()
    assert files[-1] == "model.safetensors.index.json", files
    shards = [out / f for f in files[:-1]]
    assert len(shards) > 1, files
    seen = set()
    for shard in shards:
        f = _native.SafetensorsFile(shard)
        for name, *_ in f.tensors():
            assert bytes(memoryview(f.view(name))) == payload(name, SIZES[name]), (shard, name)
            seen.add(name)
        f.check_intact()
    assert seen == set(SIZES), seen
    return _native.io_mode()


def main() -> None:
    if len(sys.argv) == 2:  # the child: one run, says which IO it used
        print(write_and_check(Path(sys.argv[1])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        outs = {mode: Path(tmp) / mode for mode in ("native", "portable")}
        for mode, out in outs.items():
            env = dict(os.environ)
            env.pop("MERGEKITTY_PORTABLE_IO", None)
            if mode == "portable":
                env["MERGEKITTY_PORTABLE_IO"] = "1"
            used = subprocess.run(
                [sys.executable, __file__, str(out)], env=env, check=True, capture_output=True, text=True
            ).stdout.strip()
            assert used == mode, (mode, used)
        names = sorted(p.name for p in outs["native"].iterdir())
        assert names == sorted(p.name for p in outs["portable"].iterdir())
        for name in names:
            assert (outs["native"] / name).read_bytes() == (outs["portable"] / name).read_bytes(), name
        print(f"native module OK: {len(names)} files, identical through the native and the portable IO")


if __name__ == "__main__":
    main()
