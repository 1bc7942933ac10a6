"""Reading a PEFT LoRA adapter directory: its config, its tensors, and what each tensor changes.

Tensor names follow PEFT (``base_model.model.`` + the module name):

- ``<m>.lora_A.weight`` / ``<m>.lora_B.weight`` (and ``<m>.lora_B.bias`` with ``lora_bias``):
  a linear (or ``Conv1D`` with ``fan_in_fan_out``) module, ``W' = W + scale * B @ A``;
- ``<m>.lora_embedding_A`` / ``<m>.lora_embedding_B``: an embedding, ``W' = W + scale * (B @ A)^T``;
- every other tensor replaces a base tensor in full: ``<m>.<p>`` and ``<m>.modules_to_save.<p>``
  (``modules_to_save``, biases with ``bias: lora_only/all``), ``<m>.base_layer.<p>`` (the base a
  LoRA module applies to, e.g. an embedding with added rows) and ``<m>.original_module.<p>``.

The scale is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), ``r`` and ``lora_alpha``
taken per module from ``rank_pattern`` / ``alpha_pattern`` where they match.
Nothing here reads tensor data: only the safetensors header.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, ModelNotFoundError
from ..io.model_files import model_file, read_json, shown
from ..text import shape_text

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# full-tensor infixes, in order of precedence when several name the same base tensor
_FULL_INFIXES = ("modules_to_save", "", "base_layer", "original_module")
_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA adapters (use_dora)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QA-LoRA adapters",
}


# the hub cache's directory of a model: models--<org>--<name>/snapshots/<revision>
_HUB_CACHE_DIR = re.compile(r"models--[^/\\]+?--([^/\\]+)")


def _model_name(ref: str) -> str:
    """A model reference's last component, compared without case: ``Llama-3-8B`` for
    ``meta-llama/Llama-3-8B``, ``/models/Llama-3-8B/`` or a hub cache snapshot of it."""
    text = ref.strip().rstrip("/\\")
    cached = _HUB_CACHE_DIR.search(text)
    if cached:
        return cached.group(1).lower()
    return re.split(r"[/\\]", text)[-1].lower()


def _same_directory(a: str, b: str | Path | None) -> bool:
    try:
        return b is not None and Path(a).expanduser().is_dir() and Path(a).expanduser().samefile(b)
    except OSError:
        return False


@dataclass(frozen=True)
class LoraModule:
    """One module the adapter changes with low-rank factors."""

    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear" or "embedding"
    a: str  # adapter tensor names
    b: str
    bias: str | None  # lora_B.bias (lora_bias=True)
    rank: int
    scale: float
    fan_in_fan_out: bool

    @property
    def target(self) -> str:
        """The base tensor the factors change."""
        return f"{self.module}.weight"

    def delta_shape(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, int]:
        """The shape of the weight the factors add to (as stored in the base checkpoint)."""
        if self.kind == "embedding":  # A: (r, vocab), B: (hidden, r) -> (vocab, hidden)
            return (a_shape[1], b_shape[0])
        out_in = (b_shape[0], a_shape[1])
        return out_in[::-1] if self.fan_in_fan_out else out_in


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that equals ``module`` or
    matches its tail as a regular expression (``(.*\\.)?KEY$``)."""
    for key, value in patterns.items():
        if key == module:
            return value
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return default


