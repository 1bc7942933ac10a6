"""Understanding a model's tensor layout: which tensors are per-layer, and how layers are numbered."""

from .layout import ModelLayout, infer_layout, layer_count_key

__all__ = ["ModelLayout", "infer_layout", "layer_count_key"]
