"""The Python API: ``run_merge`` and ``plan_merge``. The CLI is a thin layer over this."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MergekittyError, OutputError
from .io.output import SIDECAR_FILES

if TYPE_CHECKING:
    from .health import HealthReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """One phase of a merge as ``run_merge``'s ``on_phase`` sees it when it ends: ``plan`` (read
    every header, check, plan), ``tokenizer`` (the tokenizer, chat template, model card and side
    files), ``merge`` (the tensors) and ``commit`` (the output put in place)."""

    name: str
    seconds: float
    read: int = 0  # bytes of input tensors read
    written: int = 0  # bytes written to the output


@dataclass(frozen=True)
class MergeOptions:
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    threads: int = 0  # 0: every core
    out_shard_size: int = 5 * 10**9  # bytes; <= 0 means one shard
    copy_tokenizer: bool = True
    write_model_card: bool = True
    allow_crimes: bool = False
    trust_remote_code: bool = False
    random_seed: int | None = None
    transformers_cache: str | None = None
    lora_merge_dtype: str | None = None  # model+lora: dtype the adapted tensors are rounded to (default: the base's)
    quiet: bool = False  # no progress bar
    layout_override: str | None = None  # a layout file (README: "Model layouts") used for every model
    allow_nonfinite: bool = False  # write (and report) merged tensors holding NaN/Inf instead of failing
    health_json: bool = False  # write the health report as mergekitty_health.json next to the model
    strict: bool = False  # config keys and parameters the merge does not read are errors, not warnings

    def resolved_device(self) -> str:
        from .extras import resolve_device

        return resolve_device(self.device)


def _load_config(config: Any):
    from .config import MERGE_CONFIG

    return MERGE_CONFIG.coerce(config)


def _open_models(config, options: MergeOptions, stages: Mapping[str, Any] | None = None):
    """Open every model the config reads; an error names the config key (and line) of the model.
    ``stages``: a recipe's earlier documents by name (recipe.stage.Stage, or the directory of one
    already written), which model references of that name read."""
    from .architecture import load_layout_override

    forced = load_layout_override(options.layout_override) if options.layout_override else None
    return open_each(config, lambda ref: _open_model(ref, config, options, forced, stages or {}))


def open_each(config, open_one: Callable[[Any], Any]) -> list[Any]:
    """``open_one(ref)`` of every model the config reads, in order; an error names the config
    key (and line) of the model it is about."""
    from .yaml_lines import error_at_key

    models = []
    for ref in config.referenced_models():
        try:
            models.append(open_one(ref))
        except MergekittyError as exc:
            key = config.model_key(ref)
            if key is None:
                raise
            raise error_at_key(exc, config, key) from None
    return models


def _open_model(ref, config, options: MergeOptions, forced, stages: Mapping[str, Any] | None = None):
    from .architecture import infer_layout, model_layout_override
    from .plan import InputModel, PlannedModel

    path, stage = _model_path(ref, options, stages or {})
    adapter = None
    if getattr(ref, "lora", None) is not None:
        adapter = _model_path(ref.lora, options, {})[0]
    # what the plan keeps of the input; the tokenizer and layer count are filled in below
    planned = PlannedModel(str(ref), path, 0, path, adapter, options.lora_merge_dtype if adapter else None, stage=stage)
    checkpoint = planned.open(options.resolved_device(), options.threads)
    if adapter is not None:
        _warn_other_base(checkpoint.adapter, ref, path, config)
    cfg = checkpoint.config()
    override = getattr(ref, "override_architecture", None)
    if override:
        cfg["architectures"] = [override]
    # the layout: --layout-override, else the model's own mergekitty_layout.json, else inferred
    stated = forced or model_layout_override(path)
    layout = infer_layout(checkpoint.names(), cfg, where=str(ref), override=stated)
    planned = replace(planned, num_layers=layout.num_layers, tokenizer_dir=_tokenizer_dir(checkpoint, path))
    return InputModel(ref, planned, checkpoint, cfg, layout)


def _read_dirs(models) -> Iterator[tuple[Path, str]]:
    """(directory, label) of every model the merge of ``models`` (InputModels) reads: theirs,
    and through recipe stages the models each stage reads (an output must be none of them)."""

    def through(planned) -> Iterator[tuple[Path, str]]:
        if planned.stage is None:
            yield planned.path, planned.label
        else:
            for inner in planned.stage.models:
                yield from through(inner)

    for m in models:
        yield from through(m.planned)


def _model_path(ref, options: MergeOptions, stages: Mapping[str, Any], tokenizer_only: bool = False):
    """(local directory, the plan of the recipe stage it is or None) of a model reference: a
    recipe stage's side-file directory, a written stage's directory, or the model's own."""
    from .refs import resolve_local_path

    stage = stages.get(ref.path)
    if isinstance(stage, Path):
        return stage, None
    if stage is not None:
        return stage.directory, stage.plan
    path = resolve_local_path(ref.path, getattr(ref, "revision", None), options.transformers_cache, tokenizer_only)
    return Path(path), None


