"""Understanding a model's tensor layout: which tensors are per-layer, and how layers are numbered."""

from .layout import ModelLayout, flat_layout, infer_layout, layer_count_key
from .override import OVERRIDE_FILE, LayoutOverride, load_layout_override, model_layout_override

__all__ = [
    "OVERRIDE_FILE",
    "LayoutOverride",
    "ModelLayout",
    "flat_layout",
    "infer_layout",
    "layer_count_key",
    "load_layout_override",
    "model_layout_override",
]
