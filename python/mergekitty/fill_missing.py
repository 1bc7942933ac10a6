"""``fill_missing``: put a merged text-only language model back into its vision-language model.

A vision-language model (VLM) is merged by merging its language model as a text-only model; the
result lacks the vision tower and the projector, and names its tensors as a causal LM does
(``model.layers.0...``) where the VLM has them under a prefix (``language_model.model.layers.0...``
as transformers saves Llava, ``model.language_model.layers.0...`` in the newer layout). The output
has every tensor of the VLM, with its name, shape and dtype: those the text model also has come
from the text model, the rest from the VLM. Everything else (config.json, tokenizer, processor
files) is the VLM's.

Names are matched by prefix rules ``TEXT_PREFIX -> VLM_PREFIX`` over dot-separated components:
a text name is rewritten by the rule with the longest text prefix it starts with, and kept as it
is when none applies. ``match_names`` infers the rules: every (text, VLM) pair of names that end
in the same two or more components proposes the rule that strips their longest common suffix;
a rule's support is the number of text tensors it maps onto a VLM tensor, and rules are taken in
order of support, each only for names that no rule taken before covers. A few layer tensors
that happen to share names with the vision tower therefore never outvote the language model.

A text tensor that shares its last two name components with some VLM tensor but is not mapped
onto one is an error (the models do not fit: another layer count, another prefix); one that
shares them with none is a tensor the VLM lacks (an untied head, a rotary buffer): it is left out
with a warning.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ArchitectureError, ModelFormatError
from .io.checkpoint import TORCH_SUFFIXES

if TYPE_CHECKING:
    from .io.checkpoint import Checkpoint
    from .io.output import OutputTransaction

log = logging.getLogger(__name__)

# Shortest common suffix (in name components) that proposes a rule: the module and the parameter
# ("q_proj.weight"); "weight" alone is shared by nearly every tensor.
MIN_SUFFIX = 2
# Names shown in an error that lists unmatched tensors.
SHOWN_NAMES = 4
# Weight files of any format: never copied from the VLM (its weights are written anew).
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# Files that describe how another output was made, not this one.
NOT_COPIED = ("mergekitty_config.yml", "mergekitty_health.json")
CARD = "README.md"

Components = tuple[str, ...]


@dataclass(frozen=True)
class PrefixRule:
    """Text names starting with ``text`` (dot-separated components) are VLM names starting with ``vlm``."""

    text: Components
    vlm: Components

    def __str__(self) -> str:
        return f"{_shown_prefix(self.text)} -> {_shown_prefix(self.vlm)}"


def _shown_prefix(prefix: Components) -> str:
    return ".".join(prefix) + ".*" if prefix else "*"


def parse_prefix(value: str) -> PrefixRule:
    """``--prefix`` as a rule: ``TEXT=VLM`` (``model.=model.language_model.``), or ``VLM`` alone for
    a prefix put before every text name (``language_model.``). Trailing dots are optional."""
    text, sep, vlm = value.rpartition("=")
    if not sep:
        text, vlm = "", value
    return PrefixRule(_components(text, value), _components(vlm, value))


def _components(prefix: str, given: str) -> Components:
    prefix = prefix.strip().strip(".")
    if not prefix:
        return ()
    parts = tuple(prefix.split("."))
    if any(not p or "=" in p or any(c.isspace() for c in p) for p in parts):
        raise ArchitectureError(
            f"--prefix '{given}': expected TEXT_PREFIX=VLM_PREFIX or VLM_PREFIX, dot-separated names "
            "(e.g. model.=model.language_model.)"
        )
    return parts


@dataclass(frozen=True)
class NameMatch:
    """How the text model's tensors correspond to the VLM's."""

    rules: tuple[PrefixRule, ...]  # the rules used (inferred or given), most text tensors first
    pairs: dict[str, str]  # VLM name -> text name, for every VLM tensor taken from the text model
    absent: tuple[str, ...]  # text tensors the VLM has no counterpart of (left out)


def _split(name: str) -> Components:
    return tuple(name.split("."))


def _rule_of(name: Components, rules: Iterable[PrefixRule]) -> PrefixRule | None:
    """The rule of longest text prefix that ``name`` starts with, if any."""
    best: PrefixRule | None = None
    for rule in rules:
        if name[: len(rule.text)] == rule.text and (best is None or len(rule.text) > len(best.text)):
            best = rule
    return best


def _route(name: Components, rules: Iterable[PrefixRule]) -> str:
    """``name`` rewritten by its rule (as it is where none applies)."""
    rule = _rule_of(name, rules)
    return ".".join(name if rule is None else rule.vlm + name[len(rule.text) :])


def _proposals(text_names: list[str], vlm_names: list[str]) -> dict[PrefixRule, list[str]]:
    """Each rule that some (text, VLM) pair of names ending in MIN_SUFFIX or more equal components
    proposes (the pair with its longest common suffix stripped), with the text names it maps."""
    by_suffix: dict[Components, list[Components]] = defaultdict(list)
    for name in vlm_names:
        parts = _split(name)
        by_suffix[parts[-min(MIN_SUFFIX, len(parts)) :]].append(parts)
    proposals: dict[PrefixRule, list[str]] = defaultdict(list)
    for name in text_names:
        t = _split(name)
        for v in by_suffix.get(t[-min(MIN_SUFFIX, len(t)) :], ()):
            common = 0
            while common < min(len(t), len(v)) and t[-1 - common] == v[-1 - common]:
                common += 1
            if common >= min(MIN_SUFFIX, len(t)):
                proposals[PrefixRule(t[: len(t) - common], v[: len(v) - common])].append(name)
    return proposals


def infer_rules(text_names: list[str], vlm_names: list[str]) -> tuple[PrefixRule, ...]:
    """The prefix rules that map the text names onto the VLM names (see the module docstring).
    ArchitectureError when two rules map the same text names equally well."""
    return _chosen(_proposals(text_names, vlm_names))


def _chosen(proposals: dict[PrefixRule, list[str]]) -> tuple[PrefixRule, ...]:
    support = {rule: len(names) for rule, names in proposals.items()}
    order = sorted(proposals, key=lambda r: (-support[r], len(r.text), r.text, len(r.vlm), r.vlm))
    taken: list[PrefixRule] = []

    def under_taken(prefix: Components) -> bool:
        return any(prefix[: len(r.text)] == r.text for r in taken)

    def fresh(rule: PrefixRule) -> int:
        """How many text names ``rule`` maps that no rule taken so far covers."""
        return sum(not under_taken(_split(n)) for n in proposals[rule])

    for rule in order:
        if under_taken(rule.text):
            continue  # names under a prefix some stronger rule already decided
        count = fresh(rule)
        if not count:
            continue  # maps nothing a rule taken before does not
        rivals = [
            r for r in order if r.text == rule.text and r.vlm != rule.vlm and support[r] == support[rule]
            and fresh(r) == count
        ]  # fmt: skip
        if rivals:
            alternatives = ", ".join(str(r) for r in [rule, *rivals][:SHOWN_NAMES])
            raise ArchitectureError(
                f"the text model's tensor names fit the VLM's in more than one way ({alternatives}); "
                "say which with --prefix TEXT_PREFIX=VLM_PREFIX"
            )
        taken.append(rule)
    return tuple(taken)


def match_names(
    text_names: list[str],
    vlm_names: list[str],
    rules: Iterable[PrefixRule] | None = None,
    text_label: str = "the text model",
    vlm_label: str = "the VLM",
) -> NameMatch:
    """Match every tensor name of the text model to one of the VLM, by the given prefix ``rules``
    or by rules inferred from the names. Pure: names in, a NameMatch out.

    ArchitectureError (one line, naming a few tensors) when no name matches, when a text tensor
    that looks like one of the VLM's maps onto none, or when two text tensors map onto one."""
    proposals = _proposals(text_names, vlm_names)
    given = rules is not None
    rules = tuple(rules) if rules is not None else _chosen(proposals)
    advice = "check --prefix" if given else "state the mapping with --prefix TEXT_PREFIX=VLM_PREFIX"
    vlm_set = set(vlm_names)
    near = {n for names in proposals.values() for n in names}  # names that look like the VLM's
    pairs: dict[str, str] = {}
    unmatched: list[tuple[str, str]] = []
    absent: list[str] = []
    for name in text_names:
        target = _route(_split(name), rules)
        if target not in vlm_set:
            if name in near:
                unmatched.append((name, target))
            else:
                absent.append(name)
        elif target in pairs:
            raise ArchitectureError(
                f"tensors '{pairs[target]}' and '{name}' of {text_label} both map onto '{target}' of {vlm_label}"
                f" ({_rules_text(rules)}); {advice}"
            )
        else:
            pairs[target] = name
    if not pairs:
        raise ArchitectureError(
            f"no tensor of {text_label} corresponds to a tensor of {vlm_label} with the name mapping "
            f"{_rules_text(rules)} ({text_label} has e.g. {_few(text_names)}; {vlm_label} has e.g. "
            f"{_few(vlm_names)}); {advice}"
        )
    if unmatched:
        shown = ", ".join(f"'{n}' (as '{t}')" for n, t in unmatched[:SHOWN_NAMES])
        more = f" and {len(unmatched) - SHOWN_NAMES} more" if len(unmatched) > SHOWN_NAMES else ""
        raise ArchitectureError(
            f"{len(unmatched)} tensors of {text_label} have no counterpart in {vlm_label} with the name mapping "
            f"{_rules_text(rules)}: {shown}{more}; are these the right models? ({advice})"
        )
    used = Counter(_rule_of(_split(n), rules) for n in pairs.values())
    return NameMatch(tuple(sorted(rules, key=lambda r: -used[r])), pairs, tuple(absent))


