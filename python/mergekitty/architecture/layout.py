"""Infer the per-layer structure of a model from its tensor names and config.json.

Ordinary decoder models need no per-architecture table: the layer stack is the
group of tensors named ``<prefix>.<N>.<rest>`` whose layer count matches the
config's ``num_hidden_layers`` (or ``n_layer``, ``num_layers``...), wherever it is
nested (``text_config.num_hidden_layers`` for vision-language models, with
prefixes such as ``model.language_model.layers``). Every other tensor is a
"pre" weight (embeddings, vision tower: merged with t=0 from the first slice) or
a "post" weight (final norm, head: t=1 from the last slice).

Models the inference cannot understand get an ArchitectureError naming the tensors;
their layout can then be stated in a ``mergekitty_layout.json`` (see ``override.py``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ArchitectureError
from ..text import listing

if TYPE_CHECKING:
    from .override import LayoutOverride

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Nested configs that hold the language model's settings.
TEXT_CONFIG_KEYS = ("text_config", "language_config", "llm_config")

_NUMBERED = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")
# Tensors that come before the layer stack; everything else non-layer comes after.
_PRE_HINTS = (
    "embed",
    "wte",
    "wpe",
    "word_embeddings",
    "vision",
    "visual",
    "image",
    "mm_projector",
    "multi_modal",
    "patch",
)
# Prefix words that mark a stack as not the language model's.
_NON_TEXT_HINTS = ("vision", "visual", "image", "audio", "encoder", "mm_", "projector", "patch")
_EMBED_HINTS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "lm_head", "embed_out", "tok_embeddings")
_INPUT_EMBED_HINTS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
_OVERRIDE_HINT = "; describe the layout in a mergekitty_layout.json next to config.json (README: 'Model layouts')"


def get_nested(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def layer_count_key(cfg: dict[str, Any]) -> str | None:
    """The dotted config key holding the number of language-model layers."""
    for key in LAYER_COUNT_KEYS:
        if isinstance(cfg.get(key), int):
            return key
    for sub in TEXT_CONFIG_KEYS:
        nested = cfg.get(sub)
        if isinstance(nested, dict):
            for key in LAYER_COUNT_KEYS:
                if isinstance(nested.get(key), int):
                    return f"{sub}.{key}"
    return None


def is_embedding_name(name: str) -> bool:
    """Input embedding or output head: a tensor whose rows follow the vocabulary."""
    return any(h in name for h in _EMBED_HINTS) or name in ("output.weight",)


def is_head_name(name: str) -> bool:
    """An output head (``lm_head``, ``embed_out``...): what a model with tied embeddings does not store."""
    return is_embedding_name(name) and not any(h in name.lower() for h in _INPUT_EMBED_HINTS)


def ties_embeddings(cfg: dict[str, Any]) -> bool | None:
    """The config's ``tie_word_embeddings`` (top level, else the text config's); None when it says nothing."""
    for node in (cfg, *(cfg.get(k) for k in TEXT_CONFIG_KEYS)):
        if isinstance(node, dict) and isinstance(node.get("tie_word_embeddings"), bool):
            return bool(node["tie_word_embeddings"])
    return None


def set_untied(cfg: dict[str, Any]) -> bool:
    """Make the config say ``tie_word_embeddings: false`` wherever it keeps the flag (the top
    level when nowhere); True when that changed what it said."""
    changed, found = False, False
    for node in (cfg, *(cfg.get(k) for k in TEXT_CONFIG_KEYS)):
        if isinstance(node, dict) and "tie_word_embeddings" in node:
            found = True
            changed |= node["tie_word_embeddings"] is not False
            node["tie_word_embeddings"] = False
    if not found:
        cfg["tie_word_embeddings"] = False
    return changed or not found


# Buffers that some transformers releases saved into checkpoints and that every release rebuilds
# when it loads the model (rotary frequencies, GPT-NeoX/GPT-2 causal masks). A merge whose inputs
# do not all carry one leaves it out: the loaded model is the same with or without it.
_RECOMPUTED_SUFFIXES = (".inv_freq", ".masked_bias")
_MASK_SUFFIXES = (".attention.bias", ".attn.bias")


def is_recomputed_buffer(name: str, shape: Sequence[int]) -> bool:
    """A buffer transformers rebuilds at load time (see ``_RECOMPUTED_SUFFIXES``); a causal mask
    is recognized by its 4-D ``[1, 1, n, n]`` shape, so that a real attention bias never is."""
    if name.endswith(_RECOMPUTED_SUFFIXES):
        return True
    return name.endswith(_MASK_SUFFIXES) and len(shape) == 4 and shape[0] == shape[1] == 1


# Two on-disk naming schemes of the same vision-language checkpoints: what transformers'
# save_pretrained writes (left) and what some 4.x releases wrote (right). A tensor missing
# under one spelling is looked up under the other.
VLM_NAME_SCHEMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def other_spellings(name: str) -> list[str]:
    """``name`` under the other naming scheme of vision-language checkpoints (empty if none)."""
    out = []
    for a, b in VLM_NAME_SCHEMES:
        if name.startswith(a):
            out.append(b + name[len(a) :])
        elif name.startswith(b):
            out.append(a + name[len(b) :])
    return out


def spelled_like(name: str, names: Iterable[str]) -> str:
    """``name`` under the vision-language naming scheme that ``names`` (another model's tensors)
    use, so that a tensor one model adds to the output follows the output's scheme."""
    (a_marker, b_marker), names = VLM_NAME_SCHEMES[0], list(names)
    uses_a = any(n.startswith(a_marker) for n in names)
    if uses_a == any(n.startswith(b_marker) for n in names):
        return name  # not a vision-language checkpoint (or both schemes at once): nothing to follow
    for a, b in VLM_NAME_SCHEMES:
        src, dst = (b, a) if uses_a else (a, b)
        if name.startswith(src) and not name.startswith(dst):
            return dst + name[len(src) :]
    return name


@dataclass(frozen=True)
class ModelLayout:
    """Where the layers of one model are and what each layer holds."""

    num_layers: int
    count_key: str | None  # dotted config key, None when the config has none
    prefix: str  # e.g. "model.layers"
    layer_tensors: dict[int, tuple[str, ...]]  # layer index -> suffixes ("self_attn.q_proj.weight", ...)
    pre: tuple[str, ...]
    post: tuple[str, ...]
    extra_stacks: dict[str, int] = field(default_factory=dict)  # other numbered groups (vision tower...)

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"

    @property
    def stacks(self) -> dict[str, int]:
        """Every layer stack's prefix and layer count: the main one first, then the others."""
        return ({self.prefix: self.num_layers} if self.prefix else {}) | self.extra_stacks

    def stack_size(self, prefix: str) -> int | None:
        """The layer count of the stack ``prefix`` (the main one or another); None without it."""
        return self.num_layers if prefix == self.prefix else self.extra_stacks.get(prefix)

    def stack_layers(self, prefix: str) -> dict[int, tuple[str, ...]]:
        """Layer index -> suffixes of the stack ``prefix`` (the main one, or one of ``extra_stacks``,
        whose tensors are among the pre and post weights)."""
        if prefix == self.prefix:
            return self.layer_tensors
        numbered = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)$")
        layers: dict[int, list[str]] = defaultdict(list)
        for name in (*self.pre, *self.post):
            m = numbered.match(name)
            if m:
                layers[int(m[1])].append(m[2])
        return {i: tuple(layers[i]) for i in sorted(layers)}

    @property
    def input_embedding(self) -> str | None:
        """The language model's token embedding (what a tied head shares), if one is recognized."""
        for name in self.pre:
            low = name.lower()
            if any(h in low for h in _INPUT_EMBED_HINTS) and not any(h in low for h in _NON_TEXT_HINTS):
                return name
        return None


