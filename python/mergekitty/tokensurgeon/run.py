"""``transplant``: a model with another model's tokenizer.

The output is MODEL with DONOR's vocabulary: its embedding (and an untied head) gets one row per
donor id, built as ``match.py`` decides (a copied model row, a row approximated by
``approximate.py``, or for padding rows the mean of the model's token rows); every other tensor
is copied from MODEL unchanged. The weights for an approximated row are fitted in the donor's
matrix of the same kind (the donor's embedding for the embedding, the donor's head, or its
embedding when the donor ties them, for the head) and applied to the model's matrix, so the two
models may differ in hidden size. A tied model stays tied: only its embedding is written.

Nothing is written before every check has passed and every row is computed; the tensors are then
streamed through the output transaction (``io.output``), with the donor's tokenizer files and a
``config.json`` whose ``vocab_size`` and bos/eos/pad ids are the donor's.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArchitectureError, InvalidArgumentError, ModelFormatError, PlanError
from ..io.checkpoint import Checkpoint
from ..io.dtypes import FLOAT_CODES
from ..tokenizer.vocab import Vocabulary
from .approximate import METHODS, WEIGHT_SCHEMES, approximate, relative_errors
from .match import TokenMatch, match_tokens

log = logging.getLogger(__name__)

DEFAULT_K = {"omp": 64, "knn": 8}
# shared tokens left out, and predicted from the others, for the reconstruction figure
HELDOUT_TOKENS = 256
GENERATION_CONFIG = "generation_config.json"
NEW_TOKENS_SHOWN = 20  # new tokens named with -v
# progress(stage, done, total)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TokenSurgeonOptions:
    method: str = "omp"  # "omp" or "knn" (approximate.py)
    k: int | None = None  # atoms (omp) or neighbours (knn); None: DEFAULT_K of the method
    cosine: bool = False  # knn: cosine distance instead of euclidean
    weight_scheme: str = "distance_proportional"  # knn: how the neighbours are weighted
    batch_size: int = 512  # new tokens approximated at a time; <= 0: as many as memory allows
    allow_crimes: bool = False  # allow a donor of another architecture
    out_shard_size: int = 5 * 10**9  # bytes; <= 0 means one shard
    transformers_cache: str | None = None

    @property
    def atoms(self) -> int:
        return self.k if self.k is not None else DEFAULT_K[self.method]

    def check(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgumentError(
                f"approximation method {self.method!r} is not available; choose one of {', '.join(METHODS)}"
            )
        if self.weight_scheme not in WEIGHT_SCHEMES:
            raise InvalidArgumentError(
                f"weight scheme {self.weight_scheme!r} is not available; choose one of {', '.join(WEIGHT_SCHEMES)}"
            )
        if self.k is not None and self.k < 1:
            raise InvalidArgumentError(f"k must be at least 1, got {self.k}")


@dataclass(frozen=True)
class MatrixReport:
    """How one vocabulary matrix of the output was built.

    ``fit_error``: mean relative error ``||x - Σ w_j d_j|| / ||x||`` of the new tokens' fits in the
    donor's matrix. ``heldout_error``: ``heldout`` shared tokens are left out and predicted from
    the others like new tokens; the mean relative error of their predicted rows against their real
    rows in the model's matrix (``mean_row_error``: the same for predicting the mean row)."""

    tensor: str
    space: str  # the donor tensor the weights were fitted in
    new_rows: int
    fit_error: float | None
    heldout: int
    heldout_error: float | None
    mean_row_error: float | None


@dataclass(frozen=True)
class TransplantResult:
    out_path: Path
    vocab_size: int
    match: TokenMatch
    matrices: tuple[MatrixReport, ...]
    tied: bool
    method: str
    k: int


@dataclass
class _Side:
    """One input (the model or the donor): its files, vocabulary matrices and tokenizer."""

    what: str  # "model" or "donor"
    label: str
    path: Path
    checkpoint: Checkpoint
    config: dict[str, Any]
    embedding: str
    head: str | None
    vocab: Vocabulary
    special: dict[str, int]

    @property
    def rows(self) -> int:
        return int(self.checkpoint.infos[self.embedding].shape[0])


