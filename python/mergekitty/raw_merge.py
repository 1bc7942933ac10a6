"""Merges of plain state dicts (``mergekitty pytorch``): safetensors or torch pickle files with
no config.json, merged tensor by tensor by name.

A raw merge is planned and run as any merge (plan.Planner, execute, the output transaction). What
is its own is here: the config keys it reads (``merge_method``, ``models``, ``parameters``,
``dtype``, ``out_dtype``, ``base_model``, ``random_seed``), how a model is opened (each ``model:``
is a state-dict file, or a directory of shards without config.json), its layout (every tensor a
weight of its own: ``architecture.layout.flat_layout``) and the output, which holds the
safetensors shards (and their index) and the config as ``mergekitty_config.yml``, written last.

Tensors have no layer position, so a gradient takes its first value (t = 0, as mergekit's raw
merge evaluates it); filters still apply, matched against the tensor names.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .api import MergeOptions, _load_config, _random_seed, open_each, planned, recorded_config, write_merged_model
from .errors import ConfigError, ModelFormatError, ModelNotFoundError

if TYPE_CHECKING:
    from .api import Phase
    from .config import MergeConfiguration
    from .health import HealthReport
    from .plan import InputModel, MergePlan

log = logging.getLogger(__name__)

__all__ = ["RAW_MARKER", "plan_raw_merge", "run_raw_merge"]

# the file a raw merge's output is committed with (there is no config.json to write last)
RAW_MARKER = "mergekitty_config.yml"
# the suffixes of state-dict files: safetensors, else a torch pickle (read weights only)
SAFETENSORS_SUFFIX = ".safetensors"
# config keys about tokenizers, which a raw merge has none of
_TOKENIZER_KEYS = ("tokenizer_source", "tokenizer", "chat_template")


def _refused_keys(config: MergeConfiguration) -> None:
    """ConfigError at a key a raw merge cannot honour: layer slices and modules."""
    for key in ("slices", "modules"):
        if getattr(config, key) is not None:
            raise config.error(
                f"'{key}' is not part of a raw merge: state dicts have no layers to slice; list the files under 'models'",
                key=key,
            )


def _ignored_keys(config: MergeConfiguration) -> list[ConfigError]:
    """A ConfigError (not raised) for each tokenizer key given: a raw merge writes no tokenizer."""
    from .config import _IGNORED_AS

    return [
        config.error(f"'{key}' is not a raw merge key (it writes no tokenizer); it {_IGNORED_AS}", key=key)
        for key in _TOKENIZER_KEYS
        if getattr(config, key) is not None
    ]


def _gradients(config: MergeConfiguration) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(key path, setting) of every gradient (a list of numbers) among the config's parameters."""
    from .config import ConditionalParameter, parameter_blocks

    def is_gradient(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)

    for path, params in parameter_blocks(config):
        for name, setting in params.items():
            if is_gradient(setting):
                yield (*path, name), setting
            conditionals = setting if isinstance(setting, list) else [setting]
            for i, cond in enumerate(conditionals):
                if isinstance(cond, ConditionalParameter) and is_gradient(cond.value):
                    at = (*path, name, i) if isinstance(setting, list) else (*path, name)
                    yield (*at, "value"), cond.value


def _warn_gradients(config: MergeConfiguration) -> None:
    for key, values in _gradients(config):
        log.warning(
            "%s",
            config.error(
                f"a gradient in a raw merge takes its first value, {values[0]}: state-dict tensors have no "
                "layer position to run across (t = 0, as mergekit's raw merge evaluates it)",
                key=key,
            ),
        )


def _state_dict_path(ref: Any) -> Path:
    """The file or directory a raw merge's ``model:`` names. The whole string is the path: a
    file name may hold '@' or '+', which name a revision or a LoRA adapter elsewhere."""
    return Path(str(ref)).expanduser()