def _choose_stack(stacks: dict[str, dict[int, list[str]]], expected: int | None, where: str) -> str:
    def score(prefix: str) -> tuple[bool, bool, bool, int]:
        indices = stacks[prefix]
        count = max(indices) + 1
        textual = not any(h in prefix.lower() for h in _NON_TEXT_HINTS)
        contiguous = len(indices) == count
        return (expected is None or count == expected, textual, contiguous, sum(len(v) for v in indices.values()))

    best = max(stacks, key=score)
    count = max(stacks[best]) + 1
    found = ", ".join(f"'{p}' ({max(v) + 1} layers)" for p, v in stacks.items())
    if expected is not None and count != expected:
        raise ArchitectureError(
            f"{where}: config.json says {expected} layers, but no group of numbered tensors has that many (found {found}){_OVERRIDE_HINT}"
        )
    if expected is None:
        # no layer count in config.json: the stack must be the only language-model candidate
        rivals = [p for p in stacks if p != best and score(p)[1:3] == score(best)[1:3]]
        if rivals:
            raise ArchitectureError(
                f"{where}: config.json has no layer count ({', '.join(LAYER_COUNT_KEYS)}) and several groups of "
                f"numbered tensors could be the layer stack: {found}{_OVERRIDE_HINT}"
            )
    if len(stacks[best]) != count:
        missing = sorted(set(range(count)) - set(stacks[best]))[:5]
        raise ArchitectureError(
            f"{where}: layer stack '{best}' has no tensors for layers {listing(missing)}{_OVERRIDE_HINT}"
        )
    return best


def flat_layout(tensor_names: Iterable[str]) -> ModelLayout:
    """A plain state dict's layout (raw_merge.py): no layer stack, every tensor a weight of its
    own, merged as the weights before a stack are (at t = 0)."""
    return ModelLayout(0, None, "", {}, tuple(tensor_names), ())


