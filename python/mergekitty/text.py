"""How values are written in messages: a shape as ``4096x11008``, a dtype by its name
(``bfloat16``), a list as ``a, b, c``; never as a Python repr (``(4096, 11008)``,
``torch.bfloat16``, ``['a', 'b']``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# safetensors codes with a familiar name; others (F8_E4M3...) are written as the file has them
_CODE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


def shape_text(shape: Iterable[int]) -> str:
    """``4096x11008``; ``scalar`` for a tensor of no dimensions."""
    dims = [str(int(d)) for d in shape]
    return "x".join(dims) if dims else "scalar"


def dtype_text(dtype: Any) -> str:
    """``bfloat16`` for ``torch.bfloat16``, ``BF16`` or ``numpy.dtype('bfloat16')``."""
    text = str(dtype)
    if text.startswith("torch."):
        return text[len("torch.") :]
    return _CODE_NAMES.get(text, text)


def listing(values: Iterable[Any], quote: bool = False) -> str:
    """``a, b, c`` (``'a', 'b', 'c'`` with ``quote``, for names that may hold spaces)."""
    return ", ".join(f"'{v}'" if quote else str(v) for v in values)