def _vocab_matrices(checkpoint: Checkpoint, cfg: dict[str, Any], what: str, label: str) -> tuple[str, str | None]:
    """The input embedding and the untied head (None when tied), found by the layout inference."""
    from ..architecture import infer_layout, model_layout_override
    from ..architecture.layout import is_head_name, ties_embeddings

    layout = infer_layout(checkpoint.names(), cfg, where=label, override=model_layout_override(checkpoint.directory))
    embedding = layout.input_embedding
    if embedding is None:
        raise ArchitectureError(f"{what} {label}: none of its tensors is recognized as the token embedding")
    info = checkpoint.infos[embedding]
    heads = [
        n
        for n in (*layout.pre, *layout.post)
        if n != embedding and is_head_name(n) and len(checkpoint.infos[n].shape) == 2
    ]
    if len(heads) > 1:
        raise ArchitectureError(f"{what} {label}: several tensors could be the output head: {', '.join(heads)}")
    head = heads[0] if heads else None
    for name in (embedding, *heads):
        shape = checkpoint.infos[name].shape
        if len(shape) != 2 or checkpoint.infos[name].dtype not in FLOAT_CODES:
            raise ModelFormatError(
                f"{what} {label}: '{name}' is {checkpoint.infos[name].dtype} {list(shape)}; "
                "a vocabulary matrix must be a 2-D float tensor"
            )
    if head is not None and checkpoint.infos[head].shape[0] != info.shape[0]:
        raise ArchitectureError(
            f"{what} {label}: the head '{head}' has {checkpoint.infos[head].shape[0]} rows but the embedding "
            f"'{embedding}' has {info.shape[0]}"
        )
    if head is None and ties_embeddings(cfg) is False:
        raise ModelFormatError(
            f"{what} {label}: config.json says tie_word_embeddings: false, but none of its tensors is an output head"
        )
    return embedding, head


def _open(ref: str, what: str, options: TokenSurgeonOptions) -> _Side:
    from ..refs import ModelPath, resolve_local_path
    from ..tokenizer.vocab import read_vocabulary
    from .special import special_ids

    if "+" in ref:
        raise InvalidArgumentError(f"the {what} '{ref}' must not be a model+lora reference")
    model_path = ModelPath.model_validate(ref)
    path = Path(resolve_local_path(model_path.path, model_path.revision, options.transformers_cache))
    checkpoint = Checkpoint(path, label=ref)
    cfg = checkpoint.config()
    embedding, head = _vocab_matrices(checkpoint, cfg, what, ref)
    vocab = read_vocabulary(path)
    if vocab is None:
        raise ModelFormatError(
            f"{what} {ref} has no tokenizer files (tokenizer.json, vocab.json, vocab.txt or tokenizer.model)"
        )
    return _Side(what, ref, path, checkpoint, cfg, embedding, head, vocab, special_ids(path, vocab, cfg))


def _check_architectures(model: _Side, donor: _Side, allow_crimes: bool) -> None:
    def arch(side: _Side) -> tuple[tuple[str, ...], Any]:
        return (tuple(side.config.get("architectures") or ()), side.config.get("model_type"))

    if arch(model) == arch(donor):
        return
    a, b = arch(model), arch(donor)
    if allow_crimes:
        log.warning("transplanting the tokenizer of %s (%s) into %s (%s) because --allow-crimes is set",
                    donor.label, b, model.label, a)  # fmt: skip
        return
    raise ArchitectureError(
        f"model {model.label} is a {a[0] or a[1]} but donor {donor.label} is a {b[0] or b[1]}; "
        "pass --allow-crimes to transplant between architectures"
    )


def _rows_f32(side: _Side, name: str) -> np.ndarray:
    from ..io.raw import read_raw, to_f32

    raw = read_raw(side.checkpoint, name)
    values = to_f32(raw.rows(), raw.dtype)
    side.checkpoint.release(name)
    return values


def _heldout(
    atoms_donor: np.ndarray, atoms_model: np.ndarray, options: TokenSurgeonOptions
) -> tuple[int, float | None, float | None]:
    """Leave out up to HELDOUT_TOKENS shared tokens (spread evenly), predict their model rows from
    the other shared tokens, and return (count, mean relative error, the mean row's)."""
    n = atoms_donor.shape[0]
    count = min(HELDOUT_TOKENS, n // 10)
    if count < 1:
        return 0, None, None
    left_out = np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))
    kept = np.setdiff1d(np.arange(n), left_out)
    fit = approximate(
        atoms_donor[kept], atoms_donor[left_out], options.method, options.atoms, options.cosine,
        options.weight_scheme, options.batch_size,
    )  # fmt: skip
    truth = atoms_model[left_out]
    predicted = fit.apply(atoms_model[kept])
    mean_row = np.broadcast_to(atoms_model[kept].mean(axis=0, dtype=np.float64), truth.shape)
    return (
        len(left_out),
        float(np.nanmean(relative_errors(predicted, truth))),
        float(np.nanmean(relative_errors(mean_row, truth))),
    )