def _open_raw_model(ref: Any) -> InputModel:
    """One input of a raw merge: a state-dict file (safetensors, else a torch pickle), or a
    directory of safetensors shards (model.safetensors, an index, or loose *.safetensors files)."""
    from .architecture import flat_layout
    from .plan import InputModel, PlannedModel

    path = _state_dict_path(ref)
    label = str(ref)
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError as exc:
        raise ModelNotFoundError(f"state-dict path {path} cannot be used: {exc.strerror or exc}") from None
    if is_file:
        # the file the config names, wherever a symlink to it leads: read from its real directory
        real = path.resolve()
        planned = PlannedModel(label, real.parent, 0, real.parent, files=(real.name,))
    elif is_dir:
        if (path / "config.json").is_file():
            log.warning("%s: config.json is not read in a raw merge; its tensors are merged by name", label)
        planned = PlannedModel(label, path, 0, path)
    else:
        raise ModelNotFoundError(f"state-dict file not found: {path}")
    checkpoint = planned.open()
    if not checkpoint.names():
        raise ModelFormatError(f"{path}: holds no tensors; is it a state dict?")
    return InputModel(ref, planned, checkpoint, {}, flat_layout(checkpoint.names()))


def _open_raw_models(config: MergeConfiguration) -> list[InputModel]:
    """Every input, in the order plan_merge opens them; an error names the config key (and line)."""
    return open_each(config, _open_raw_model)


def _output_inputs(models: list[InputModel]) -> list[tuple[Path, str]]:
    """What the output must not be, nor be inside: each input directory, or each input file."""
    return [(m.path / m.planned.files[0] if m.planned.files else m.path, f"input {m.label}") for m in models]


def plan_raw_merge(
    config: Any,
    out_path: str | os.PathLike[str] | None = None,
    options: MergeOptions | None = None,
    missing: str = "error",
    **kwargs: Any,
) -> MergePlan:
    """Read every state dict's header, check everything and return the MergePlan of a raw merge
    without reading weights. ``missing`` says what a tensor that some models lack does:
    "error" (the default: a PlanError naming the tensor and those models), "intersection" (it is
    left out) or "union" (it is merged from the models that have it)."""
    from .config import check_method, parameter_name_problems, report_ignored
    from .config_modules import output_stacks
    from .io.output import check_output_path
    from .plan import Planner

    options = replace(options or MergeOptions(), **kwargs)
    config = _load_config(config)
    _refused_keys(config)
    method = check_method(config)
    report_ignored(config, options.strict, also=[*parameter_name_problems(config, method), *_ignored_keys(config)])
    _warn_gradients(config)
    models = _open_raw_models(config)
    planner = Planner(config, method, models, options, raw=missing)
    stacks = output_stacks(config, models, planner.donor)
    if out_path is not None:
        check_output_path(out_path, _output_inputs(models))
    seed = _random_seed(config, options)
    return planner.plan(stacks, None, seed, options.resolved_device(), options.out_shard_size)


def run_raw_merge(
    config: Any,
    out_path: str | os.PathLike[str],
    options: MergeOptions | None = None,
    missing: str = "error",
    progress: Callable[[Any, float], None] | None = None,
    on_health: Callable[[HealthReport], None] | None = None,
    on_plan: Callable[[Any], None] | None = None,
    on_phase: Callable[[Phase], None] | None = None,
    **kwargs: Any,
) -> MergePlan:
    """Merge the state dicts ``config`` lists and write the result to ``out_path``: safetensors
    shards (with an index when there are several) and the config as mergekitty_config.yml.
    ``missing`` as for ``plan_raw_merge``; the callbacks as for ``api.run_merge``. Returns the
    executed MergePlan."""
    options = replace(options or MergeOptions(), **kwargs)
    started = time.perf_counter()
    config = _load_config(config)
    plan = plan_raw_merge(config, out_path, options, missing)
    planned(plan, started, on_plan, on_phase)
    write_merged_model(
        plan,
        out_path,
        options,
        side_files=lambda out: None,  # no tokenizer, config.json or model card: plain weights
        marker_text=recorded_config(plan, config, options),
        marker=RAW_MARKER,
        progress=progress,
        on_health=on_health,
        on_phase=on_phase,
    )
    return plan
