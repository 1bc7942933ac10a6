"""Tokenizer-side settings of a merge (the chat template)."""

from .chat_templates import (
    BUILTIN_TEMPLATES,
    builtin_template,
    model_chat_template,
    resolve_chat_template,
    write_chat_template,
)

__all__ = [
    "BUILTIN_TEMPLATES",
    "builtin_template",
    "model_chat_template",
    "resolve_chat_template",
    "write_chat_template",
]