def _build_matrix(
    model: _Side,
    name: str,
    donor: _Side,
    space: str,
    match: TokenMatch,
    options: TokenSurgeonOptions,
    progress: Progress | None = None,
) -> tuple[np.ndarray, MatrixReport]:
    """The output rows (float32, donor ids) of the model's matrix ``name``, the new tokens' weights
    fitted in the donor's matrix ``space``."""
    model_rows = _rows_f32(model, name)
    donor_rows = _rows_f32(donor, space)
    out = np.empty((match.rows, model_rows.shape[1]), dtype=np.float32)
    out[match.copied] = model_rows[match.copied_from]
    atoms_donor = donor_rows[match.shared_donor]
    atoms_model = model_rows[match.shared_model]
    fit_error = None
    if match.new.size:
        if not match.shared_donor.size:
            raise PlanError(
                f"the donor {donor.label} and the model {model.label} share no ordinary token: the "
                f"{match.new.size} new tokens cannot be approximated"
            )
        targets = donor_rows[match.new]
        stage, total = f"approximating {name}", int(match.new.size)
        fit = approximate(
            atoms_donor, targets, options.method, options.atoms, options.cosine, options.weight_scheme,
            options.batch_size, None if progress is None else lambda done: progress(stage, done, total),
        )  # fmt: skip
        out[match.new] = fit.apply(atoms_model)
        fit_error = float(np.nanmean(relative_errors(fit.apply(atoms_donor), targets)))
    if match.padding.size:
        token_rows = np.fromiter(set(model.vocab.tokens.values()), dtype=np.int64)
        out[match.padding] = model_rows[token_rows].mean(axis=0, dtype=np.float64)
    heldout, heldout_error, mean_row_error = (
        _heldout(atoms_donor, atoms_model, options) if match.new.size else (0, None, None)
    )
    report = MatrixReport(name, space, int(match.new.size), fit_error, heldout, heldout_error, mean_row_error)
    return out, report


def _generation_config(model: _Side, donor: _Side, ids: dict[str, Any]) -> str | None:
    """The model's generation_config.json with the donor's token ids (its own generation config's
    where it has one), or None when the model has none."""
    from ..io.model_files import model_file, read_json

    path = model_file(model.path, GENERATION_CONFIG)
    if path is None:
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    donor_path = model_file(donor.path, GENERATION_CONFIG)
    donor_data = read_json(donor_path) if donor_path is not None else {}
    for key, value in ids.items():
        if isinstance(donor_data, dict) and key in donor_data:
            data[key] = donor_data[key]
        elif key in data:
            data[key] = value
    return json.dumps(data, indent=2) + "\n"


def transplant(
    model: str | os.PathLike[str],
    donor: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    options: TokenSurgeonOptions | None = None,
    progress: Progress | None = None,
    **kwargs: Any,
) -> TransplantResult:
    """Write ``model`` with the tokenizer of ``donor`` to ``out_path`` (module docstring).

    ``model`` and ``donor`` are local directories or hub ids (``path[@revision]``); ``options``
    a ``TokenSurgeonOptions``, with ``kwargs`` overriding its fields. ``progress(stage, done,
    total)`` is called after each batch of new tokens (stage ``approximating TENSOR``) and each
    tensor written (stage ``writing``)."""
    from ..architecture.layout import set_vocab_size
    from ..io.output import SIDECAR_FILES, OutputTransaction, check_output_path
    from ..io.tensor_stream import OutTensor, computed, copy_of, write_all
    from ..tokenizer.write import copy_tokenizer
    from .special import output_ids, set_token_ids

    options = replace(options or TokenSurgeonOptions(), **kwargs)
    options.check()
    target = _open(str(model), "model", options)
    source = _open(str(donor), "donor", options)
    _check_architectures(target, source, options.allow_crimes)
    check_output_path(out_path, [(target.path, f"model {target.path}"), (source.path, f"donor {source.path}")])
    match = match_tokens(target.vocab, source.vocab, target.special, source.special, target.rows, source.rows)
    if match.new_tokens:
        shown = ", ".join(repr(t) for t in match.new_tokens[:NEW_TOKENS_SHOWN])
        more = (
            f" and {len(match.new_tokens) - NEW_TOKENS_SHOWN} more" if len(match.new_tokens) > NEW_TOKENS_SHOWN else ""
        )
        log.info("new tokens: %s%s", shown, more)

    built: dict[str, np.ndarray] = {}
    reports = []
    pairs = [(target.embedding, source.embedding)]
    if target.head is not None:
        pairs.append((target.head, source.head or source.embedding))
    for name, space in pairs:
        built[name], report = _build_matrix(target, name, source, space, match, options, progress)
        reports.append(report)

    cfg = copy.deepcopy(target.config)
    set_vocab_size(cfg, match.rows)
    ids = output_ids(source.config, source.special)
    set_token_ids(cfg, ids)
    generation = _generation_config(target, source, ids)

    tensors = []
    for name in target.checkpoint.names():
        info = target.checkpoint.infos[name]
        if name in built:
            tensors.append(computed(name, built.pop(name), info.dtype))
        else:
            tensors.append(copy_of(name, target, name, info.dtype))
    with OutputTransaction(out_path) as out:
        writer = out.open_shards([(t.name, t.dtype, list(t.shape)) for t in tensors], options.out_shard_size)
        out.copy_files(target.path, [n for n in SIDECAR_FILES if n != GENERATION_CONFIG])
        if generation is not None:
            out.write_text(GENERATION_CONFIG, generation)
        copy_tokenizer(source.path, out.dir)
        done = [0]

        def written(t: OutTensor) -> None:
            done[0] += 1
            if progress is not None:
                progress("writing", done[0], len(tensors))

        write_all(tensors, writer, 0, written)
        out.commit(json.dumps(cfg, indent=2) + "\n")
    return TransplantResult(
        Path(out_path), match.rows, match, tuple(reports), target.head is None, options.method, options.atoms
    )
