"""The output vocabulary of a merge and, per input model, how its embedding rows map onto it.

Nothing here reads weights: the result (``VocabPlan``) is part of the merge plan, and the
executor applies it to each vocabulary-sized tensor (``embeddings.align_rows``) through index
maps, never a dense permutation matrix.

Output vocabulary (``tokenizer.source`` / ``tokenizer_source``):
- ``base``: the base model's tokenizer (the first model's when there is no base);
- a model: that model's tokenizer, whether it is merged or only named as the source (then its
  tokenizer files are read, and its ``config.json`` for its row count, never its weights);
- ``union``: the base tokenizer, then the tokens the other models have and it lacks, appended
  in model order (model-vocabulary tokens first, then added tokens); base ids never change.
Every key of ``tokenizer.tokens`` missing from it is appended too (as an added token).

Embedding rows: ``rows`` = one past the largest output token id, or the vocabulary model's own
row count when that is larger (its padding rows are kept), or the token count rounded up to
``pad_to_multiple_of`` when that is set. Row ``r`` of model ``m``'s aligned matrix is:
- the model's own row for the token, unless the token's setting has ``force: true``;
- otherwise the token's default: its ``tokenizer.tokens`` source (a model's row of the same
  token, ``model_token``: a model's row by id or token text, or ``zero``), else the only model
  that has the token, else the base model's row, else the mean over the models that have it,
  else zeros (with a warning);
- for rows without a token (padding): the model's own row there if it has one that holds no
  token either, else the mean of the model's aligned token rows (as mergekit does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PlanError
from .vocab import AddedToken, Vocabulary

log = logging.getLogger(__name__)

MISSING = -1  # the row comes from the shared defaults
OWN_MEAN = -2  # the mean of the model's own token rows

EXAMPLES = 5


@dataclass(frozen=True)
class VocabInput:
    """One input model as the vocabulary plan sees it."""

    label: str
    vocab: Vocabulary | None  # None: no tokenizer files (it is assumed to share the base's)
    rows: int | None  # embedding rows; None when no token embedding was recognized (or none is read)


@dataclass(frozen=True)
class TokenSetting:
    """A ``tokenizer.tokens`` entry with its model references resolved to input indices."""

    kind: str  # "model" (same token), "model_token", "zero" or "default"
    model: int | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False
    key: str = ""  # the config key, for errors


@dataclass
class VocabDiff:
    """How one input's vocabulary relates to the output's."""

    label: str
    added: list[str] = field(default_factory=list)  # in the output, not in this model
    missing: list[str] = field(default_factory=list)  # in this model, not in the output
    conflicting: list[tuple[str, int, int]] = field(default_factory=list)  # (token, model id, output id)
    beyond: list[tuple[str, int]] = field(default_factory=list)  # token ids >= the model's embedding rows

    def empty(self) -> bool:
        return not (self.added or self.missing or self.conflicting or self.beyond)

    def summary(self) -> str:
        def show(items: list[Any], fmt: Callable[[Any], str]) -> str:
            head = ", ".join(fmt(x) for x in items[:EXAMPLES])
            return head + (", ..." if len(items) > EXAMPLES else "")

        parts = []
        if self.added:
            parts.append(f"{len(self.added)} added ({show(self.added, repr)})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing from the output ({show(self.missing, repr)})")
        if self.conflicting:
            parts.append(
                f"{len(self.conflicting)} at other ids ({show(self.conflicting, lambda c: f'{c[0]!r} {c[1]}->{c[2]}')})"
            )
        if self.beyond:
            parts.append(
                f"{len(self.beyond)} ids beyond its embedding rows ({show(self.beyond, lambda c: f'{c[0]!r}={c[1]}')})"
            )
        return "; ".join(parts) if parts else "same vocabulary"


@dataclass
class VocabPlan:
    source: str  # "base", "union" or a model label
    vocab_model: int | None  # the input whose vocabulary the output starts from; None: a model that is not merged
    vocab_dir: Path  # the tokenizer files the output starts from
    tokens: dict[str, int]  # output token -> id
    new_tokens: list[
        tuple[str, int, AddedToken | None]
    ]  # appended to the vocab model's (None: a model-vocabulary token)
    rows: int  # embedding rows written
    row_maps: list[
        np.ndarray | None
    ]  # per input: own row, MISSING or OWN_MEAN per output row; None: rows used as they are
    default_slot: np.ndarray  # int64 [rows]: index into ``defaults`` (-1: none)
    defaults: list[tuple[tuple[int, int], ...]]  # per slot: (model, row) pairs averaged; () = zeros
    token_rows: np.ndarray  # the output rows that hold a token (OWN_MEAN is the mean of these aligned rows)
    diffs: list[VocabDiff]

    @property
    def changes_rows(self) -> bool:
        """Whether any vocabulary-sized tensor differs from its input."""
        return any(m is not None for m in self.row_maps)

    @property
    def rewrites_tokenizer(self) -> bool:
        return bool(self.new_tokens)

    def default_models(self) -> set[int]:
        return {m for recipe in self.defaults for m, _ in recipe}


def _effective(inp: VocabInput, fallback: Vocabulary | None) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """The tokens that have an embedding row (id < rows), and those beyond."""
    vocab = inp.vocab or fallback
    if vocab is None:
        return {}, []
    if inp.rows is None:
        return dict(vocab.tokens), []
    kept = {t: i for t, i in vocab.tokens.items() if i < inp.rows}
    beyond = sorted(((t, i) for t, i in vocab.tokens.items() if i >= inp.rows), key=lambda x: x[1])
    return kept, beyond


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_vocabulary(
    inputs: list[VocabInput],
    source: str | int | VocabInput,
    base: int,
    settings: dict[str, TokenSetting],
    pad_to_multiple_of: int | None,
) -> VocabPlan:
    """Build the VocabPlan. ``source`` is "base", "union", the index of the input whose
    vocabulary is taken, or a model that is not merged (only its vocabulary and row count are
    used: it contributes no embedding rows); ``base`` is the base model (or the first model) index."""
    vm: int | None
    if isinstance(source, VocabInput):
        vm, src = None, source
    else:
        vm = base if source in ("base", "union") else int(source)
        src = inputs[vm]
    fallback = src.vocab or inputs[base].vocab
    if fallback is None and source == "union":
        fallback = next((inp.vocab for inp in inputs if inp.vocab is not None), None)
    if fallback is None:
        raise PlanError(
            f"{src.label} has no tokenizer files (tokenizer.json, vocab.json, vocab.txt or tokenizer.model) to take the vocabulary from"
        )
    for inp in inputs:
        if inp.vocab is None:
            log.warning("%s has no tokenizer files; its vocabulary is taken to be %s's", inp.label, src.label)
    label = source if isinstance(source, str) else src.label

    eff, beyond = zip(*(_effective(inp, fallback) for inp in inputs))
    for token, setting in settings.items():
        if setting.kind != "default":
            _setting_rows(setting, token, inputs, eff)  # a bad setting fails even where no model needs it
    src_eff, _ = _effective(src, fallback)
    vm_vocab = src.vocab or fallback
    out: dict[str, int] = dict(src_eff)
    new_tokens: list[tuple[str, int, AddedToken | None]] = []
    next_id = vm_vocab.size

    def append(token: str, added: AddedToken | None) -> None:
        nonlocal next_id
        out[token] = next_id
        new_tokens.append((token, next_id, added))
        next_id += 1

    if source == "union":
        order = [base] + [i for i in range(len(inputs)) if i != base]
        for i in order[1:]:  # model-vocabulary tokens first
            vocab = inputs[i].vocab
            if vocab is None:
                continue
            for token, _ in sorted(eff[i].items(), key=lambda x: x[1]):
                if token not in out and token not in vm_vocab.tokens and token not in vocab.added:
                    append(token, None)
        for i in order[1:]:
            vocab = inputs[i].vocab
            if vocab is None:
                continue
            for token, _ in sorted(eff[i].items(), key=lambda x: x[1]):
                if token not in out and token not in vm_vocab.tokens and token in vocab.added:
                    append(token, vocab.added[token])
    for token in settings:
        if token not in out and token not in vm_vocab.tokens:
            append(token, AddedToken(token, special=False, normalized=True))

    rows_of = [inp.rows if inp.rows is not None else (inp.vocab or fallback).size for inp in inputs]
    vm_rows = src.rows if src.rows is not None else vm_vocab.size
    if (
        not new_tokens
        and not settings
        and not pad_to_multiple_of
        and all(e == src_eff for e in eff)
        and all(r == vm_rows for r in rows_of)
    ):
        # every input has this vocabulary and row count: nothing moves
        empty = np.full(vm_rows, -1, dtype=np.int64)
        held = np.fromiter(sorted(src_eff.values()), dtype=np.int64, count=len(src_eff))
        diffs = [VocabDiff(inp.label, beyond=list(b)) for inp, b in zip(inputs, beyond)]
        return VocabPlan(label, vm, vm_vocab.path, out, [], vm_rows, [None] * len(inputs), empty, [], held, diffs)

    used = max((i + 1 for i in out.values()), default=0)
    if pad_to_multiple_of:
        rows = _round_up(used, pad_to_multiple_of)
    else:
        rows = max(used, vm_rows)
    by_id = {i: t for t, i in out.items() if i < rows}

    # defaults of each token some model lacks (or whose setting forces one)
    defaults: list[tuple[tuple[int, int], ...]] = []
    default_slot = np.full(rows, -1, dtype=np.int64)

    def resolve_default(token: str) -> tuple[tuple[int, int], ...]:
        setting = settings.get(token)
        if setting is not None and setting.kind != "default":
            return _setting_rows(setting, token, inputs, eff)
        holders = [m for m in range(len(inputs)) if token in eff[m]]
        if not holders:
            log.warning("token %r is in no input model's vocabulary; its embedding is zeros", token)
            return ()
        if len(holders) == 1:
            return ((holders[0], eff[holders[0]][token]),)
        if base in holders:
            return ((base, eff[base][token]),)
        return tuple((m, eff[m][token]) for m in holders)

    # vectorized over the rows: one dict lookup per (model, token), no per-row Python branching
    token_rows = np.fromiter(sorted(by_id), dtype=np.int64, count=len(by_id))
    row_tokens = [by_id[int(r)] for r in token_rows]
    has_token = np.zeros(rows, dtype=bool)
    has_token[token_rows] = True
    forced = np.array([settings[t].force if t in settings else False for t in row_tokens], dtype=bool)
    row_maps: list[np.ndarray | None] = []
    missing_any = np.zeros(rows, dtype=bool)
    arange = np.arange(rows, dtype=np.int64)
    for m, _inp in enumerate(inputs):
        own_rows = rows_of[m]
        held = eff[m]
        own = np.fromiter((held.get(t, MISSING) for t in row_tokens), dtype=np.int64, count=len(row_tokens))
        own[forced] = MISSING
        taken = np.zeros(max(rows, own_rows), dtype=bool)
        taken[np.fromiter(held.values(), dtype=np.int64, count=len(held))] = True
        # rows without a token: the model's own padding row there, else its mean token row
        rmap = np.where((arange < own_rows) & ~taken[:rows], arange, OWN_MEAN)
        rmap[token_rows] = own
        missing_any[token_rows[own == MISSING]] = True
        identity = rows == own_rows and np.array_equal(rmap, arange)
        row_maps.append(None if identity else rmap)
    for r in np.flatnonzero(missing_any):
        default_slot[r] = len(defaults)
        defaults.append(resolve_default(by_id[int(r)]))

    diffs = []
    out_rows = {t: i for t, i in out.items() if i < rows}
    for m, inp in enumerate(inputs):
        held = eff[m]
        in_order = sorted(held.items(), key=lambda x: x[1])
        diffs.append(
            VocabDiff(
                inp.label,
                added=[t for t in row_tokens if t not in held],
                missing=[t for t, _ in in_order if t not in out_rows],
                conflicting=[(t, i, out_rows[t]) for t, i in in_order if t in out_rows and out_rows[t] != i],
                beyond=list(beyond[m]),
            )
        )

    return VocabPlan(
        label, vm, vm_vocab.path, out, new_tokens, rows, row_maps, default_slot, defaults, token_rows, diffs
    )


def _setting_rows(
    setting: TokenSetting, token: str, inputs: list[VocabInput], eff: Sequence[Mapping[str, int]]
) -> tuple[tuple[int, int], ...]:
    if setting.kind == "zero":
        return ()
    m = setting.model
    assert m is not None
    label = inputs[m].label
    if setting.kind == "model":
        if token not in eff[m]:
            raise PlanError(f"{setting.key}: {label} has no token {token!r} (or it has no embedding row)")
        return ((m, eff[m][token]),)
    # model_token: a row of the model's own (unpermuted) embedding, by id or by its token text
    rows = inputs[m].rows
    if setting.token_id is not None:
        row = setting.token_id
    else:
        vocab = inputs[m].vocab
        if vocab is None or setting.token not in vocab.tokens:
            raise PlanError(f"{setting.key}: {label} has no token {setting.token!r}")
        row = vocab.tokens[setting.token]
    if rows is not None and row >= rows:
        raise PlanError(f"{setting.key}: token id {row} is beyond the {rows} embedding rows of {label}")
    return ((m, row),)


def token_settings(config: Any, model_index: Callable[[Any], int | None]) -> dict[str, TokenSetting]:
    """``tokenizer.tokens`` with model references resolved; ConfigError for a model that is not merged."""
    from ..config import ModelTokenEmbedding, ZeroEmbedding

    tok = getattr(config, "tokenizer", None)
    out: dict[str, TokenSetting] = {}
    for token, entry in ((tok.tokens or {}) if tok is not None else {}).items():
        key = f"tokenizer.tokens.{token}"
        src = entry.source

        def index(ref: Any, sub: str) -> int:
            i = model_index(ref)
            if i is None:
                raise config.error(
                    f"{ref} is not one of the merged models",
                    key=("tokenizer", "tokens", token, "source", *([sub] if sub else [])),
                )
            return i

        if src is None:
            out[token] = TokenSetting("default", force=entry.force, key=key)
        elif isinstance(src, ZeroEmbedding):
            out[token] = TokenSetting("zero", force=entry.force, key=key)
        elif isinstance(src, ModelTokenEmbedding):
            out[token] = TokenSetting(
                "model_token", index(src.model, "model"), src.token, src.token_id, entry.force, key
            )
        else:
            out[token] = TokenSetting("model", index(src, ""), force=entry.force, key=key)
    return out


__all__ = [
    "MISSING",
    "OWN_MEAN",
    "TokenSetting",
    "VocabDiff",
    "VocabInput",
    "VocabPlan",
    "plan_vocabulary",
    "token_settings",
]