def _warn_other_base(lora, ref, base_dir: Path, config) -> None:
    """A model+lora reference whose adapter records another base model: a warning at its config
    key (``config`` None: a model named on the command line, warned about as it is)."""
    message = lora.other_base_warning(ref.path, base_dir)
    if message and config is None:
        log.warning("%s", message)
    elif message:
        key = config.model_key(ref)
        log.warning("%s", config.error(message, key=key) if key is not None else message)


def layer_counts(models: list[str], options: MergeOptions | None = None) -> list[int]:
    """The number of layers a merge sees in each of ``models`` (references as a config writes
    them: ``path[@revision][+lora]``), from their headers and config.json; no weight is read."""
    from .architecture import load_layout_override
    from .refs import ModelReference

    options = options or MergeOptions()
    forced = load_layout_override(options.layout_override) if options.layout_override else None
    return [_open_model(ModelReference.parse(m), None, options, forced).layout.num_layers for m in models]


def plan_merge(
    config: Any,
    out_path: str | os.PathLike | None = None,
    options: MergeOptions | None = None,
    *,
    stages: Mapping[str, Any] | None = None,
    **kwargs: Any,
):
    """Read every header, check everything, and return the MergePlan without reading weights.
    ``stages``: the earlier documents of a recipe that model references may name (``_open_models``)."""
    from .config import check_method, parameter_name_problems, report_ignored
    from .config_modules import output_stacks
    from .io.output import check_output_path
    from .plan import Planner, check_architectures

    options = replace(options or MergeOptions(), **kwargs)
    config = _load_config(config)
    method = check_method(config)
    report_ignored(config, options.strict, also=parameter_name_problems(config, method))
    models = _open_models(config, options, stages)
    planner = Planner(config, method, models, options)
    stacks = output_stacks(config, models, planner.donor)
    check_architectures(models, planner.donor, options.allow_crimes)
    if out_path is not None:
        check_output_path(out_path, [(path, f"input model {label}") for path, label in _read_dirs(models)])
    template = None
    if config.chat_template:
        template = _chat_template(config, [m.path for m in models])  # a bad one fails here, before any weight is read
    vocab = _plan_vocabulary(config, models, planner, options, stages or {})
    if template is not None and vocab is not None:
        _warn_missing_template_tokens(config, template, vocab.tokens)
    seed = _random_seed(config, options)
    return planner.plan(stacks, vocab, seed, options.resolved_device(), options.out_shard_size)


def _random_seed(config, options: MergeOptions) -> int:
    """The seed of this merge: --random-seed, else the config's random_seed, else a fresh one
    (recorded in the model card and mergekitty_config.yml so the merge can be reproduced)."""
    if options.random_seed is not None:
        return options.random_seed
    if config.random_seed is not None:
        return config.random_seed
    import secrets

    return secrets.randbits(31)


def _plan_vocabulary(config, models, planner, options: MergeOptions, stages: Mapping[str, Any]):
    """The output vocabulary and each input's row map (None when there is no tokenizer to take it from)."""
    from .config import effective_tokenizer_source
    from .tokenizer.build import VocabInput, plan_vocabulary, token_settings
    from .tokenizer.vocab import read_vocabulary

    vocabs = [read_vocabulary(m.planned.tokenizer_dir) for m in models]
    index = planner.index_of

    def model_index(ref):
        return index.get(str(ref))

    source = effective_tokenizer_source(config)
    if source not in ("base", "union"):
        # a model: one of the inputs, or a model whose tokenizer alone is used
        i = model_index(source)
        source = i if i is not None else _tokenizer_only_source(config, source, options, stages)
    if all(v is None for v in vocabs) and not isinstance(source, VocabInput):
        if getattr(config, "tokenizer", None) is not None or config.tokenizer_source not in (None, "base"):
            log.warning("the tokenizer settings have no effect: no input model has tokenizer files")
        return None
    if source == "base" and vocabs[planner.donor] is None:
        return None  # no base tokenizer: nothing to align to (nor to write)
    settings = token_settings(config, model_index)
    tok = getattr(config, "tokenizer", None)
    inputs = [VocabInput(m.label, v, planner.embedding_rows(i)) for i, (m, v) in enumerate(zip(models, vocabs))]
    return plan_vocabulary(inputs, source, planner.donor, settings, tok.pad_to_multiple_of if tok is not None else None)


