"""A model named as the tokenizer source that is not one of the merged models.

Only its tokenizer is wanted: its vocabulary is read from its tokenizer files like any input's
(``vocab.read_vocabulary``, confined to its directory), and its row count from the ``vocab_size``
of its ``config.json`` when it has one (so its padding rows are kept, as for a merged source).
Its weights are never opened: it lends no embedding rows, so every output row is built from the
merged models (``build.plan_vocabulary``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFormatError
from ..io.model_files import model_file, read_json
from .build import VocabInput
from .vocab import read_vocabulary


def tokenizer_only_input(label: str, directory: Path) -> VocabInput:
    """The vocabulary input of the model in ``directory``; ModelFormatError when it has no tokenizer
    files or a malformed one."""
    from ..architecture.config_json import check_model_config
    from ..architecture.layout import vocab_size_of

    vocab = read_vocabulary(directory)
    if vocab is None:
        raise ModelFormatError(
            f"{directory} has no tokenizer files (tokenizer.json, vocab.json, vocab.txt or tokenizer.model)"
        )
    rows = None
    path = model_file(directory, "config.json")
    if path is not None:
        cfg = read_json(path)
        check_model_config(cfg, path)
        rows = vocab_size_of(cfg)
    return VocabInput(label, vocab, rows)


__all__ = ["tokenizer_only_input"]
