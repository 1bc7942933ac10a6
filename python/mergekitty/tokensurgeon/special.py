"""Special tokens by role (bos, eos, pad, unk), and the token ids a config states.

A tokenizer names its special tokens in ``tokenizer_config.json`` and ``special_tokens_map.json``
(``"bos_token": "<s>"`` or ``{"content": "<s>", ...}``); a model's ``config.json`` (and
``generation_config.json``) states the ids generation uses (``bos_token_id``...). A transplant
maps the donor's special tokens to the model's by role, not by text, and writes the donor's ids
into the output's configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..architecture.layout import TEXT_CONFIG_KEYS
from ..io.model_files import model_file, read_json
from ..tokenizer.vocab import Vocabulary

ROLES = ("bos", "eos", "pad", "unk")
# the roles whose ids config.json and generation_config.json state
ID_ROLES = ("bos", "eos", "pad")
SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def config_value(cfg: dict[str, Any], key: str) -> Any:
    """``cfg[key]`` at the top level, else in a nested language-model config; None when absent."""
    for node in (cfg, *(cfg.get(k) for k in TEXT_CONFIG_KEYS)):
        if isinstance(node, dict) and key in node:
            return node[key]
    return None


def _config_id(cfg: dict[str, Any], role: str, vocab: Vocabulary) -> int | None:
    value = config_value(cfg, f"{role}_token_id")
    if isinstance(value, list) and value:  # several eos ids: the first is the tokenizer's own
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool) and value in vocab.by_id():
        return value
    return None


def special_ids(directory: Path, vocab: Vocabulary, cfg: dict[str, Any]) -> dict[str, int]:
    """Role -> token id of the tokenizer in ``directory``: the token its tokenizer files name for
    the role, else the id its ``config.json`` states (when a token has that id)."""
    found: dict[str, int] = {}
    for name in SPECIAL_FILES:
        path = model_file(directory, name)
        data = read_json(path) if path is not None else None
        if not isinstance(data, dict):
            continue
        for role in ROLES:
            token = _content(data.get(f"{role}_token"))
            if role not in found and token is not None and token in vocab.tokens:
                found[role] = vocab.tokens[token]
    for role in ROLES:
        if role not in found and (token_id := _config_id(cfg, role, vocab)) is not None:
            found[role] = token_id
    return found


def output_ids(donor_cfg: dict[str, Any], donor_special: dict[str, int]) -> dict[str, Any]:
    """``{role}_token_id`` -> value for the output's config.json: what the donor's config states
    (an eos list stays a list), else the donor tokenizer's token for the role, else None."""
    out: dict[str, Any] = {}
    for role in ID_ROLES:
        key = f"{role}_token_id"
        value = config_value(donor_cfg, key)
        out[key] = value if value is not None else donor_special.get(role)
    return out


def set_token_ids(cfg: dict[str, Any], ids: dict[str, Any]) -> None:
    """Write ``ids`` wherever ``cfg`` keeps each key (top level, nested language-model configs);
    a key it keeps nowhere is added at the top level unless its value is None."""
    for key, value in ids.items():
        found = False
        for node in (cfg, *(cfg.get(k) for k in TEXT_CONFIG_KEYS)):
            if isinstance(node, dict) and key in node:
                node[key] = value
                found = True
        if not found and value is not None:
            cfg[key] = value