def _tokenizer_only_source(config, ref, options: MergeOptions, stages: Mapping[str, Any]):
    """The vocabulary of tokenizer source ``ref``, a model that is not merged: read from its
    tokenizer files (and config.json), never its weights. A missing model or tokenizer is a
    ConfigError at the tokenizer source key."""
    from .tokenizer.source import tokenizer_only_input

    key = "tokenizer.source" if getattr(config, "tokenizer", None) is not None else "tokenizer_source"
    if ref.lora is not None:
        log.warning("tokenizer source %s: the LoRA adapter is not used; the vocabulary is the model's", ref)
    try:
        path, _ = _model_path(ref.model, options, stages, tokenizer_only=True)
        return tokenizer_only_input(str(ref), path)
    except MergekittyError as exc:
        from .config import suggest

        # `unoin` is more likely a typo of a keyword than a model name
        hint = suggest(str(ref), ("union", "base")) if "/" not in str(ref) else ""
        raise config.error(f"tokenizer source {ref} (not one of the merged models): {exc}{hint}", key=key) from None


def _tokenizer_dir(checkpoint, path: Path) -> Path:
    """Where an input's tokenizer files are: a model+lora input's adapter when it ships a
    tokenizer (an adapter that added tokens does), else the model's directory."""
    adapter = getattr(checkpoint, "adapter", None)
    found = adapter.tokenizer_dir() if adapter is not None else None
    return found or path


# the special tokens chat templates write (<|im_start|>, <|eot_id|>...): a template that writes
# one the vocabulary lacks makes prompts the model never saw (the text is split into pieces)
_SPECIAL_TOKEN = re.compile(r"<\|[^|<>\s]+\|>")


def _warn_missing_template_tokens(config, template: str, tokens: dict[str, int]) -> None:
    missing = sorted({t for t in _SPECIAL_TOKEN.findall(template) if t not in tokens})
    if missing:
        log.warning(
            "%s",
            config.error(
                f"the chat template writes {', '.join(repr(t) for t in missing)}, which the output vocabulary "
                "does not have: prompts built with it are split into ordinary tokens (add the tokens with "
                "tokenizer.tokens, or take the vocabulary from a model that has them)",
                key="chat_template",
            ),
        )


def _chat_template(config, model_dirs) -> str | None:
    """The chat template text the config asks for (None: keep the donor's); ConfigError if bad."""
    from .tokenizer import resolve_chat_template

    return resolve_chat_template(
        config.chat_template, model_dirs, lambda message: config.error(message, key="chat_template")
    )


def _write_sidecars(plan, config, out, options: MergeOptions, recorded_text: str | None = None) -> None:
    """The donor's side files, the tokenizer, the chat template and the model card, into
    the OutputTransaction ``out``; ``recorded_text``: the YAML the card and mergekitty_config.yml
    record, seeds included (default: ``recorded_config``; a recipe's target records the whole recipe)."""
    donor = plan.models[plan.donor]
    out.copy_files(donor.path, SIDECAR_FILES)
    if options.copy_tokenizer:
        from .tokenizer.write import copy_tokenizer, write_tokenizer

        if plan.vocab is not None:
            write_tokenizer(plan.vocab, plan.vocab.vocab_dir, out.dir)
        else:
            copy_tokenizer(donor.tokenizer_dir, out.dir)
    if config.chat_template:
        template = _chat_template(config, [m.path for m in plan.models])
        if template is not None and not options.copy_tokenizer:
            log.warning("chat_template is ignored: no tokenizer is written (--no-copy-tokenizer)")
        elif template is not None:
            from .tokenizer import write_chat_template

            write_chat_template(out.dir, template)
    if options.write_model_card:
        from .card import generate_card

        text = recorded_text or getattr(config, "source_text", None) or config.to_yaml()
        refs = [str(m.ref) for m in plan.models]
        base = str(config.base_model) if config.base_model is not None else None
        seed = recorded_seed(plan, config, options)
        out.write_text("README.md", generate_card(plan.method, refs, base, text, out.path.name, seed))
        out.write_text(
            "mergekitty_config.yml",
            recorded_text if recorded_text is not None else recorded_config(plan, config, options),
        )