def _rules_text(rules: Iterable[PrefixRule]) -> str:
    text = ", ".join(str(r) for r in rules)
    return text or "names kept as they are"


def _few(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names[:2])


# ---------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class FillResult:
    match: NameMatch
    from_text: int  # tensors written from the text model
    from_vlm: int  # tensors written from the VLM
    out_path: Path


@dataclass(frozen=True)
class _Source:
    """An input for io.tensor_stream.write_all: a label and an io.checkpoint.Checkpoint."""

    label: str
    checkpoint: Checkpoint


def fill_missing(
    base_vlm: str | os.PathLike[str],
    merged_text: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    prefix: Iterable[str] = (),
    partial: bool = False,
    out_shard_size: int = 5_000_000_000,
    write_model_card: bool = True,
    dry_run: bool = False,
    transformers_cache: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FillResult:
    """Write ``base_vlm`` with the tensors ``merged_text`` also has taken from ``merged_text``.

    ``base_vlm`` and ``merged_text`` are local directories or hub ids (``path[@revision]``);
    ``prefix``: the name mapping as ``--prefix`` values (inferred when empty); ``partial``: allow
    language-model tensors of the VLM that the text model lacks (``_check_coverage``). With ``dry_run
    only the checks run (headers only) and nothing is written. ``progress(done, total)`` is
    called after each tensor written."""
    from .io.checkpoint import Checkpoint
    from .io.model_files import model_file, read_json, read_text
    from .io.output import OutputTransaction, check_output_path
    from .io.tensor_stream import OutTensor, write_all
    from .refs import ModelPath, resolve_local_path

    dirs = []
    for ref in (base_vlm, merged_text):
        path = ModelPath.model_validate(str(ref))
        dirs.append(resolve_local_path(path.path, path.revision, transformers_cache))
    vlm_dir, text_dir = dirs
    vlm_label, text_label = f"VLM {base_vlm}", f"text model {merged_text}"
    config_path = model_file(vlm_dir, "config.json")
    if config_path is None:
        raise ModelFormatError(f"{vlm_dir}: no config.json (the VLM's config is the output's)")
    config_text = read_text(config_path)
    read_json(config_path)  # a config that does not parse is refused before any weight is read
    vlm = Checkpoint(Path(vlm_dir), label=str(base_vlm))
    text = Checkpoint(Path(text_dir), label=str(merged_text))
    rules = [parse_prefix(p) for p in prefix] or None
    match = match_names(text.names(), vlm.names(), rules, text_label, vlm_label)
    _check_tensors(match, vlm, text, vlm_label, text_label)
    _check_coverage(match, vlm, text, vlm_label, text_label, partial)
    for name in match.absent:
        log.warning("%s has tensor '%s', which %s lacks: left out", text_label, name, vlm_label)
    check_output_path(out_path, [(Path(vlm_dir), f"VLM {vlm_dir}"), (Path(text_dir), f"text model {text_dir}")])
    result = FillResult(match, len(match.pairs), len(vlm.names()) - len(match.pairs), Path(out_path))
    log.info("name mapping: %s", _rules_text(match.rules))
    if dry_run:
        return result

    vlm_src, text_src = _Source(str(base_vlm), vlm), _Source(str(merged_text), text)
    tensors = []
    for name in _file_order(vlm):
        info = vlm.infos[name]
        source = match.pairs.get(name)
        model, src = (text_src, source) if source is not None else (vlm_src, name)
        tensors.append(OutTensor(name, info.dtype, tuple(info.shape), model, src))
    with OutputTransaction(out_path) as out:
        writer = out.open_shards([(t.name, t.dtype, list(t.shape)) for t in tensors], out_shard_size)
        _copy_non_weight_files(Path(vlm_dir), out, skip_card=write_model_card)
        if write_model_card:
            out.write_text(CARD, _card(str(base_vlm), str(merged_text), vlm, match, out.path.name))
        done = 0

        def advance(_t: OutTensor) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, len(tensors))

        write_all(tensors, writer, 0, advance)  # plain copies and casts: no random draws
        out.commit(config_text)
    return result


