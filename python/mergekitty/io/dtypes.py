"""The table between safetensors dtype codes, torch dtypes and config names."""

from __future__ import annotations

import torch

CODE_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "C64": torch.complex64,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        CODE_TO_TORCH[_code] = getattr(torch, _attr)

TORCH_TO_CODE: dict[torch.dtype, str] = {v: k for k, v in CODE_TO_TORCH.items()}

NAME_TO_TORCH: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}

# dtypes the native kernels read and write directly
NATIVE_FLOAT_CODES = frozenset({"F32", "F16", "BF16"})


def code_of(dtype: torch.dtype) -> str:
    return TORCH_TO_CODE[dtype]


def torch_dtype(code: str) -> torch.dtype:
    return CODE_TO_TORCH[code]


def config_name(dtype: torch.dtype) -> str:
    """The name transformers writes in config.json for ``dtype`` ("bfloat16")."""
    return str(dtype).removeprefix("torch.")