def recorded_seed(plan, config, options: MergeOptions) -> int | None:
    """The seed the output records: the one the merge ran with when it draws random numbers or
    a seed was given, else None."""
    if plan.method.random or config.random_seed is not None or options.random_seed is not None:
        return int(plan.random_seed)
    return None


def recorded_config(plan, config, options: MergeOptions) -> str:
    """The config text as the output keeps it (mergekitty_config.yml): as written, with the seed
    the merge drew, or a note that --random-seed overrode the config's."""
    text = getattr(config, "source_text", None) or config.to_yaml()
    text = text if text.endswith("\n") else text + "\n"
    seed = recorded_seed(plan, config, options)
    if seed is not None and config.random_seed is None:
        text += f"# the seed this merge drew; keep it to reproduce the merge exactly\nrandom_seed: {seed}\n"
    elif seed is not None and config.random_seed != seed:
        text += f"# this merge ran with --random-seed {seed}, which overrides random_seed above\n"
    return text


def run_merge(
    config: Any,
    out_path: str | os.PathLike,
    options: MergeOptions | None = None,
    progress: Callable[[Any, float], None] | None = None,
    on_health: Callable[[HealthReport], None] | None = None,
    on_plan: Callable[[Any], None] | None = None,
    on_phase: Callable[[Phase], None] | None = None,
    **kwargs: Any,
):
    """Merge as ``config`` says and write the model to ``out_path``. Returns the executed MergePlan.

    ``progress(job, seconds)`` is called after each tensor job. ``on_plan`` is called with the
    MergePlan before any weight is read; ``on_phase`` with a ``Phase`` as each phase ends (plan,
    tokenizer, merge, commit); ``on_health`` with the merge's ``HealthReport`` (health.py) once
    the model is written. A merged tensor holding NaN/Inf raises ``NonFiniteError`` (nothing is
    written) unless ``allow_nonfinite``."""
    options = replace(options or MergeOptions(), **kwargs)
    started = time.perf_counter()
    config = _load_config(config)
    plan = plan_merge(config, out_path, options)
    planned(plan, started, on_plan, on_phase)
    write_model(plan, config, out_path, options, progress, on_health, on_phase)
    return plan


def write_model(
    plan,
    config,
    out_path: str | os.PathLike,
    options: MergeOptions,
    progress: Callable[[Any, float], None] | None = None,
    on_health: Callable[[HealthReport], None] | None = None,
    on_phase: Callable[[Phase], None] | None = None,
    recorded_text: str | None = None,
) -> None:
    """The model ``plan`` (made from ``config``) makes, written to ``out_path`` with its
    config.json, tokenizer and model card (``_write_sidecars``; ``recorded_text`` as there)."""
    write_merged_model(
        plan,
        out_path,
        options,
        side_files=lambda out: _write_sidecars(plan, config, out, options, recorded_text),
        marker_text=json.dumps(plan.out_config, indent=2) + "\n",
        progress=progress,
        on_health=on_health,
        on_phase=on_phase,
    )


def planned(
    plan, started: float, on_plan: Callable[[Any], None] | None, on_phase: Callable[[Phase], None] | None
) -> None:
    """A plan is made (planning began at ``time.perf_counter()`` ``started``): stop now if it needs
    torch and torch is missing, then report the plan phase and the plan."""
    from .extras import require_torch_for_plan

    require_torch_for_plan(plan)
    if on_phase is not None:
        on_phase(Phase("plan", time.perf_counter() - started))
    if on_plan is not None:
        on_plan(plan)