def _check_coverage(
    match: NameMatch, vlm: Checkpoint, text: Checkpoint, vlm_label: str, text_label: str, partial: bool
) -> None:
    """The text model must replace the whole language model: an ArchitectureError (unless
    ``partial``) naming the VLM tensors under a prefix the mapping fills (``language_model.model.``)
    that the text model has no counterpart of (a layer fewer, a missing norm), and for a layer
    count or head tying that differs between the two configs (a warning when ``partial``)."""
    from .architecture.layout import ties_embeddings

    taken = set(match.pairs)
    prefixes = [r.vlm for r in match.rules if r.vlm]
    missing = [n for n in vlm.names() if n not in taken and any(_split(n)[: len(p)] == p for p in prefixes)]
    problems = []
    if missing:
        more = f" and {len(missing) - SHOWN_NAMES} more" if len(missing) > SHOWN_NAMES else ""
        shown = ", ".join(f"'{n}'" for n in missing[:SHOWN_NAMES])
        problems.append(f"{len(missing)} language-model tensors of {vlm_label} are not in {text_label}: {shown}{more}")
    vlm_cfg, text_cfg = _config_of(vlm), _config_of(text)
    sub = vlm_cfg.get("text_config")
    text_part: dict[str, Any] = sub if isinstance(sub, dict) else vlm_cfg
    for key in ("num_hidden_layers",):
        if key in text_part and key in text_cfg and text_part[key] != text_cfg[key]:
            problems.append(f"{key} is {text_cfg[key]} in {text_label} but {text_part[key]} in {vlm_label}")
    if text_cfg and ties_embeddings(text_cfg) is not False and ties_embeddings(text_part) is False:
        log.warning(
            "%s ties its head to its embedding but %s has its own head: the output keeps %s's head",
            text_label,
            vlm_label,
            vlm_label,
        )
    if not problems:
        return
    if partial:
        for problem in problems:
            log.warning("%s; --partial keeps %s's values for them", problem, vlm_label)
        return
    raise ArchitectureError(
        "; ".join(problems) + f": the output would mix in {vlm_label}'s language model (--partial allows it)"
    )


