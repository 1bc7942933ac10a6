"""Parse byte sizes such as ``5B``, ``500M``, ``1.5G`` or ``512MiB``."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import InvalidArgumentError

_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "b": 10**9,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmbgt]i?)?(b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes. Suffixes are decimal (k=1e3, M=1e6, B or G=1e9, T=1e12) unless binary (KiB, MiB, GiB).

    ``5B`` means five billion bytes, as in the other merge tools; ``0`` or a
    negative number means no limit.
    """
    if isinstance(text, int):
        return text
    s = str(text).strip()
    if re.fullmatch(r"-\d+", s):
        return int(s)
    m = _PATTERN.match(s)
    if not m:
        raise InvalidArgumentError(f"cannot read '{text}' as a size in bytes (examples: 5B, 500M, 1.5G, 512MiB)")
    number, unit, trailing_b = m.groups()
    unit = (unit or "").lower()
    if unit == "" and trailing_b:
        unit = "b"  # "5B": billions of bytes
    return int(float(number) * _UNITS[unit])


def format_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def numel(shape: Iterable[int]) -> int:
    """The number of elements of a tensor of ``shape`` (1 for a scalar)."""
    n = 1
    for s in shape:
        n *= s
    return n
