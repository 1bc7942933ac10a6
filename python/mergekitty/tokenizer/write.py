"""Writing the merged model's tokenizer files.

The output keeps the formats of the model its vocabulary comes from. When the vocabulary is
unchanged the files are copied. When tokens are appended (a union, or ``tokenizer.tokens`` keys
the vocabulary lacks), the files are edited, not regenerated:
- ``tokenizer.json``: added tokens are appended to ``added_tokens`` with their flags;
  model-vocabulary tokens go into the model's vocabulary (BPE, WordPiece, WordLevel), where they
  decode but never change how text is split (no merges reach them), so text made of the base's
  tokens encodes exactly as before; a Unigram model gets them as added tokens;
- ``tokenizer_config.json`` (``added_tokens_decoder``) and ``added_tokens.json``: the added tokens;
- ``vocab.json``/``vocab.txt``: model-vocabulary tokens (``vocab.txt`` only when ids are its lines);
- ``tokenizer.model`` (SentencePiece) is copied while only added tokens are appended (transformers
  layers those over it); a SentencePiece model cannot take new pieces here, so with
  model-vocabulary tokens appended it is left out (with a warning) and ``tokenizer.json`` serves.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .vocab import SENTENCEPIECE, TOKENIZER_JSON, AddedToken

if TYPE_CHECKING:
    from .build import VocabPlan

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _read(path: Path) -> Any:
    """A tokenizer file copied into the output (its input was checked when the vocabulary was read)."""
    from ..io.model_files import read_json

    return read_json(path)


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def copy_tokenizer(src: Path, out: Path) -> None:
    from ..io.model_files import model_file

    for name in TOKENIZER_FILES:
        path = model_file(src, name)
        if path is not None:
            shutil.copyfile(path, out / name)


def write_tokenizer(plan: VocabPlan, src: Path, out: Path) -> None:
    """Write the tokenizer of ``plan`` into ``out``, starting from the files in ``src``
    (the vocabulary model's directory)."""
    copy_tokenizer(src, out)
    if not plan.rewrites_tokenizer:
        return
    new_model = [(t, i) for t, i, added in plan.new_tokens if added is None]
    new_added = [(t, i, added) for t, i, added in plan.new_tokens if added is not None]

    if (out / TOKENIZER_JSON).is_file():
        data = _read(out / TOKENIZER_JSON)
        vocab = data["model"]["vocab"]
        as_added = list(new_added)
        if isinstance(vocab, dict):
            for token, i in new_model:
                vocab[token] = i
        else:  # Unigram: ids are list positions; the appended tokens become added tokens
            as_added = sorted(
                as_added + [(t, i, AddedToken(t, special=False, normalized=True)) for t, i in new_model],
                key=lambda x: x[1],
            )
            new_added = as_added
        data.setdefault("added_tokens", [])
        data["added_tokens"].extend(added.to_json(i) for _, i, added in as_added)
        _write(out / TOKENIZER_JSON, data)

    config = out / "tokenizer_config.json"
    if new_added and not (out / TOKENIZER_JSON).is_file() and not (out / "added_tokens.json").is_file():
        # only the slow files: tokenizer_config.json is where the added tokens can live
        data = _read(config) if config.is_file() else {}
        if not isinstance(data.get("added_tokens_decoder"), dict):
            data["added_tokens_decoder"] = {}
        _write(config, data)
    if config.is_file() and new_added:
        data = _read(config)
        decoder = data.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for _token, i, added in new_added:
                entry = added.to_json(i)
                del entry["id"]
                decoder[str(i)] = entry
            _write(config, data)

    extra = out / "added_tokens.json"
    if extra.is_file() and new_added:
        data = _read(extra)
        data.update({t: i for t, i, _ in new_added})
        _write(extra, data)

    if new_model and (out / "vocab.json").is_file():
        data = _read(out / "vocab.json")
        data.update(dict(new_model))
        _write(out / "vocab.json", data)

    if new_model and (out / "vocab.txt").is_file():
        lines = (out / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if [i for _, i in new_model] == list(range(len(lines), len(lines) + len(new_model))):
            (out / "vocab.txt").write_text("\n".join(lines + [t for t, _ in new_model]) + "\n", encoding="utf-8")
        else:
            log.warning("vocab.txt is left as the base's: the appended tokens' ids are not its next lines")

    if new_model and (out / SENTENCEPIECE).is_file():
        (out / SENTENCEPIECE).unlink()
        if (out / TOKENIZER_JSON).is_file():
            log.warning(
                "tokenizer.model is not written: a SentencePiece model cannot take the %d appended tokens (tokenizer.json has them)",
                len(new_model),
            )
        else:
            log.warning(
                "no tokenizer is complete: the SentencePiece model cannot take the %d appended tokens and there is no tokenizer.json",
                len(new_model),
            )