def _config_of(checkpoint: Checkpoint) -> dict[str, Any]:
    """The model's config.json ({} when it has none: a text model saved as bare weights)."""
    from .io.model_files import model_file

    return checkpoint.config() if model_file(checkpoint.directory, "config.json") is not None else {}


def _file_order(checkpoint: Checkpoint) -> list[str]:
    """The tensor names in the order they lie on disk, so that reads go forward through each file."""
    return sorted(checkpoint.names(), key=lambda n: (checkpoint.infos[n].file, checkpoint.infos[n].start))


def _check_tensors(match: NameMatch, vlm: Checkpoint, text: Checkpoint, vlm_label: str, text_label: str) -> None:
    """ArchitectureError for the first matched pair whose shapes differ, or whose dtypes differ
    other than as two float types (a cast)."""
    from .io.dtypes import FLOAT_CODES

    for vlm_name, text_name in match.pairs.items():
        v, t = vlm.infos[vlm_name], text.infos[text_name]
        if v.shape != t.shape:
            hint = ""
            if len(v.shape) == len(t.shape) >= 1 and v.shape[1:] == t.shape[1:]:
                hint = (
                    f" (the vocabularies differ: {t.shape[0]} rows against {v.shape[0]}; the text model must keep "
                    "the VLM's vocabulary)"
                    if _is_vocab_tensor(vlm_name)
                    else ""
                )
            raise ArchitectureError(
                f"tensor '{text_name}' of {text_label} has shape {list(t.shape)}, but '{vlm_name}' of {vlm_label} "
                f"has shape {list(v.shape)}{hint}"
            )
        if v.dtype != t.dtype and not (v.dtype in FLOAT_CODES and t.dtype in FLOAT_CODES):
            raise ArchitectureError(
                f"tensor '{text_name}' of {text_label} is {t.dtype}, but '{vlm_name}' of {vlm_label} is {v.dtype}; "
                "only float tensors are converted"
            )