def infer_layout(
    tensor_names: Iterable[str], cfg: dict[str, Any], where: str = "model", override: LayoutOverride | None = None
) -> ModelLayout:
    """Split ``tensor_names`` into pre weights, numbered layers and post weights.

    ``where`` names the model in error messages. ``override`` (a ``LayoutOverride``) states
    the layout instead of inferring it.
    """
    if override is not None:
        from .override import layout_from_override

        return layout_from_override(tensor_names, cfg, override, where)
    names = list(tensor_names)
    count_key = layer_count_key(cfg)
    expected = get_nested(cfg, count_key) if count_key else None

    stacks: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name in names:
        m = _NUMBERED.match(name)
        if m:
            stacks[m["prefix"]][int(m["index"])].append(m["rest"])

    if not stacks:
        if expected:
            sample = ", ".join(names[:6])
            raise ArchitectureError(
                f"{where}: config.json says {expected} layers, but no tensor name looks like '<prefix>.<layer>.<name>' (tensors: {sample}...){_OVERRIDE_HINT}"
            )
        return ModelLayout(0, count_key, "", {}, tuple(names), ())

    prefix = _choose_stack(stacks, expected, where)
    layer_tensors = {i: tuple(stacks[prefix][i]) for i in sorted(stacks[prefix])}
    stack_members = {f"{prefix}.{i}.{rest}" for i, rests in layer_tensors.items() for rest in rests}

    pre: list[str] = []
    post: list[str] = []
    for name in names:
        if name in stack_members:
            continue
        (pre if any(h in name.lower() for h in _PRE_HINTS) else post).append(name)
    extra = {p: max(v) + 1 for p, v in stacks.items() if p != prefix}
    return ModelLayout(len(layer_tensors), count_key, prefix, layer_tensors, tuple(pre), tuple(post), extra)


# Words of a module's own weights (named from the module's root) that put them before its layer
# stack, as mergekit's module definitions do: embeddings (patch, position, class), a convolution
# stem, a norm named "pre". Whole words, so that "post" and "prediction" are not taken for them.
_BEFORE_STACK_PREFIXES = ("embed", "patch", "position", "conv")
_BEFORE_STACK_WORDS = ("pos", "pre", "cls", "class", "wte", "wpe", "stem")


def before_stack(name: str) -> bool:
    """Whether a module's own non-layer weight ``name`` (relative to the module's root, e.g.
    ``embeddings.patch_embedding.weight`` of a vision tower) comes before the module's layer
    stack (t=0, its first slice) rather than after it (``post_layernorm``, a head: t=1, its last)."""
    words = re.split(r"[._]", name.lower())
    return any(w.startswith(_BEFORE_STACK_PREFIXES) or w in _BEFORE_STACK_WORDS for w in words)


def vocab_size_of(cfg: dict[str, Any]) -> int | None:
    """The ``vocab_size`` the config declares (at its top level, else in a nested language-model
    config), or None when it has none."""
    for node in (cfg, *(cfg.get(k) for k in TEXT_CONFIG_KEYS)):
        if isinstance(node, dict) and isinstance(node.get("vocab_size"), int):
            return int(node["vocab_size"])
    return None


def _words(text: str) -> set[str]:
    words = set(re.split(r"[._]", text.lower())) - {"", "config", "model"}
    return words | ({"vision"} if words & {"visual", "image"} else set())


def stack_count_key(cfg: dict[str, Any], prefix: str, count: int, exclude: str | None = None) -> str | None:
    """The dotted config key holding the layer count of the stack ``prefix`` (of ``count`` layers)
    other than the language model's (``exclude``): a nested ``*_config`` layer count that equals
    ``count``, the one whose name shares a word with the prefix (``vision_config`` for
    ``model.vision_tower.encoder.layers``) when several do. None when none is found."""
    found = []
    for sub, node in cfg.items():
        if not (isinstance(node, dict) and sub.endswith("_config")):
            continue
        for key in (*LAYER_COUNT_KEYS, "depth"):
            value = node.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value == count and f"{sub}.{key}" != exclude:
                found.append((len(_words(sub) & _words(prefix)), f"{sub}.{key}"))
                break
    best = max((score for score, _ in found), default=0)
    keys = [key for score, key in found if score == best]
    return keys[0] if len(keys) == 1 else None


def set_vocab_size(cfg: dict[str, Any], rows: int) -> None:
    """Write the embedding row count wherever the config keeps ``vocab_size``."""
    found = False
    for node in (cfg, *(cfg.get(k) for k in TEXT_CONFIG_KEYS)):
        if isinstance(node, dict) and isinstance(node.get("vocab_size"), int):
            node["vocab_size"] = rows
            found = True
    if not found:
        cfg["vocab_size"] = rows