def write_merged_model(
    plan,
    out_path: str | os.PathLike,
    options: MergeOptions,
    side_files: Callable[[Any], None],
    marker_text: str,
    marker: str = "config.json",
    progress: Callable[[Any, float], None] | None = None,
    on_health: Callable[[HealthReport], None] | None = None,
    on_phase: Callable[[Phase], None] | None = None,
) -> None:
    """Execute ``plan`` and write the model to ``out_path`` in one OutputTransaction:
    ``side_files(out)`` writes the files beside the weights, and ``marker`` (holding
    ``marker_text``) is written last. Every merge writes its output here (``run_merge``, the
    targets and intermediates of a recipe, the raw merges of raw_merge.py); the callbacks are
    ``run_merge``'s, and the caller has checked the plan (``require_torch_for_plan``)."""
    from .execute import execute
    from .health import HEALTH_FILE, HealthReport
    from .io.output import OutputTransaction

    def phase(name: str, started: float, read: int = 0, written: int = 0) -> None:
        if on_phase is not None:
            on_phase(Phase(name, time.perf_counter() - started, read, written))

    device = options.resolved_device()
    if device != "cpu":
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise OutputError(f"--device {device} was asked for, but torch sees no CUDA device")

    health = HealthReport.for_plan(plan, options.allow_nonfinite)
    with OutputTransaction(out_path, marker=marker, resume_key=_resume_key(plan)) as out:
        writer = out.open_shards(plan.output_layout(), plan.shard_size_bytes)
        started, before = time.perf_counter(), _files_bytes(out.dir)
        side_files(out)
        phase("tokenizer", started, written=_files_bytes(out.dir) - before)
        # a rerun of an interrupted merge computes only the tensors of the shards it lacks
        todo = replace(plan, jobs=tuple(j for j in plan.jobs if not writer.is_written(j.out_name)))
        if out.reused:
            log.warning(
                "resuming: %d complete shard(s) of an interrupted run of this merge are reused; %d of %d tensors left",
                len(out.reused),
                len(todo.jobs),
                len(plan.jobs),
            )
        started = time.perf_counter()
        if progress is None and not options.quiet:
            from .progress import run_with_progress

            run_with_progress(todo, lambda cb: execute(todo, writer, options.threads, cb, health))
        else:
            execute(todo, writer, options.threads, progress, health)
        phase("merge", started, read=todo.input_bytes, written=todo.output_bytes)
        started = time.perf_counter()
        if options.health_json:
            out.write_text(HEALTH_FILE, health.to_json())
        out.commit(marker_text)
    phase("commit", started)
    if on_health is not None:
        on_health(health)


def _files_bytes(directory: Path) -> int:
    """The size of the files directly in ``directory`` (what the side files added to the output)."""
    total = 0
    for f in directory.iterdir():
        with contextlib.suppress(OSError):
            if f.is_file():
                total += f.stat().st_size
    return total


def _resume_key(plan) -> str | None:
    """What a staged shard of an interrupted run must have been made from to be reused:
    ``plan_digest``. None for a one-shard output, which has nothing a rerun could reuse (and so
    saves hashing the plan)."""
    if len({job.shard for job in plan.jobs}) < 2:
        return None
    return plan_digest(plan)


def plan_digest(plan, *extra: str) -> str:
    """A digest of what ``plan``'s output is made from: this version, the plan (method,
    parameters, layout; the seed only for a method that draws random numbers, since a seed is
    drawn for every merge), its input files as they are now (``inputs_digest``), and ``extra``."""
    import hashlib

    from . import __version__

    h = hashlib.sha256(f"mergekitty {__version__}\n".encode())
    h.update(_seeded_only_if_random(plan).to_json().encode())
    h.update(inputs_digest(plan).encode())
    for text in extra:
        h.update(b"\0" + text.encode())
    return h.hexdigest()


def _seeded_only_if_random(plan):
    """``plan`` with the seed of each plan (its own and its stages') set to 0 where the method
    draws no random numbers: that seed was drawn, and changes nothing in the output."""
    models = tuple(replace(m, stage=_seeded_only_if_random(m.stage)) if m.stage is not None else m for m in plan.models)
    return replace(plan, models=models, random_seed=plan.random_seed if plan.method.random else 0)


def inputs_digest(plan) -> str:
    """A digest of the input files of ``plan`` as they are now (names, sizes, modification
    times), through recipe stages to the models they read."""
    import hashlib

    h = hashlib.sha256()
    for f in _input_files(plan):
        with contextlib.suppress(OSError):
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _input_files(plan) -> Iterator[Path]:
    """The files of every input directory of ``plan`` (through recipe stages); of a state-dict
    file input, only that file (its directory may hold anything else)."""
    for model in plan.models:
        if model.stage is not None:
            yield from _input_files(model.stage)
        elif model.files:
            yield from (Path(model.path) / f for f in model.files)
        else:
            yield from sorted(Path(model.path).iterdir())
        if model.adapter is not None:
            yield from sorted(Path(model.adapter).iterdir())
    vocab_dir = getattr(plan.vocab, "vocab_dir", None)
    if vocab_dir is not None:  # a tokenizer source that is not merged: its files are the output's
        yield from sorted(Path(vocab_dir).iterdir())


def option_names() -> list[str]:
    return [f.name for f in fields(MergeOptions)]


__all__ = ["MergeOptions", "MergekittyError", "Phase", "layer_counts", "plan_merge", "run_merge"]
