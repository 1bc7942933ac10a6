"""The counter-based random numbers of docs/kernels.md, in torch.

Every draw is a pure function of ``(seed, key, i)`` (``i`` the flat element index), so a
mask does not depend on the device, the thread count or how the work is chunked. The
arithmetic is 32-bit unsigned held in int64 tensors; ``mul32`` splits the multiplication
so no intermediate leaves int64, which keeps it exact on every device. The
operations are in place on chunk-sized buffers (about ten times faster than allocating).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

MASK32 = 0xFFFFFFFF
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_C1, _C2, _C3 = 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F
CHUNK = 1 << 20  # elements per vectorized step: three int64 temporaries of 8 MiB each


def stream(seed: int, key: str) -> int:
    """FNV-1a 64-bit of the UTF-8 bytes of ``f"{seed}:{key}"``."""
    if seed < 0:
        raise InvalidArgumentError(f"random seed must be non-negative, got {seed}")
    h = _FNV_OFFSET
    for b in f"{seed}:{key}".encode():
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def _mul32_(a: torch.Tensor, c: int, tmp: torch.Tensor) -> torch.Tensor:
    """a <- a * c mod 2**32 in place (``tmp`` is scratch of a's shape)."""
    import torch

    torch.bitwise_right_shift(a, 16, out=tmp)
    tmp.mul_(c).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return a.bitwise_and_(0xFFFF).mul_(c).add_(tmp).bitwise_and_(MASK32)


def _fmix32_(h: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    import torch

    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))
    _mul32_(h, _C1, tmp)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 13, out=tmp))
    _mul32_(h, _C2, tmp)
    return h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))


def bits(seed: int, key: str, numel: int, device="cpu", start: int = 0) -> torch.Tensor:
    """The 32-bit draws ``bits(start) .. bits(start + numel - 1)`` as an int64 tensor (one chunk; no limit on size)."""
    import torch

    s = stream(seed, key)
    k0, k1 = s & MASK32, s >> 32
    i = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    tmp = torch.empty_like(i)
    hi = _mul32_(torch.bitwise_right_shift(i, 32).bitwise_xor_(k1).bitwise_and_(MASK32), _C3, tmp)
    h = _fmix32_(i.bitwise_and_(MASK32).bitwise_xor_(k0), tmp)
    return _fmix32_(h.bitwise_xor_(hi), tmp)


def uniform(seed: int, key: str, numel: int, device="cpu", start: int = 0) -> torch.Tensor:
    """float32 uniforms in [0, 1) for the flat indices ``start .. start + numel - 1``: ``(bits >> 8) * 2**-24``."""
    import torch

    if numel < 0 or start < 0:
        raise InvalidArgumentError("uniform: numel and start must be non-negative")
    if start + numel > (1 << 63):
        raise InvalidArgumentError("uniform: element index beyond 2**63")
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for lo in range(0, numel, CHUNK):
        n = min(CHUNK, numel - lo)
        b = bits(seed, key, n, device, start + lo)
        # values < 2**24 are exact in float32, and the scale is a power of two: exact
        out[lo : lo + n] = (b >> 8).to(torch.float32) * (2.0**-24)
    return out


def uniform_scalar(seed: int, key: str, i: int) -> float:
    """One draw in plain Python: the definition, for tests and documentation."""
    s = stream(seed, key)
    k0, k1 = s & MASK32, s >> 32

    def mul32(a: int, c: int) -> int:
        return (a * c) & MASK32

    def fmix32(h: int) -> int:
        h ^= h >> 16
        h = mul32(h, _C1)
        h ^= h >> 13
        h = mul32(h, _C2)
        return h ^ (h >> 16)

    b = fmix32(fmix32((i & MASK32) ^ k0) ^ mul32(((i >> 32) ^ k1) & MASK32, _C3))
    return (b >> 8) * 2.0**-24