def _is_vocab_tensor(name: str) -> bool:
    return any(part in name for part in ("embed", "lm_head", "wte", "output.weight"))


def _copy_non_weight_files(src: Path, out: OutputTransaction, skip_card: bool) -> None:
    """Every file of the VLM's directory but its weights (config.json is the output's marker,
    written last; README.md is replaced by the card when one is written)."""
    from .io.checkpoint import confined

    for entry in sorted(src.iterdir(), key=lambda p: p.name):
        name = entry.name
        if (
            name.startswith(".")
            or not entry.is_file()
            or name.endswith(WEIGHT_SUFFIXES)
            or name.endswith(".index.json")
            or name in NOT_COPIED
            or name == "config.json"
            or (skip_card and name == CARD)
        ):
            continue
        out.copy_file(confined(src, name, str(src)), name)


def _module_of(name: str) -> str:
    """The part of the model a tensor belongs to, for the card: its first name component, or two
    when the first is the generic ``model``."""
    parts = name.split(".")
    return ".".join(parts[:2] if parts[0] == "model" and len(parts) > 2 else parts[:1])


def _card(base: str, text: str, vlm: Checkpoint, match: NameMatch, title: str) -> str:
    from .card import front_matter, hub_link, is_hub_id, made_with

    front: dict[str, Any] = {"library_name": "transformers", "tags": ["mergekitty", "merge"]}
    hubs = [r.split("@")[0] for r in (base, text) if is_hub_id(r.split("@")[0])]
    if hubs:
        front["base_model"] = hubs
    kept = Counter(_module_of(n) for n in vlm.names() if n not in match.pairs)
    lines = [
        *front_matter(front),
        f"# {title}",
        "",
        f"The vision-language model {hub_link(base)} with its language model's weights taken from "
        f"{hub_link(text)}, made with {made_with('mergekitty fill-missing')}.",
        "",
        f"* From {hub_link(text)}: {len(match.pairs)} tensors (name mapping: `{_rules_text(match.rules)}`)",
        f"* From {hub_link(base)}: {sum(kept.values())} tensors"
        + (": " + ", ".join(f"`{m}` ({n})" for m, n in sorted(kept.items())) if kept else ""),
        f"* config.json and the other files (tokenizer, processor): from {hub_link(base)}",
    ]
    if match.absent:
        lines.append(f"* Left out (the VLM has no such tensor): {', '.join(f'`{n}`' for n in match.absent)}")
    return "\n".join([*lines, ""])


__all__ = ["FillResult", "NameMatch", "PrefixRule", "fill_missing", "infer_rules", "match_names", "parse_prefix"]
