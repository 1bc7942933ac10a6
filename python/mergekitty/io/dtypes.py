"""The table between safetensors dtype codes, torch dtypes and config names.

torch is imported only when a torch dtype is asked for, so the native CPU path
(and ``mergekitty plan``) never pays for importing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

# dtypes the native kernels read and write directly
NATIVE_FLOAT_CODES = frozenset({"F32", "F16", "BF16"})
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
CONFIG_NAME_TO_CODE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Bits per element of every safetensors dtype: the one table of element sizes (the Rust side's
# is `Dtype::bits` in rust/src/dtype.rs). Sub-byte floats pack several elements per byte.
DTYPE_BITS: Mapping[str, int] = MappingProxyType(
    {
        "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
        "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
        "I32": 32, "U32": 32, "F32": 32,
        "F64": 64, "I64": 64, "U64": 64, "C64": 64,
        "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    }
)  # fmt: skip


def dtype_bits(code: str) -> int:
    """Bits per element of the safetensors dtype ``code`` (4 for F4, 6 for F6_*)."""
    try:
        return DTYPE_BITS[code]
    except KeyError:
        raise InvalidArgumentError(f"unknown safetensors dtype {code!r}") from None


def nbytes(code: str, numel: int) -> int:
    """Bytes of ``numel`` elements of ``code``: ``ceil(numel * bits / 8)``, as safetensors stores them."""
    return (numel * dtype_bits(code) + 7) // 8


@cache
def _tables() -> tuple[dict, dict]:
    import torch

    code_to_torch = {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
        "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
        "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
        "C64": torch.complex64,
    }  # fmt: skip
    for code, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu")):
        if hasattr(torch, attr):
            code_to_torch[code] = getattr(torch, attr)
    return code_to_torch, {v: k for k, v in code_to_torch.items()}


def torch_dtype(code: str) -> torch.dtype | None:
    """The torch dtype for a safetensors code, None if torch has none (sub-byte floats)."""
    return _tables()[0].get(code)


def code_of(dtype: torch.dtype) -> str | None:
    return _tables()[1].get(dtype)