class Adapter:
    """A LoRA adapter directory, parsed and checked (headers only)."""

    def __init__(self, directory: str | Path, label: str | None = None):
        from ..io.checkpoint import Checkpoint

        self.directory = Path(directory)
        self.label = label or str(directory)
        if not self.directory.is_dir():
            raise ModelNotFoundError(f"LoRA adapter directory not found: {self.directory}")
        cfg_path = model_file(self.directory, ADAPTER_CONFIG)
        if cfg_path is None:
            raise ModelNotFoundError(f"{self.directory}: not a LoRA adapter (no {ADAPTER_CONFIG})")
        config = read_json(cfg_path)
        if not isinstance(config, dict):
            raise ModelFormatError(f"{cfg_path}: expected a JSON object, got {shown(config)}")
        self.config: dict[str, Any] = config
        self._check_config(cfg_path)
        weights = next((w for w in ADAPTER_WEIGHTS if (self.directory / w).is_file()), None)
        if weights is None:
            raise ModelNotFoundError(f"{self.directory}: LoRA adapter has no weights ({' or '.join(ADAPTER_WEIGHTS)})")
        self.checkpoint = Checkpoint(self.directory, label=self.label, files=[weights])
        self.weights_file = weights
        self.modules: dict[str, LoraModule] = {}  # by target tensor name
        self.full: dict[str, str] = {}  # base tensor name -> adapter tensor name
        self.base_layers: dict[str, str] = {}  # base tensor name -> adapter's replacement base (base_layer.*)
        self._parse()

    # ------------------------------------------------------------------ config
    def _check_config(self, path: Path) -> None:
        """Every value of ``adapter_config.json`` that is read, checked here (a string ``"false"``
        must not read as true, a rank must not be ``"8"``)."""
        cfg = self.config

        def bad(key: str, expected: str) -> ModelFormatError:
            return ModelFormatError(f"{path}: '{key}' must be {expected}, got {shown(cfg.get(key))}")

        peft_type = cfg.get("peft_type", "")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise ModelFormatError(f"{path}: peft_type is {shown(peft_type)}; only LORA adapters can be applied")
        for key, what in _UNSUPPORTED_CONFIG.items():
            if cfg.get(key):
                raise ModelFormatError(f"{path}: {what} cannot be applied (only plain LoRA)")
        self.r = cfg.get("r", 8)
        if not _is_rank(self.r):
            raise bad("r", "a positive integer")
        self.alpha = cfg.get("lora_alpha", self.r)
        if not _is_number(self.alpha):
            raise bad("lora_alpha", "a finite number")
        self.rank_pattern = cfg.get("rank_pattern") or {}
        self.alpha_pattern = cfg.get("alpha_pattern") or {}
        for key, pattern, ok, expected in (
            ("rank_pattern", self.rank_pattern, _is_rank, "positive integers"),
            ("alpha_pattern", self.alpha_pattern, _is_number, "finite numbers"),
        ):
            if not isinstance(pattern, dict) or not all(ok(v) for v in pattern.values()):
                raise bad(key, f"an object mapping module names to {expected}")
        for key in ("use_rslora", "fan_in_fan_out"):
            if key in cfg and not isinstance(cfg[key], bool):
                raise bad(key, "true or false")
        self.use_rslora = bool(cfg.get("use_rslora", False))
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        if not isinstance(cfg.get("base_model_name_or_path", ""), (str, type(None))):
            raise bad("base_model_name_or_path", "a model path or hub id (a string)")

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def other_base_warning(self, base: str, base_dir: str | Path | None = None) -> str | None:
        """A warning when the adapter records a base model other than ``base`` (as the user named
        it; ``base_dir``: where it was found), naming both; None when it records the same model
        or none. Models are the same when their names are: ``org/Llama-3-8B``, a local
        ``/models/Llama-3-8B`` and the hub cache's ``models--org--Llama-3-8B/snapshots/...`` are
        one model, as PEFT records whichever spelling the adapter was trained from."""
        recorded = (self.base_model_name or "").strip()
        if not recorded:
            return None
        applied = {_model_name(base)} | ({_model_name(str(base_dir))} if base_dir is not None else set())
        if _model_name(recorded) in applied or _same_directory(recorded, base_dir):
            return None
        return (
            f"LoRA adapter {self.label} was made for '{recorded}', not '{base}': applying it anyway "
            "(the shapes are checked, not the weights it was trained on)"
        )

    def scale_of(self, module: str, rank: int) -> float:
        alpha = float(pattern_value(self.alpha_pattern, module, self.alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    # ------------------------------------------------------------------ tensors
    def _parse(self) -> None:
        infos = self.checkpoint.infos
        where = f"{self.directory / self.weights_file}"
        pairs: dict[tuple[str, str], dict[str, str]] = {}
        full_candidates: dict[str, tuple[int, str]] = {}
        for key in infos:
            if not key.startswith(PEFT_PREFIX):
                raise ModelFormatError(
                    f"{where}: tensor '{key}' does not start with '{PEFT_PREFIX}' (not a PEFT adapter)"
                )
            name = key[len(PEFT_PREFIX) :]
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.(weight|bias)", name) or re.fullmatch(
                r"(.+)\.(lora_embedding_A|lora_embedding_B)", name
            )
            if m:
                module, part = m.group(1), m.group(2)
                kind = "embedding" if "embedding" in part else "linear"
                slot = part[-1] + (".bias" if m.lastindex == 3 and m.group(3) == "bias" else "")
                if slot == "A.bias":
                    raise ModelFormatError(f"{where}: tensor '{key}': lora_A has no bias in LoRA")
                pairs.setdefault((module, kind), {})[slot] = key
                continue
            if "lora_magnitude_vector" in name:
                raise ModelFormatError(
                    f"{where}: tensor '{key}' belongs to a DoRA adapter, which cannot be applied (only plain LoRA)"
                )
            if ".lora_" in name or ".token_adapter." in name or "trainable_tokens" in name:
                raise ModelFormatError(
                    f"{where}: tensor '{key}' is not a LoRA factor or a full weight this tool understands"
                )
            module, _, param = name.rpartition(".")
            infix = ""
            for candidate in _FULL_INFIXES[:1] + _FULL_INFIXES[2:]:
                if module.endswith("." + candidate):
                    module, infix = module[: -len(candidate) - 1], candidate
                    break
            target = f"{module}.{param}" if module else param
            if infix == "base_layer":
                self.base_layers[target] = key
            rank = _FULL_INFIXES.index(infix)
            if target not in full_candidates or rank < full_candidates[target][0]:
                full_candidates[target] = (rank, key)

        for (module, kind), slots in pairs.items():
            if "A" not in slots or "B" not in slots:
                missing = "A" if "A" not in slots else "B"
                raise ModelFormatError(
                    f"{where}: module '{module}' has lora_{'embedding_' if kind == 'embedding' else ''}{missing} missing (incomplete LoRA pair)"
                )
            a_shape, b_shape = infos[slots["A"]].shape, infos[slots["B"]].shape
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise ModelFormatError(
                    f"{where}: module '{module}': only 2-D LoRA factors (linear, embedding) can be applied, got {shape_text(a_shape)} and {shape_text(b_shape)}"
                )
            rank, inner = a_shape[0], b_shape[1]
            if rank != inner:
                raise ModelFormatError(f"{where}: module '{module}': lora_A has rank {rank} but lora_B has {inner}")
            if rank == 0:
                continue
            lora = LoraModule(
                module=module,
                kind=kind,
                a=slots["A"],
                b=slots["B"],
                bias=slots.get("B.bias"),
                rank=rank,
                scale=self.scale_of(module, rank),
                fan_in_fan_out=self.fan_in_fan_out and kind == "linear",
            )
            if lora.target in self.modules:
                raise ModelFormatError(f"{where}: module '{module}' has both linear and embedding LoRA factors")
            self.modules[lora.target] = lora
        for target, (rank, key) in full_candidates.items():
            if _FULL_INFIXES[rank] == "base_layer" and target in self.modules:
                continue  # the base a LoRA module applies to, not a replacement of the result
            self.full[target] = key
        for target in self.modules:
            self.full.pop(target, None)

    def factor_shapes(self, lora: LoraModule) -> tuple[tuple[int, ...], tuple[int, ...]]:
        infos = self.checkpoint.infos
        return infos[lora.a].shape, infos[lora.b].shape

    def tokenizer_dir(self) -> Path | None:
        """The adapter directory if it ships tokenizer files (an adapter that added tokens does)."""
        from ..tokenizer.write import TOKENIZER_FILES

        return self.directory if any((self.directory / f).is_file() for f in TOKENIZER_FILES) else None
