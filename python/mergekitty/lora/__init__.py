"""LoRA adapters: extracting one from a fine-tune (``extract_lora``), merging one into a
base model (``merge_lora``), and applying one on the fly to a ``model+lora`` merge input
(``LoraCheckpoint``). Heavy imports (torch) happen inside the functions."""

from __future__ import annotations

from typing import Any

__all__ = ["Adapter", "LoraCheckpoint", "extract_lora", "merge_lora"]


def __getattr__(name: str) -> Any:
    if name == "Adapter":
        from .adapter import Adapter

        return Adapter
    if name == "LoraCheckpoint":
        from .apply import LoraCheckpoint

        return LoraCheckpoint
    if name == "extract_lora":
        from .extract import extract_lora

        return extract_lora
    if name == "merge_lora":
        from .merge import merge_lora

        return merge_lora
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
